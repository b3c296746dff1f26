"""ASE: time-dependent early exiting for a diffusion transformer (Moon et al., ICML 2024).

The score network is diffusers' class-conditional ``DiTTransformer2DModel``.  ASE replaces its forward
pass by an *early-exit* forward: at diffusion time t only the first e(t) of the L transformer blocks run,
then the model's own final norm/projection head (Sec. 3 of the paper):

    eps_theta^{e(t)}(x_t, t, y) = FinalLayer(B_{e(t)} o ... o B_1(PatchEmbed(x_t) + pos, c), c),  c = emb(t, y)

e(t) is a step function over equal bins of the training time range [0, T): more blocks near the data end
(small t), fewer near the noise end.  The model is then fine-tuned for that schedule with the usual
noise-prediction loss evaluated on the early-exited output (all weights but the timestep embedders,
AdamW, EMA).  Sampling uses diffusers' schedulers unchanged: only eps_theta changes, so any solver works.

Pure torch: no file I/O, no tracking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The paper's released DiT-XL/2 schedule (28 blocks, 10 bins of t in [0, 1000)), mean 20/28 blocks.
PAPER_DIT_XL2_SCHEDULE = (28, 28, 24, 24, 20, 20, 16, 16, 12, 12)


# -------------------- The exit schedule e(t) ----------------------------------------------------
@dataclass(frozen=True)
class ExitSchedule:
    """Number of transformer blocks to run for each of ``len(blocks)`` equal bins of t in [0, T).

    ``blocks[0]`` is used for the data end (t near 0), ``blocks[-1]`` for the noise end (t near T).
    Validated on construction: the right number of bins, integers, between 1 and ``num_layers``.
    """

    blocks: tuple[int, ...]
    num_layers: int
    num_train_timesteps: int = 1000
    n_bins: int = 10

    def __post_init__(self) -> None:
        blocks = self.blocks
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Iterable):
            raise ValueError(f"exit schedule must be a list of {self.n_bins} block counts, got {blocks!r}")
        blocks = tuple(blocks)
        if len(blocks) != self.n_bins:
            raise ValueError(
                f"exit schedule has {len(blocks)} entries, expected {self.n_bins} (one block count per time bin)"
            )
        for i, b in enumerate(blocks):
            if isinstance(b, bool) or not isinstance(b, int):
                raise ValueError(f"exit schedule entry {i} is {b!r}: block counts must be integers")
            if b < 1:
                raise ValueError(f"exit schedule entry {i} is {b}: every time bin must run at least 1 block")
            if b > self.num_layers:
                raise ValueError(
                    f"exit schedule entry {i} asks for {b} blocks but the model has only {self.num_layers}"
                )
        if self.num_train_timesteps < self.n_bins:
            raise ValueError("num_train_timesteps must be at least the number of time bins")
        object.__setattr__(self, "blocks", blocks)

    @classmethod
    def full(cls, num_layers: int, num_train_timesteps: int = 1000, n_bins: int = 10) -> "ExitSchedule":
        """The schedule that keeps every block at every t (the full model)."""
        return cls((num_layers,) * n_bins, num_layers, num_train_timesteps, n_bins)

    def reversed(self) -> "ExitSchedule":
        """Same blocks per bin in the opposite time order: fewer blocks near the data end (ablation)."""
        return ExitSchedule(self.blocks[::-1], self.num_layers, self.num_train_timesteps, self.n_bins)

    def time_bin(self, t: torch.Tensor) -> torch.Tensor:
        """Bin index of each timestep: floor(t * n_bins / T), clamped to [0, n_bins - 1]."""
        t = torch.as_tensor(t)
        b = torch.div(t.double() * self.n_bins, self.num_train_timesteps, rounding_mode="floor").long()
        return b.clamp_(0, self.n_bins - 1)

    def blocks_at(self, t: torch.Tensor | int | float) -> torch.Tensor:
        """e(t): the number of blocks to run at each timestep (same shape as ``t``)."""
        table = torch.tensor(self.blocks, dtype=torch.long)
        return table[self.time_bin(t)]

    @property
    def mean_blocks(self) -> float:
        """Average block count under uniform coverage of t (the compute the schedule keeps)."""
        return sum(self.blocks) / self.n_bins

    @property
    def compute_fraction(self) -> float:
        return self.mean_blocks / self.num_layers

    @property
    def is_full(self) -> bool:
        return all(b == self.num_layers for b in self.blocks)


def schedule_for(model: nn.Module, blocks: Sequence[int] | None, num_train_timesteps: int = 1000,
                 n_bins: int = 10) -> ExitSchedule:
    """Build and validate a schedule against ``model``'s depth; ``None`` means the full model."""
    num_layers = len(model.transformer_blocks)
    if blocks is None:
        return ExitSchedule.full(num_layers, num_train_timesteps, n_bins)
    return ExitSchedule(tuple(blocks), num_layers, num_train_timesteps, n_bins)


