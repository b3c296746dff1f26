"""HarmAug: augmentation for distilling safety guards

Lee, Seong et al., ICLR 2025 (arXiv:2410.01524). Stages: ``prepare`` (a symbolic harm world: seed set D
of four categories, test sets of all twelve, corpora; or local files at paper scale) -> ``pretrain``
(teacher guard, safety-aligned generator and response model trained from scratch; or local paths) ->
``augment`` (few-shot request with the affirmative prefix, the no-prefix control, responses, EDA, teacher
soft labels) -> ``finetune`` (the small student per variant and seed, equal steps) -> ``evaluate`` (F1 and
AUPRC, generator statistics from the oracle parser, FLOPs and latency, claims with gates, plots). The
method is in ``models/harmaug/``.
"""
