"""What the function_space_bridges stages share: the reference-process and operator settings, model
builders, artifact names."""
from __future__ import annotations

from pydantic import Field

from tasks.core import Params


class ReferenceParams(Params):
    """The OU reference process: A = -c Laplacian + 1 on the unit domain (a_k = c pi^2 |k|^2 + 1), Q = A^-s."""

    laplacian_scale: float = Field(gt=0, description="c: the same on every grid (resolution-free operator)")

    spectrum_exponent: float = Field(gt=0, description="s: Q eigenvalues a_k^-s; trace-class when s > d/2")
    sigma: float = Field(gt=0, description="noise scale of the reference process")


class OperatorParams(Params):
    width: int = Field(gt=0)
    latents: int = Field(gt=0, description="learned latent tokens")
    heads: int = Field(gt=0)
    encoder_blocks: int = Field(gt=0, description="cross-attention + self-attention pairs")
    decoder_blocks: int = Field(gt=0, description="cross-attention blocks of the output queries")
    fourier_features: int = Field(gt=0, description="Gaussian Fourier frequencies of the coordinates")
    fourier_scale: float = Field(gt=0)
    mlp_ratio: int = Field(gt=0)


class ExperimentParams(Params):
    """One bridge experiment (1-D functions or 2-D images): process, operator, IDBM schedule."""

    reference: ReferenceParams
    operator: OperatorParams
    iterations: int = Field(ge=1, description="IDBM iterations (odd: forward, backward, ..., forward)")
    steps_per_iteration: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    ema_decay: float = Field(gt=0, lt=1)
    grad_clip: float = Field(gt=0)
    sampling_steps: int = Field(gt=1, description="sampler steps when building couplings")
    cache_size: int = Field(gt=0, description="paths per coupling cache")
    cache_refresh: int = Field(gt=0, description="training steps between cache refreshes")
    query_points: int = Field(ge=0, description="output points per example in the loss (0: all)")


EXPERIMENTS = ("functions", "images")
MODELS = ("first", "first_equal_steps", "final", "backward")


def reference_process(p: ReferenceParams, shape: tuple[int, ...], device="cpu"):
    from models.function_space_bridges.spectral import SpectralOU

    return SpectralOU(tuple(shape), p.spectrum_exponent, p.sigma, laplacian_scale=p.laplacian_scale,
                      device=str(device))


def operator_config(p: OperatorParams, dim: int, channels: int):
    from models.function_space_bridges.operator import OperatorConfig

    return OperatorConfig(dim, channels, p.width, p.latents, p.heads, p.encoder_blocks, p.decoder_blocks,
                          p.fourier_features, p.fourier_scale, p.mlp_ratio)


def build_operator(p: OperatorParams, dim: int, channels: int, state: dict | None = None, device="cpu"):
    from models.function_space_bridges.operator import OperatorTransformer

    net = OperatorTransformer(operator_config(p, dim, channels))
    if state is not None:
        net.load_state_dict(state)
    return net.to(device).eval() if state is not None else net.to(device)


def weights_file(experiment: str, seed: int, model: str) -> str:
    return f"{experiment}/seed{seed}/{model}.safetensors"


def load_training_data(prepare_dir, experiment: str):
    """(pi_0 train, pi_1 train, dim, channels) as float32 numpy arrays."""
    from tasks.core import io

    if experiment == "functions":
        arrays = io.load_arrays(prepare_dir / "functions.npz")
        return arrays["gp_train"], arrays["density_train"], 1, 1
    arrays = io.load_arrays(prepare_dir / "images.npz")
    return arrays["a_train"], arrays["b_train"], 2, arrays["a_train"].shape[1]


def control_net(grid: int, width: int, depth: int, state: dict | None = None):
    from models.function_space_bridges.posterior import ControlNet

    net = ControlNet(grid, width, depth)
    if state is not None:
        net.load_state_dict(state)
        net.eval()
    return net