# -------------------- The early-exit forward ----------------------------------------------------
def _output_head(model: nn.Module, h: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor):
    """DiT's final adaLN norm + linear + unpatchify, exactly as ``DiTTransformer2DModel.forward`` does it.

    The output head reuses block 0's timestep/label embedder (diffusers keeps one embedder per block).
    """
    conditioning = model.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=h.dtype)
    shift, scale = model.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
    h = model.norm_out(h) * (1 + scale[:, None]) + shift[:, None]
    h = model.proj_out_2(h)
    p, c = model.patch_size, model.out_channels
    side = int(h.shape[1] ** 0.5)
    h = h.reshape(-1, side, side, p, p, c)
    h = torch.einsum("nhwpqc->nchpwq", h)
    return h.reshape(-1, c, side * p, side * p)


def _run_block(block: nn.Module, h, timestep, class_labels):
    return block(h, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                 timestep=timestep, cross_attention_kwargs=None, class_labels=class_labels)


def early_exit_forward(model: nn.Module, x: torch.Tensor, timestep: torch.Tensor,
                       class_labels: torch.Tensor, schedule: ExitSchedule) -> torch.Tensor:
    """eps_theta^{e(t)}(x, t, y) for a diffusers ``DiTTransformer2DModel``.

    Each sample runs its first e(t_i) blocks.  When a batch mixes exits (training), block k only runs on
    the samples that still need it, so no block output is computed and thrown away.  When every sample
    keeps every block the computation is the model's own forward, operation for operation.
    """
    if timestep.ndim == 0:
        timestep = timestep.expand(x.shape[0])
    exits = schedule.blocks_at(timestep.detach().cpu()).to(x.device)
    max_exit = int(exits.max())
    all_same = bool((exits == max_exit).all())

    h = model.pos_embed(x)
    for k in range(max_exit):
        block = model.transformer_blocks[k]
        if all_same:
            h = _run_block(block, h, timestep, class_labels)
        else:
            idx = torch.nonzero(exits > k, as_tuple=True)[0]
            if idx.numel() == h.shape[0]:
                h = _run_block(block, h, timestep, class_labels)
            else:
                h = h.index_copy(0, idx, _run_block(block, h[idx], timestep[idx], class_labels[idx]))
    return _output_head(model, h, timestep, class_labels)


class EarlyExitDenoiser(nn.Module):
    """eps-prediction with an exit schedule, counting block evaluations per sample.

    ``in_channels`` of the output are kept: a DiT with learned sigma (``out_channels = 2 * in_channels``,
    as DiT-XL/2) returns [eps, sigma]; the samplers use eps only, as diffusers' DiTPipeline does.
    """

    def __init__(self, model: nn.Module, schedule: ExitSchedule):
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.block_evaluations = 0  # sum over samples and calls of the blocks run
        self.samples_seen = 0

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        if timestep.ndim == 0:
            timestep = timestep.expand(x.shape[0])
        self.block_evaluations += int(self.schedule.blocks_at(timestep.detach().cpu()).sum())
        out = early_exit_forward(self.model, x, timestep, class_labels, self.schedule)
        return out[:, : x.shape[1]]

    def reset_counter(self) -> None:
        self.block_evaluations = 0


def block_evaluations_per_image(schedule: ExitSchedule, timesteps: Iterable, guidance: bool = False) -> float:
    """Blocks run per generated image along a sampler's timesteps (x2 with classifier-free guidance)."""
    total = float(sum(int(schedule.blocks_at(torch.as_tensor(t))) for t in timesteps))
    return total * (2 if guidance else 1)


