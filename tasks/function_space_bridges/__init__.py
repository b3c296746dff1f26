"""DBFS: diffusion bridges in function space by stochastic optimal control

Park, Choi, Lim & Lee, NeurIPS 2024 (arXiv 2405.20630). Stages: ``prepare`` (GP samples and
Gaussian-mixture densities on 32/64/128 points, digits 0-4 and 5-9 at 16x16 and 32x32 with the FD-proxy
classifier, El Nino anomalies) -> ``bridge`` (resolution-free operator trained by bridge matching with
iterative Markovian fitting, and the iteration-1 baseline at equal steps, per experiment and seed) and
``posterior`` (GP-regression posterior by the relative-entropy SOC loss, per seed) -> ``evaluate``
(samples at every resolution with the exact bridge step, MMD, densities, FD-proxy, the exact GP
posterior; claims by confidence intervals; plots). The method is in ``models/function_space_bridges/``.
"""
