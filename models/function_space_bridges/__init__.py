"""DBFS: stochastic optimal control for diffusion bridges in function spaces (Park, Choi, Lim, Lee,
NeurIPS 2024, arXiv 2405.20630).

Data flow: ``spectral`` holds the reference process, an Ornstein-Uhlenbeck SDE dX = -A X dt + sigma dW^Q
diagonal in the cosine (DCT) basis of the unit interval or square, with its closed-form bridge and a
stiffness-stable bridge step -> ``operator`` is the resolution-free network (Perceiver-IO-like, on
coordinates) that predicts a bridge's endpoint -> ``bridge`` trains it by bridge matching with iterative
Markovian fitting and samples with the exact per-mode step (or Euler-Maruyama) -> ``posterior`` learns a
control by the relative-entropy SOC loss that steers the reference process to a GP-regression posterior,
checked against the exact Gaussian posterior.
"""