# ---------- Training: DiT init, label dropout, frozen time embedder, the loss on the exited output ----------
def dit_init_(model: nn.Module) -> nn.Module:
    """DiT's initialisation for training from scratch (diffusers expects pretrained weights instead).

    Xavier-uniform linears, N(0, 0.02) timestep MLP and label table, and adaLN-Zero: the modulation of
    every block and of the output head, and the output projection, start at zero.
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = model.pos_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.pos_embed.proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for lin in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
    return model


def label_embeddings(model: nn.Module) -> list[nn.Module]:
    return [block.norm1.emb.class_embedder for block in model.transformer_blocks]


def disable_per_block_label_dropout(model: nn.Module) -> int:
    """Stop each block's label embedder from dropping labels on its own random draw.

    diffusers' DiT has one label embedder per block and each drops labels independently in training
    mode, so a sample could be conditional in one block and unconditional in the next.  Labels are
    dropped once per sample instead (``drop_labels``).  Returns the "no label" id (num_classes).
    """
    embs = label_embeddings(model)
    for e in embs:
        e.dropout_prob = 0.0
    return embs[0].num_classes


def drop_labels(labels: torch.Tensor, p: float, null_label: int, generator: torch.Generator | None = None):
    """Replace each label by the "no label" id with probability p (classifier-free guidance training)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def freeze_time_embedders(model: nn.Module) -> list[nn.Parameter]:
    """The paper's fine-tuning trains all weights but the timestep embedder (every block's copy of it).

    Returns the parameters left trainable.
    """
    for block in model.transformer_blocks:
        for prm in block.norm1.emb.timestep_embedder.parameters():
            prm.requires_grad_(False)
    return [prm for prm in model.parameters() if prm.requires_grad]


