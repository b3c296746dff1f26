"""Safety alignment backfires / Modular LoRA (text-to-image diffusion).

A safety LoRA erases a concept, benign fine-tuning brings it back, and Modular LoRA (the fine-tuning LoRA
trained apart, both adapters summed at inference) keeps it away.

prepare  -> data and harm detector (digits, or a local SD pipeline's caption folder, prompts and detector)
pretrain -> W0 (trained on the digits with a quality gate, or the pipeline's UNet as it is)
safety   -> a safety LoRA per objective (ESD, SDD) and seed
finetune -> the benign fine-tuning arms (full, lora_on_safe, modular) + the re-emergence curves
evaluate -> harmful rates, task FD, model arithmetic, claims by confidence intervals, plots
Shared: common.py (records, models from the stage folders, sampling), sources.py (local inputs),
claims.py and plots.py (evaluate's).
"""
