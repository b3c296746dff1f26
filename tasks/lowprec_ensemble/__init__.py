"""Ex Uno Pluria: low precision ensembling (LPE-BSR).

Stages: prepare (splits) -> train (FP32 solutions, baselines, width sweep) -> ensemble (member
predictions) -> evaluate (metrics, claims, figures). CPU scale: scikit-learn digits and small MLPs;
paper scale: a pretrained ViT from a local folder on a local image folder, with the same code.
"""
