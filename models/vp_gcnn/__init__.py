"""VP G-CNN (Kim et al., ICML 2024): group convolutions over a sampled, input-dependent subset of a group.

``layers``: batch norm that skips masked group elements; ``rotation``: continuous-kernel group
convolutions over sampled rotations (CNN, G-CNN, Partial G-CNN, VP G-CNN); ``colour``: hue-shift
equivariant convolutions with kept-element distributions (CNN, CE-CNN, Partial-CE, VP-CE v1.2 and v1.0);
``train``: the training loop with the KL term, batch-norm recomputation and prediction.
"""
