"""Learning to Explore for stochastic-gradient MCMC (L2E; Kim, Jung, Kim & Lee, ICML 2024).

Data flow: ``network`` holds a task's MLP as one flat parameter row per chain (a batch of chains is a
[B, D] tensor) -> ``sampler`` moves the rows by SGHMC with learned kinetic-energy gradients (a per-weight
MLP on 9 per-tensor-normalised features gives alpha and beta) or by the baselines (SGHMC, cyclical SGHMC,
deep ensembles) -> ``meta`` meta-trains the per-weight MLP by antithetic evolution strategies on the BMA
NLL of thinned samples on a task's validation split -> ``diagnostics`` scores the samples (BMA metrics,
disagreement, loss barriers and mode count, ESS and R-hat).
"""
