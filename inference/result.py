"""The result every driver returns instead of printing."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class FitResult:
    """What a fit produced.

    Attributes:
        objective: the training objective of the returned parameters, per data point (higher is
            better): for EM, the mean log-likelihood plus log prior / N; for SVI and the
            reparameterized driver, the ELBO (or IWAE bound) per data point, averaged over the
            minibatches of the epoch whose parameters are returned (the kept epoch, after early
            stopping).
        params: constrained parameter values by Pyro name (or by module attribute for parameters
            Pyro's store does not hold), detached copies.
        history: one record per EM ``iteration`` or loop ``epoch`` (each record names its own:
            a "step" is one optimizer step on a minibatch, never a record), with at least
            ``objective`` and ``time`` (seconds since the fit started).
        converged: EM: whether the tolerance was met (False: it reached ``max_iter`` first).
            The training loop: whether it ran what it was asked, all its epochs or until early
            stopping (False: ``max_steps`` cut it short); it has no tolerance, so True says
            nothing about the objective having settled (read ``history`` for that).
        stop_reason: a short human-readable reason.
        valid_objective: the validation score of the returned parameters, when there was one.
        best_epoch: the epoch (or iteration) whose parameters are returned.
    """

    objective: float
    params: Dict[str, object]
    history: List[Dict[str, float]] = field(default_factory=list)
    converged: bool = False
    stop_reason: str = ""
    valid_objective: Optional[float] = None
    best_epoch: Optional[int] = None
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        """The number of history records: EM iterations or epochs (metrics.json writes it as
        ``iterations`` or ``epochs``)."""
        return len(self.history)

    def curve(self, key: str = "objective") -> List[float]:
        return [record[key] for record in self.history if key in record]
