"""Inference drivers and metrics. Knows nothing about any particular model::

    from inference import em, svi, reparam, evaluate
    result = em.fit(model, guide, x)                 # one enumerable discrete latent per point
    result = svi.fit(model, guide, x, loss="TraceMeanField_ELBO")
    result = reparam.fit(model, guide, x, num_particles=5)   # IWAE
    log_px = evaluate.log_likelihood(model, guide, x, num_samples=5000)
    rows = compare.run([compare.Method("em", run_em), ...], seeds=[0, 1, 2])  # then compare.report
    posterior = mcmc.sample_posterior(model, x, chains=2)   # NUTS, arviz InferenceData, r_hat, ESS

Every driver returns a ``FitResult`` (``inference.result``). Importing the package, before torch,
chooses how torch's OpenMP workers wait on a busy machine (``inference.omp_wait``).
"""

from inference import omp_wait

omp_wait.choose()  # before torch is loaded: see inference/omp_wait.py
