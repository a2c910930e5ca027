"""The probabilistic-programming model zoo: generative stories as Pyro model/guide pairs.

from zoo import GaussianMixture, BernoulliMixture, data
"""

from zoo.bernoulli_mixture import BernoulliMixture, BMMConfig
from zoo.gmm import GaussianMixture, GMMConfig

__all__ = ["BernoulliMixture", "BMMConfig", "GaussianMixture", "GMMConfig"]
__version__ = "0.1.0"