def noise_prediction_loss(model: nn.Module, schedule: ExitSchedule, noise_scheduler, x0: torch.Tensor,
                          labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """L = E_{t, x0, eps} || eps - eps_theta^{e(t)}(x_t, t, y) ||^2, t ~ U{0..T-1} (lambda_t = 1)."""
    b = x0.shape[0]
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = noise_scheduler.add_noise(x0, noise, t)
    pred = early_exit_forward(model, x_t, t, labels, schedule)[:, : x0.shape[1]]
    return F.mse_loss(pred, noise)


@dataclass
class FitConfig:
    """Every training setting of ``fit_denoiser`` (the stages fill it from params.yaml)."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    ema_decay: float
    label_dropout: float
    freeze_time_embedder: bool
    grad_clip: float | None
    lr_schedule: str = "constant"  # after the warm-up: "constant" or "cosine" (to zero at the last step)


def lr_factor(step: int, cfg: FitConfig) -> float:
    """The learning-rate multiplier at ``step``: linear warm-up, then constant or a cosine decay to zero."""
    warm = max(cfg.warmup_steps, 0)
    if step < warm:
        return (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, cfg.steps - warm))))
    raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}: expected constant or cosine")


def fit_denoiser(model: nn.Module, schedule: ExitSchedule, noise_scheduler, x: torch.Tensor,
                 y: torch.Tensor, cfg: FitConfig, generator: torch.Generator,
                 on_step: Callable[[int, float], None] | None = None, steps_iter: Iterable[int] | None = None):
    """Train ``model`` in place for ``schedule`` (pretraining: the full schedule; ASE: the exit schedule).

    AdamW with linear warm-up (then constant or cosine, ``lr_factor``); EMA of the weights via diffusers' ``EMAModel`` (with its warm-up so
    early averages are not dominated by the initial weights).  Returns the EMA model (a copy).
    """
    import copy

    from diffusers.training_utils import EMAModel

    null_label = disable_per_block_label_dropout(model)
    if cfg.freeze_time_embedder:
        params = freeze_time_embedders(model)
    else:
        params = [prm for prm in model.parameters() if prm.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
    model.train()
    n = x.shape[0]
    for step in (steps_iter if steps_iter is not None else range(cfg.steps)):
        idx = torch.randint(0, n, (cfg.batch_size,), generator=generator)
        xb, yb = x[idx], drop_labels(y[idx], cfg.label_dropout, null_label, generator)
        loss = noise_prediction_loss(model, schedule, noise_scheduler, xb, yb, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        ema.step(model.parameters())
        if on_step is not None:
            on_step(step, loss.item())
    model.eval()
    ema_model = copy.deepcopy(model)
    ema.copy_to(ema_model.parameters())
    for prm in ema_model.parameters():
        prm.requires_grad_(True)
    return ema_model


# -------------------- Sampling with diffusers schedulers ----------------------------------------
@torch.no_grad()
def sample(denoiser: Callable, scheduler, labels: torch.Tensor, shape: tuple[int, ...], num_inference_steps: int,
           generator: torch.Generator, guidance_scale: float = 1.0, null_label: int | None = None,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Ancestral/ODE sampling with any diffusers scheduler (DDPM, DDIM, DPM-Solver++): only eps changes.

    ``guidance_scale > 1`` applies classifier-free guidance with the "no label" id ``null_label``.
    """
    scheduler.set_timesteps(num_inference_steps)
    x = torch.randn((labels.shape[0], *shape), generator=generator).to(device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = _solver_step(denoiser, scheduler, x, t, labels, generator, guidance_scale, null_label, device)
    return x


def _solver_step(denoiser: Callable, scheduler, x: torch.Tensor, t, labels: torch.Tensor,
                 generator: torch.Generator, guidance_scale: float, null_label: int | None, device) -> torch.Tensor:
    """One solver step: eps from the denoiser (with classifier-free guidance when > 1), then the scheduler."""
    b = labels.shape[0]
    labels = labels.to(device)
    xin = scheduler.scale_model_input(x, t)
    if guidance_scale != 1.0:
        if null_label is None:
            raise ValueError("classifier-free guidance needs the null label id")
        labels_in = torch.cat([labels, torch.full_like(labels, null_label)])
        eps_c, eps_u = denoiser(torch.cat([xin, xin]), t.expand(2 * b).to(device), labels_in).chunk(2)
        eps = eps_u + guidance_scale * (eps_c - eps_u)
    else:
        eps = denoiser(xin, t.expand(b).to(device), labels)
    return scheduler.step(eps, t, x, generator=generator).prev_sample


def sampling_grid(denoisers: dict[str, "EarlyExitDenoiser"], samplers: dict[str, int], labels: torch.Tensor,
                  shape: tuple[int, ...], seeds: Sequence[int], batch_size: int, guidance_scale: float = 1.0,
                  null_label: int | None = None, device: torch.device | str = "cpu", warmup: bool = True,
                  on_done: Callable[[str, str, int], None] | None = None, timing_passes: int = 1,
                  timed: Sequence[str] | None = None) -> dict:
    """Sample every (seed, sampler, variant) and time it, interleaving variants (speed is measured in one
    process, same batch size, variant order rotated per seed so drift and warm-up do not favour one); every
    variant of a (seed, sampler) pair starts from the same noise and labels (paired comparison). With
    ``timing_passes`` > 1 the ``timed`` variants (default: all) sample each batch again, timing only, and a
    solver step's time is its minimum over the passes (as ``timeit``: a disturbance only adds time).
    Returns {(seed, sampler, variant): {"images", "seconds", "images_per_s", "blocks_per_image", "timing_passes"}}.
    """
    names = list(denoisers)
    timed = names if timed is None else list(timed)
    if timing_passes < 1 or not set(timed) <= set(names):
        raise ValueError(f"timing_passes must be >= 1 (got {timing_passes}) and the timed variants {timed} "
                         f"among the denoisers {names}")
    if warmup:  # one small untimed run per variant and sampler: allocations, lazy init, caches
        for sampler_name, steps in samplers.items():
            for name in names:
                sample(denoisers[name], make_scheduler(sampler_name), labels[: min(8, len(labels))], shape,
                       min(steps, 3), torch.Generator().manual_seed(0), guidance_scale, null_label, device)
    out = {}
    for si, seed in enumerate(seeds):
        for sampler_name, steps in samplers.items():
            for den in denoisers.values():
                den.reset_counter()
            gens = {name: torch.Generator().manual_seed(int(seed)) for name in names}
            imgs = {name: [] for name in names}
            seconds = dict.fromkeys(names, 0.0)
            for i in range(0, len(labels), batch_size):
                start = {name: gens[name].get_state() for name in timed}  # this batch's noise, for the repeats
                res, secs = _sample_lockstep(denoisers, sampler_name, labels[i:i + batch_size], shape, steps, gens,
                                             guidance_scale, null_label, device, rotate=si)
                blocks_after = {name: denoisers[name].block_evaluations for name in names}
                for extra in range(1, timing_passes):  # the same batch again, timing only
                    again = {name: torch.Generator().set_state(start[name]) for name in timed}
                    _, secs_r = _sample_lockstep({name: denoisers[name] for name in timed}, sampler_name,
                                                 labels[i:i + batch_size], shape, steps, again, guidance_scale,
                                                 null_label, device, rotate=si + extra)
                    secs.update({name: [min(a, b) for a, b in zip(secs[name], secs_r[name])] for name in timed})
                for name in names:
                    denoisers[name].block_evaluations = blocks_after[name]  # count the first pass only
                    imgs[name].append(res[name].cpu())
                    seconds[name] += sum(secs[name])
            n = len(labels)
            for name in names:
                out[(seed, sampler_name, name)] = {
                    "images": torch.cat(imgs[name]), "seconds": seconds[name],
                    "images_per_s": n / seconds[name],
                    "blocks_per_image": denoisers[name].block_evaluations / n,
                    "timing_passes": timing_passes if name in timed else 1}
                if on_done is not None:
                    on_done(sampler_name, name, int(seed))
    return out


@torch.no_grad()
def _sample_lockstep(denoisers: dict, sampler_name: str, labels: torch.Tensor, shape: tuple[int, ...], steps: int,
                     gens: dict, guidance_scale: float, null_label: int | None, device, rotate: int = 0):
    """``sample`` for every variant at once, advancing them one solver step at a time in rotating order
    and timing each variant's own steps: a slow-down of the machine that lasts longer than one step hits
    every variant alike, so the speed ratios stay fair on a busy machine. Each variant keeps its own
    scheduler and generator (images exactly those of ``sample``); returns them and each step's seconds."""
    import time

    names = list(denoisers)
    sync = torch.cuda.is_available() and str(device).startswith("cuda")
    states = {}
    for name in names:
        sch = make_scheduler(sampler_name)
        sch.set_timesteps(steps)
        x = torch.randn((labels.shape[0], *shape), generator=gens[name]).to(device) * sch.init_noise_sigma
        states[name] = [sch, x]
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for k, t in enumerate(states[names[0]][0].timesteps):
        shift = (rotate + k) % len(names)
        for name in names[shift:] + names[:shift]:
            sch, x = states[name]
            t0 = time.perf_counter()
            states[name][1] = _solver_step(denoisers[name], sch, x, t, labels, gens[name], guidance_scale,
                                           null_label, device)
            if sync:
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - t0)
    return {name: states[name][1] for name in names}, seconds


