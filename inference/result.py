"""The result every driver returns instead of printing."""

from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class FitResult:
    """What a fit produced.

    objective: the final value of what the driver maximized, per data point (higher is better):
        for EM, the mean log-likelihood plus log prior / N; for SVI and the reparameterized
        driver, the ELBO per data point.
    params: constrained parameter values by Pyro name, detached copies.
    history: one record per iteration (EM) or epoch: at least ``step``, ``objective`` and
        ``time`` (seconds since the fit started).
    converged: whether the stopping tolerance was met (False: ran out of iterations).
    stop_reason: a short human-readable reason.
    """

    objective: float
    params: Dict[str, object]
    history: List[Dict[str, float]] = field(default_factory=list)
    converged: bool = False
    stop_reason: str = ""
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.history)

    def curve(self, key: str = "objective") -> List[float]:
        return [record[key] for record in self.history if key in record]
