"""L2E: learning to explore for SGMCMC

Kim, Jung, Kim & Lee, ICML 2024 (arXiv:2408.09140). Stages: ``prepare`` (held-out tasks wine, breast
cancer and digits with an unseen architecture, 2 splits each; the fixed meta-validation tasks) ->
``metatrain`` (the per-weight kinetic MLP by antithetic ES on a family of scikit-learn tasks and MLPs;
the output multiplier chosen on meta-validation) -> ``sample`` (trained and untrained L2E, SGHMC,
cyclical SGHMC tuned on validation, deep ensembles at equal gradient evaluations; time per step) ->
``evaluate`` (claims by confidence intervals over splits x chains, plots). The method is in
``models/l2e_sgmcmc/``.
"""
