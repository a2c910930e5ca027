"""The driver table: every way the zoo fits a Pyro program, by name, in one place::

    from inference.drivers import DRIVERS, fit
    result = fit("reparam", model, guide, x, num_epochs=20)    # DRIVERS["reparam"].fit(...)
    DRIVERS["em"].defaults()["tol"]                            # 1e-4, read from em.fit itself

The command line (its flags and their defaults), the comparisons, the registry's check of what
a model declares and a model's further stages all read this table, so a new driver is its own
module (a ``fit(model, guide, data, **options) -> FitResult``) and one entry here. A driver's
defaults are read from its ``fit``'s signature, never copied. Importing this module loads no
driver (nor torch): an entry imports its module when its ``fit`` is first asked for.
"""

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict


@dataclass(frozen=True)
class Driver:
    """One driver: ``module`` holds its ``fit``; ``loop``: it runs the training loop
    (``inference.loop``: epochs of minibatches, checkpoints, exact resume, early stopping)."""

    name: str
    module: str
    loop: bool
    description: str

    @property
    def fit(self) -> Callable:
        return importlib.import_module(self.module).fit

    def defaults(self) -> Dict[str, Any]:
        """The keyword options of its ``fit`` that have a default, with that default."""
        parameters = inspect.signature(self.fit).parameters.values()
        return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


DRIVERS: Dict[str, Driver] = {
    "em": Driver(
        "em",
        "inference.em",
        loop=False,
        description="expectation-maximization: the exact posterior of one enumerable discrete"
        " latent per data point, then a closed-form or gradient M-step",
    ),
    "svi": Driver(
        "svi",
        "inference.svi",
        loop=True,
        description="stochastic variational inference with any of Pyro's ELBOs, the same"
        " steps as Pyro's own SVI loop",
    ),
    "reparam": Driver(
        "reparam",
        "inference.reparam",
        loop=True,
        description="the reparameterized ELBO (or the IWAE bound with K particles) of a"
        " guide whose every latent site can be reparameterized",
    ),
}
NAMES = tuple(DRIVERS)
LOOP = tuple(name for name, driver in DRIVERS.items() if driver.loop)


def get(name: str) -> Driver:
    if name not in DRIVERS:
        raise ValueError(f"unknown driver {name!r}: the drivers are {', '.join(NAMES)}")
    return DRIVERS[name]


def fit(name: str, model: Callable, guide: Callable, data, **options):
    """Fit ``model`` and ``guide`` to ``data`` by the driver ``name``; a ``FitResult``."""
    return get(name).fit(model, guide, data, **options)


def default(option: str, names=NAMES) -> Any:
    """The default of ``option`` in the first of the drivers ``names`` whose ``fit`` has it."""
    for name in names:
        defaults = get(name).defaults()
        if option in defaults:
            return defaults[option]
    raise KeyError(f"no driver of {names} has an option {option!r}")
