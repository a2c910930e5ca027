"""The probabilistic-programming model zoo: generative stories as Pyro model/guide pairs.

from zoo import GaussianMixture, BernoulliMixture, VAE, CVAE, SSVAE, HVAE, VQVAE, data
"""

from zoo.bernoulli_mixture import BernoulliMixture, BMMConfig
from zoo.cvae import CVAE, CVAEConfig
from zoo.gmm import GaussianMixture, GMMConfig
from zoo.hvae import HVAE, HVAEConfig
from zoo.ssvae import SSVAE, SSVAEConfig
from zoo.vae import VAE, VAEConfig
from zoo.vqvae import VQVAE, VQVAEConfig

__all__ = [
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
