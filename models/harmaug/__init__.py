"""HarmAug (Lee, Seong et al., ICLR 2025): the symbolic harm world, language models with the affirmative
prefix, safety guards with the distillation loss, and EDA. Pure torch/transformers: no files, no tracking."""