def make_scheduler(name: str, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                   beta_start: float = 1e-4, beta_end: float = 0.02):
    """The three solvers of the paper, from diffusers, sharing one training noise schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                  beta_start=beta_start, beta_end=beta_end)
    if name == "ddpm":
        return DDPMScheduler(**common, clip_sample=False, variance_type="fixed_small")
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    if name == "dpm_solver":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown sampler {name!r}: expected one of ddpm, ddim, dpm_solver")


SAMPLERS = ("ddpm", "ddim", "dpm_solver")


def tiny_dit(num_layers: int = 6, hidden: int = 64, heads: int = 4, sample_size: int = 16, patch_size: int = 4,
             in_channels: int = 1, num_classes: int = 10):
    """A small class-conditional DiT from diffusers (the CPU-scale score network)."""
    from diffusers import DiTTransformer2DModel

    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=in_channels,
        out_channels=in_channels, num_layers=num_layers, sample_size=sample_size, patch_size=patch_size,
        num_embeds_ada_norm=num_classes, norm_type="ada_norm_zero",
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "PAPER_DIT_XL2_SCHEDULE", "ExitSchedule", "schedule_for", "early_exit_forward", "EarlyExitDenoiser",
    "block_evaluations_per_image", "dit_init_", "disable_per_block_label_dropout", "drop_labels",
    "freeze_time_embedders", "noise_prediction_loss", "FitConfig", "lr_factor", "fit_denoiser", "sample",
    "make_scheduler", "sampling_grid", "SAMPLERS", "tiny_dit", "count_parameters",
]
