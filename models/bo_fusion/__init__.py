"""BOMF: model fusion through Bayesian optimisation in language-model fine-tuning (Jang et al., NeurIPS 2024).

The method in three steps, each a few functions in this package:

1. Stage 1 (Sec. 4.2, `bo.py`): Bayesian optimisation of (log learning rate, batch size) on a lightweight
   proxy (lower layers frozen or a low LoRA rank); objective = best validation metric of the run.
   `SingleTaskGP` + `qLogExpectedImprovement` (`maximise_single_objective`).
2. Stage 2 (`training.py`): fine-tune the full model at a constant learning rate; early stopping on the
   validation metric finds best_step; the K members are checkpoints evenly spaced from 0.5x to 2x
   best_step (`finetune_early_stopping`; `finetune_collect` is a fixed-length run, stage 1's).
3. Fusion (Sec. 4.3, `fusion.py` + `bo.py`): α ∈ [0,1]^K, w = α / Σα (`simplex_weights`),
   θ(w) = Σ_k w_k θ_k (`fuse_parameters`) evaluated with `torch.func.functional_call` on stacked
   checkpoints (`FusedClassifier`); two objectives (validation metric, negative validation loss), each
   min-max normalised over the members (`bomf_objectives`); independent GPs (`ModelListGP`) + qNEHVI
   (`maximise_two_objectives`); the final pick is the evaluated point with the best validation metric.

Baselines (Sec. 5): best single checkpoint, last checkpoint, uniform average (SWA-like), greedy soup
(`fusion.greedy_soup`), and single-objective BO fusion on the metric or the loss alone.

`backbone.py` builds the pretrained classifier (full fine-tuning of the upper layers, or LoRA through
peft) and, at CPU scale, runs only the layers above a frozen, cached lower part (`TopLayersClassifier`,
`FrozenFeatureCache`).

Everything here is pure torch/botorch/transformers: no files written, no tracking, no orchestration.
The classification metric is passed in by the caller (the stages pass `tasks.metrics.macro_f1`). This
``__init__`` imports nothing, so a stage depends only on the modules it uses.
"""
