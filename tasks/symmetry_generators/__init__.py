"""Learning infinitesimal generators of continuous symmetries

Ko, Kim & Lee, NeurIPS 2024 (arXiv:2410.21853). Stages: ``prepare`` (KdV trajectories by ETDRK4, or
local files at paper scale) -> ``learn_symmetry`` (orthonormal generator heads trained on the validity
score, one run per seed) -> ``augment`` (a 1-D FNO for KdV rollout trained on few trajectories with no,
known or learned Lie point symmetry augmentation) -> ``evaluate`` (the validity gate: data floor, known
symmetries, random fields; recovery of the known generators; the augmentation comparison; claims by
confidence intervals; plots). The method is in
``models/symmetry_generators/``.
"""
