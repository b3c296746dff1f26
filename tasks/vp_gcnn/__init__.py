"""VP G-CNN: input-aware partial equivariance by variational group convolutions

Kim, Kim, Yang & Lee, ICML 2024 (arXiv:2407.04271). Stages: ``prepare`` (Digits67-180, its rotated variant
and ColorDigits-LT from scikit-learn's digits, or a local digit folder at paper scale) -> ``train`` (the lambda
sweep on validation splits, then CNN, G-CNN, Partial G-CNN and VP G-CNN on the rotation sets and CNN, CE-CNN,
Partial-CE, VP-CE v1.2 and v1.0 on the colour set, one run per seed) -> ``evaluate`` (claims by confidence
intervals, gates, theta per class and layer, plots). The method is in ``models/vp_gcnn/``.
"""
