"""Inference drivers and metrics. Knows nothing about any particular model.

from inference import em, evaluate
result = em.fit(model, guide, x)
"""
