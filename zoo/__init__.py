"""The probabilistic-programming model zoo: generative stories as Pyro model/guide pairs::

    from zoo import GaussianMixture, BernoulliMixture, VAE, CVAE, SSVAE, HVAE, VQVAE, data

A model's ``model`` and ``guide`` go straight into any driver of ``inference`` that fits them.
"""

import importlib

import inference  # noqa: F401  (torch-free; how torch's workers wait: inference/omp_wait.py)

_WHERE = {
    "BernoulliMixture": "bernoulli_mixture",
    "BMMConfig": "bernoulli_mixture",
    "CVAE": "cvae",
    "CVAEConfig": "cvae",
    "GaussianMixture": "gmm",
    "GMMConfig": "gmm",
    "HVAE": "hvae",
    "HVAEConfig": "hvae",
    "SSVAE": "ssvae",
    "SSVAEConfig": "ssvae",
    "VAE": "vae",
    "VAEConfig": "vae",
    "VQVAE": "vqvae",
    "VQVAEConfig": "vqvae",
}


def __getattr__(name):
    """``from zoo import VAE``: the model's module is imported when it is first asked for, so
    that importing the package (``zoo --help``) does not load torch and Pyro."""
    if name in _WHERE:
        return getattr(importlib.import_module(f"zoo.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")


__all__ = [  # noqa: F822 (resolved by __getattr__)
    "BernoulliMixture",
    "BMMConfig",
    "CVAE",
    "CVAEConfig",
    "GaussianMixture",
    "GMMConfig",
    "HVAE",
    "HVAEConfig",
    "SSVAE",
    "SSVAEConfig",
    "VAE",
    "VAEConfig",
    "VQVAE",
    "VQVAEConfig",
]
__version__ = "0.1.0"
