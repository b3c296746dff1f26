"""ACSSM: amortized control of a continuous (linear) state space model for irregular time series.

Park, Lee & Lee, "Amortized Control of Continuous State Space Feynman-Kac Model for Irregular Time
Series", ICLR 2025 (arXiv:2410.05602). Written from the paper's equations; no code was copied.

Data flow (one batch of B irregular series, K time points each, padded at the end):

    (t_k, y_k, mask_k) --ObservationEncoder--> z_k              (Transformer + GRU; full or causal)
    z_k --control--> alpha_k = B z_k                             (amortized control, const. on (t_{k-1}, t_k])
    alpha, dt --LinearLatentSDE.moments--> N(m_k, P_k)           (closed form + associative scan over gaps)
    X_k ~ N(m_k, P_k) --decoder--> p(target_k | X_k)             (Gaussian, fixed variance / categorical)

Loss (negative ELBO, Sec. 3 of the paper): task NLL + lambda_control * 1/2 sum_k ||alpha_k||^2 dt_k
+ lambda_potential * sum_k -log g_k(u_k | X_k), where u_k is the detached observation embedding
(the auxiliary observation of the multi-marginal h-transform potential).

Baselines of the same interface: ``GRUDelta`` (GRU with time-gap inputs) and ``TorchsdeLatentSDE``
(the same encoder and ELBO, but a neural prior drift solved step by step with torchsde's Euler scheme).

Modules (pure torch; no files, no tracking; nothing here imports ``tasks``):
    sde.py       input checks, time gaps, affine parallel scan, ``LinearLatentSDE`` (closed-form moments)
    networks.py  encoder, ELBO, ``ACSSM``, the baselines ``TorchsdeLatentSDE`` and ``GRUDelta``, ``MODELS``
    fit.py       tensors of a split, model construction, the AdamW training loop, predictions
    scores.py    masked MSE, accuracy and the trivial references (last value, linear interpolation)
This file imports nothing, so that each stage depends only on the modules it uses.
"""
