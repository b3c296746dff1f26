"""ACSSM: amortized control of continuous SSMs

Park, Lee & Lee, ICLR 2025 (arXiv:2410.05602). Stages: ``prepare`` (irregular data sets) ->
``finetune`` (ACSSM, its no-skip ablation and the baselines, every task and seed; per-task settings at
paper scale), ``speed`` (seconds per epoch of ACSSM and the torchsde latent SDE over a sweep of solver
steps, timed alone) and ``ablation`` (the lambda sweep: the control cost's weight, one task, several
seeds) -> ``evaluate`` (scores, trivial references, speed ratio, claims by confidence intervals, plots).
``common.py`` holds what the stages pass to each other; ``training.py`` one training (finetune and
ablation); ``data.py`` (CPU scale) and ``paper_data.py`` (paper scale) build the data sets.
The method itself is in ``models/acssm/``.
"""
