"""ASE (early exiting in a diffusion transformer) stages: prepare -> pretrain -> finetune -> evaluate.

CPU scale: scikit-learn digits upsampled to 16x16, a tiny class-conditional ``DiTTransformer2DModel``
trained from scratch, FD-proxy in a small digit classifier's feature space.  Paper scale: DiT-XL/2 loaded
with ``from_pretrained`` from a local folder, SD-VAE latents of ImageNet prepared as a local file, the
paper's schedule; the same code path (tests run it on a tiny saved DiT).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from tasks.core import Params, StageContext, stage
from tasks.core import io
from tasks.core.errors import MissingInputError

PAPER = "early_exit_diffusion"
VARIANTS_FINETUNED = ("ase", "reversed", "full_control", "uniform")


def _check_schedule_list(v):
    if v is None:
        return v
    if not isinstance(v, list) or any(isinstance(b, bool) or not isinstance(b, int) for b in v):
        raise ValueError(f"exit schedule must be a list of integer block counts, got {v!r}")
    return v


# ----------------------------------------------------------------------------------------- prepare
class PrepareParams(Params):
    source: Literal["digits", "latents"] = Field(
        description="digits (CPU scale) or a local .npz of VAE latents 'x' [N,C,H,W] and labels 'y' (paper)")
    latents_path: str | None = Field(None, description="paper scale: .npz with arrays x (latents x 0.18215) and y")
    image_size: int = Field(16, ge=8, description="digits are upsampled from 8x8 to this size")
    test_fraction: float = Field(gt=0, lt=0.5, description="held-out real images for the FD-proxy")
    max_images: int | None = Field(None, gt=0, description="cap on images (smoke scale)")
    classifier_epochs: int = Field(gt=0, description="epochs of the feature classifier (FD-proxy)")

    @model_validator(mode="after")
    def _paths(self):
        if self.source == "latents" and not self.latents_path:
            raise ValueError("source 'latents' needs 'latents_path'")
        if self.image_size % 4:
            raise ValueError("image_size must be divisible by 4")
        return self


@stage(PAPER, "prepare", params=PrepareParams)
def prepare(ctx: StageContext, p: PrepareParams) -> None:
    """Class-conditional training images in [-1, 1], a held-out split, and the FD-proxy classifier."""
    import torch

    from tasks.data.digit_features import classifier_features, train_digit_classifier
    from tasks.data.digits import stratified_split
    from tasks.metrics import frechet_distance

    if p.source == "digits":
        from tasks.data.digits import load_digits_array

        x, y = load_digits_array(p.image_size)
        x = x[:, None] * 2.0 - 1.0
    else:
        path = Path(p.latents_path)
        if not path.is_file():
            raise MissingInputError(f"'{PAPER}.prepare.latents_path' = '{path}' does not exist. Encode the "
                                    f"ImageNet train folder with the SD VAE (see docs/{PAPER}.md) into an "
                                    f".npz with arrays x (latents x 0.18215) and y.")
        arrays = io.load_arrays(path)
        x, y = arrays["x"].astype(np.float32), arrays["y"].astype(np.int64)
    if p.max_images:
        keep = np.random.default_rng(ctx.seed).permutation(len(y))[: p.max_images]
        x, y = x[np.sort(keep)], y[np.sort(keep)]
    splits = stratified_split(y, {"test": p.test_fraction}, ctx.seed)
    xt, yt = torch.from_numpy(x[splits["train"]]), torch.from_numpy(y[splits["train"]])
    xe, ye = torch.from_numpy(x[splits["test"]]), torch.from_numpy(y[splits["test"]])

    clf = train_digit_classifier(xt, yt, epochs=p.classifier_epochs, seed=ctx.seed, num_classes=int(y.max()) + 1)
    f_train, _ = classifier_features(clf, xt)
    f_test, pred = classifier_features(clf, xe)
    acc = float((pred == ye).float().mean())
    floor = frechet_distance(f_train.numpy(), f_test.numpy())
    ctx.log_metrics({"classifier_test_accuracy": acc, "fd_proxy_floor": floor})

    from safetensors.torch import save

    with io.atomic_file(ctx.out_dir / "classifier.safetensors", "wb") as fh:
        fh.write(save({k: v.contiguous() for k, v in clf.state_dict().items()}))
    io.save_arrays(ctx.out_dir / "data.npz", x_train=xt.numpy(), y_train=yt.numpy(), x_test=xe.numpy(),
                   y_test=ye.numpy())
    io.write_json(ctx.out_dir / "meta.json", {
        "source": p.source, "shape": list(x.shape[1:]), "num_classes": int(y.max()) + 1,
        "n_train": len(yt), "n_test": len(ye), "classifier_test_accuracy": acc, "fd_proxy_floor": floor,
        "pixel_range": [-1.0, 1.0] if p.source == "digits" else None})


def load_prepared(folder: Path):
    import torch

    from tasks.data.digit_features import DigitClassifier

    data = {k: torch.from_numpy(v) for k, v in io.load_arrays(folder / "data.npz").items()}
    meta = io.read_json(folder / "meta.json")
    from safetensors.torch import load_file

    c, s = meta["shape"][0], meta["shape"][-1]
    clf = DigitClassifier(size=s, num_classes=meta["num_classes"], in_channels=c)
    clf.load_state_dict(load_file(str(folder / "classifier.safetensors")))
    return data, meta, clf.eval()


# ---------------------------------------------------------------------------------------- pretrain
class PretrainParams(Params):
    init: Literal["scratch", "pretrained"] = Field(
        description="scratch: train a small DiT here (CPU); pretrained: from_pretrained(model_dir) (paper)")
    model_dir: str | None = Field(None, description="paper scale: local DiTTransformer2DModel folder")
    subfolder: str | None = Field(None, description="e.g. 'transformer' for a DiTPipeline folder")
    num_layers: int = Field(6, gt=0)
    hidden: int = Field(64, gt=0)
    heads: int = Field(4, gt=0)
    patch_size: int = Field(4, gt=0)
    steps: int = Field(ge=0, description="training steps from scratch (0 with init: pretrained)")
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    ema_decay: float = Field(gt=0, lt=1)
    label_dropout: float = Field(ge=0, lt=1, description="classifier-free guidance label dropout")

    @model_validator(mode="after")
    def _check(self):
        if self.init == "pretrained" and not self.model_dir:
            raise ValueError("init 'pretrained' needs 'model_dir'")
        if self.init == "scratch" and self.steps == 0:
            raise ValueError("init 'scratch' needs steps > 0")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        return self


def load_dit(folder: Path, subfolder: str | None = None):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel.from_pretrained(str(folder), subfolder=subfolder)


def noise_scheduler_config() -> dict:
    """The training noise schedule shared by every stage (DiT / ADM: 1000 linear betas)."""
    return dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


@stage(PAPER, "pretrain", params=PretrainParams, inputs=("prepare",), gpu=True)
def pretrain(ctx: StageContext, p: PretrainParams) -> None:
    """The full-depth DiT: trained from scratch (CPU) or loaded from a local folder (paper)."""
    import torch

    from models.early_exit_diffusion import FitConfig, dit_init_, fit_denoiser, make_scheduler, schedule_for, tiny_dit

    data, meta, _ = load_prepared(ctx.input("prepare"))
    if p.init == "pretrained":
        if not Path(p.model_dir).is_dir():
            raise MissingInputError(f"'{PAPER}.pretrain.model_dir' = '{p.model_dir}' does not exist. Point it "
                                    f"at a local DiTTransformer2DModel folder (save_pretrained layout).")
        model = load_dit(Path(p.model_dir), p.subfolder)
        if model.config.in_channels != meta["shape"][0] or model.config.sample_size != meta["shape"][-1]:
            raise MissingInputError(f"the DiT in '{p.model_dir}' takes {model.config.in_channels}x"
                                    f"{model.config.sample_size}^2 inputs but the prepared data is {meta['shape']}")
        losses = []
    else:
        torch.manual_seed(ctx.seed)
        model = dit_init_(tiny_dit(p.num_layers, p.hidden, p.heads, meta["shape"][-1], p.patch_size,
                                   meta["shape"][0], meta["num_classes"]))
        x, y = data["x_train"].float().to(ctx.device), data["y_train"].to(ctx.device)
        model.to(ctx.device)
        losses = []

        def on_step(i, loss):
            losses.append(loss)
            if i % 50 == 0 or i == p.steps - 1:
                ctx.log_metrics({"pretrain_loss": float(np.mean(losses[-50:]))}, step=i)

        cfg = FitConfig(steps=p.steps, batch_size=p.batch_size, lr=p.lr, warmup_steps=p.warmup_steps,
                        ema_decay=p.ema_decay, label_dropout=p.label_dropout)
        model = fit_denoiser(model, schedule_for(model, None), make_scheduler("ddpm", **noise_scheduler_config()), x, y, cfg,
                             torch.Generator(device="cpu").manual_seed(ctx.seed), on_step=on_step,
                             steps_iter=ctx.progress(range(p.steps), desc="pretrain"))
    model.to("cpu").save_pretrained(ctx.out_dir / "model", safe_serialization=True)
    io.write_json(ctx.out_dir / "meta.json", {
        "init": p.init, "num_layers": len(model.transformer_blocks), "parameters": sum(q.numel() for q in model.parameters()),
        "final_loss": float(np.mean(losses[-100:])) if losses else None})


# ---------------------------------------------------------------------------------------- finetune
class FinetuneParams(Params):
    schedule: list[int] = Field(description="ASE exit schedule: blocks per t-bin, data end (small t) first")
    variants: list[Literal["ase", "reversed", "full_control", "uniform"]] = Field(
        min_length=1, description="fine-tuned variants: ase (the schedule), reversed (the schedule backwards), "
                                  "full_control (no exits, same steps), uniform (constant round(mean) blocks)")
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    ema_decay: float = Field(gt=0, lt=1)
    label_dropout: float = Field(ge=0, lt=1)
    freeze_time_embedder: bool = Field(description="the paper trains all weights but the timestep embedder")
    seeds: list[int] = Field(min_length=1, description="one fine-tuning run per variant and seed")
    workers: int = Field(1, gt=0, description="processes running (variant, seed) fine-tunings in parallel, "
                                              "one torch thread each (CPU: one per core; GPU: 1)")

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule(cls, v):
        return _check_schedule_list(v)

    @field_validator("variants")
    @classmethod
    def _variants(cls, v):
        if "ase" not in v:
            raise ValueError("variants must include 'ase'")
        if len(set(v)) != len(v):
            raise ValueError("variants must not repeat")
        return v


def variant_schedule(name: str, model, blocks: list[int]):
    """The exit schedule of a named variant (validated against the model's depth)."""
    from models.early_exit_diffusion import ExitSchedule, schedule_for

    ase = schedule_for(model, blocks)
    if name in ("ase", "naive"):
        return ase
    if name == "reversed":
        return ase.reversed()
    if name in ("full", "full_control"):
        return schedule_for(model, None)
    if name == "uniform":
        return ExitSchedule((max(1, round(ase.mean_blocks)),) * ase.n_bins, ase.num_layers)
    raise ValueError(f"unknown variant {name!r}")


@stage(PAPER, "finetune", params=FinetuneParams, inputs=("prepare", "pretrain"), gpu=True)
def finetune(ctx: StageContext, p: FinetuneParams) -> None:
    """ASE fine-tuning of the pretrained DiT for its exit schedule (and the ablations), per seed."""
    base = load_dit(ctx.input("pretrain") / "model")
    for v in p.variants:  # validates every schedule against the model before any compute
        variant_schedule(v, base, p.schedule)
    jobs = [dict(seed=seed, variant=v, prepare=str(ctx.input("prepare")), pretrain=str(ctx.input("pretrain")),
                 out=str(ctx.out_dir / f"{v}_seed{seed}"), device=str(ctx.device), params=p.model_dump(mode="json"))
            for seed in p.seeds for v in p.variants]

    def log(i: int, res: dict) -> None:
        for step, loss in res.pop("curve"):
            ctx.log_metrics({f"loss_{res['tag']}": loss}, step=step)

    runs = ctx.map(finetune_one, jobs, workers=p.workers, desc="fine-tuning runs", on_result=log)
    io.write_json(ctx.out_dir / "meta.json", {
        "schedule": p.schedule, "variants": p.variants, "seeds": p.seeds,
        "runs": {r["tag"]: {"schedule": r["schedule"], "final_loss": r["final_loss"]} for r in runs}})


def finetune_one(job: dict) -> dict:
    """One (variant, seed) fine-tuning run; top-level so that worker processes can run it."""
    import os

    import torch
    from tqdm.auto import tqdm

    from models.early_exit_diffusion import FitConfig, fit_denoiser, make_scheduler

    p = FinetuneParams(**job["params"])
    seed, name, device = job["seed"], job["variant"], torch.device(job["device"])
    data, _, _ = load_prepared(Path(job["prepare"]))
    base = load_dit(Path(job["pretrain"]) / "model").to(device)
    sched = variant_schedule(name, base, p.schedule)
    x, y = data["x_train"].float().to(device), data["y_train"].to(device)
    cfg = FitConfig(steps=p.steps, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                    ema_decay=p.ema_decay, label_dropout=p.label_dropout,
                    freeze_time_embedder=p.freeze_time_embedder)
    tag = f"{name}_seed{seed}"
    torch.manual_seed(seed)
    losses, curve = [], []

    def on_step(i, loss):
        losses.append(loss)
        if i % 50 == 0 or i == p.steps - 1:
            curve.append((i, float(np.mean(losses[-50:]))))

    steps = tqdm(range(p.steps), desc=f"{PAPER}-finetune {tag}", mininterval=5.0,
                 disable=os.environ.get("PAPERFLOWS_NO_PROGRESS") == "1")
    model = fit_denoiser(base, sched, make_scheduler("ddpm", **noise_scheduler_config()), x, y, cfg,
                         torch.Generator(device="cpu").manual_seed(10_000 + seed), on_step=on_step,
                         steps_iter=steps)
    model.to("cpu").save_pretrained(job["out"], safe_serialization=True)
    return {"tag": tag, "schedule": list(sched.blocks), "final_loss": float(np.mean(losses[-50:])),
            "curve": curve}


# ---------------------------------------------------------------------------------------- evaluate
class EvaluateParams(Params):
    samplers: dict[Literal["ddpm", "ddim", "dpm_solver"], int] = Field(
        min_length=1, description="sampler -> number of inference steps")
    num_images: int = Field(gt=0, description="images per (variant, sampler, seed); labels cycle over classes")
    batch_size: int = Field(gt=0, description="sampling batch size (the same for every variant)")
    guidance_scale: float = Field(ge=1.0, description="classifier-free guidance (1: off)")
    speedup_threshold: float = Field(gt=0, description="claim ase_faster: ASE images/s >= this x full")
    quality_tolerance: float = Field(gt=0, description="claim ase_quality_kept: ASE FD <= this x full")
    grid_sampler: Literal["ddpm", "ddim", "dpm_solver"] = Field(description="sampler for the sample grid plot")
    workers: int = Field(1, gt=0, description="processes sampling seeds in parallel, one torch thread each; "
                                              "speed ratios stay within one process (interleaved)")

    @model_validator(mode="after")
    def _grid(self):
        if self.grid_sampler not in self.samplers:
            raise ValueError(f"grid_sampler '{self.grid_sampler}' is not one of samplers {list(self.samplers)}")
        return self


@stage(PAPER, "evaluate", params=EvaluateParams, inputs=("prepare", "pretrain", "finetune"), gpu=True)
def evaluate(ctx: StageContext, p: EvaluateParams) -> None:
    """Images/s, block evaluations per image, FD-proxy and label accuracy per sampler and variant."""
    meta = io.read_json(ctx.input("prepare") / "meta.json")
    ft_meta = io.read_json(ctx.input("finetune") / "meta.json")
    base = load_dit(ctx.input("pretrain") / "model")
    seeds = ft_meta["seeds"]
    blocks = ft_meta["schedule"]
    jobs = [dict(seed=seed, prepare=str(ctx.input("prepare")), pretrain=str(ctx.input("pretrain")),
                 finetune=str(ctx.input("finetune")), device=str(ctx.device), params=p.model_dump(mode="json"),
                 grid=(seed == seeds[0])) for seed in seeds]

    def log(i: int, res: dict) -> None:
        ctx.log_metrics({f"{r['sampler']}_{r['variant']}_fd_proxy": r["fd_proxy"] for r in res["rows"]},
                        step=int(res["seed"]))

    results = ctx.map(evaluate_seed, jobs, workers=p.workers, desc="sampling (seeds)", on_result=log)
    rows = [r for res in results for r in res["rows"]]
    for variant, (sampler, imgs) in results[0]["grid_images"].items():
        _grid_figure(ctx, variant, sampler, imgs, meta)

    summary = summarise(rows, list(p.samplers))
    claims = compute_claims(summary, list(p.samplers), p.speedup_threshold, p.quality_tolerance)
    io.write_json(ctx.results_file("tradeoff.json"), [
        {"sampler": s, "variant": v, "fd_proxy": summary[s][v]["fd_proxy"],
         "images_per_s": summary[s][v]["images_per_s"]} for s in summary for v in summary[s]])
    _tradeoff_figure(ctx, summary)
    ctx.write_metrics({
        "claims": claims,
        "schedule": blocks, "compute_fraction": sum(blocks) / (len(blocks) * len(base.transformer_blocks)),
        "num_layers": len(base.transformer_blocks), "seeds": seeds, "samplers": dict(p.samplers),
        "num_images": p.num_images, "batch_size": p.batch_size,
        "fd_proxy_floor": meta["fd_proxy_floor"], "classifier_test_accuracy": meta["classifier_test_accuracy"],
        "summary": summary, "runs": rows,
        "note": "speed ratios are per seed (interleaved, same batch size, one process) then averaged; "
                "FD-proxy is the mean over seeds; seeds share the pretrained base and vary fine-tuning and "
                "sampling noise; 'naive' is the pretrained model with the ASE schedule and no fine-tuning; "
                "'full_control' is the full model fine-tuned for the same steps without exits."})


def evaluate_seed(job: dict) -> dict:
    """Sample every variant with every sampler for one seed (interleaved, with warm-up, in one process)
    and score it; top-level so that worker processes can run it."""
    import torch

    from models.early_exit_diffusion import EarlyExitDenoiser, sampling_grid
    from tasks.data.digit_features import classifier_features
    from tasks.metrics import frechet_distance

    p = EvaluateParams(**job["params"])
    seed, device = job["seed"], torch.device(job["device"])
    data, meta, clf = load_prepared(Path(job["prepare"]))
    ft_meta = io.read_json(Path(job["finetune"]) / "meta.json")
    blocks = ft_meta["schedule"]
    base = load_dit(Path(job["pretrain"]) / "model").to(device).eval()
    null_label = base.transformer_blocks[0].norm1.emb.class_embedder.num_classes
    f_real = classifier_features(clf, data["x_test"].float())[0].numpy()
    labels = torch.arange(p.num_images) % meta["num_classes"]
    pix = meta.get("pixel_range")
    dens = {"full": EarlyExitDenoiser(base, variant_schedule("full", base, blocks)),
            "naive": EarlyExitDenoiser(base, variant_schedule("naive", base, blocks))}
    for v in ft_meta["variants"]:
        m = load_dit(Path(job["finetune"]) / f"{v}_seed{seed}").to(device).eval()
        dens[v] = EarlyExitDenoiser(m, variant_schedule(v, m, blocks))
    grid = sampling_grid(dens, dict(p.samplers), labels, tuple(meta["shape"]), [seed], p.batch_size,
                         p.guidance_scale, null_label, device, warmup=True)
    rows, grid_images = [], {}
    for (s, sampler, variant), r in grid.items():
        imgs = r["images"].float()
        if pix:
            imgs = imgs.clamp(*pix)
        feats, pred = classifier_features(clf, imgs)
        rows.append({"seed": s, "sampler": sampler, "variant": variant,
                     "fd_proxy": frechet_distance(feats.numpy(), f_real),
                     "label_accuracy": float((pred == labels).float().mean()),
                     "images_per_s": r["images_per_s"], "blocks_per_image": r["blocks_per_image"],
                     "schedule": list(dens[variant].schedule.blocks)})
        if job["grid"] and sampler == p.grid_sampler:
            grid_images[variant] = (sampler, imgs[: 10 * min(8, max(1, p.num_images // 10))].cpu())
    return {"seed": seed, "rows": rows, "grid_images": grid_images}


def summarise(rows: list[dict], samplers: list[str]) -> dict:
    """Per sampler and variant: means over seeds, and per-seed speed ratios to the full model."""
    out: dict = {}
    for s in samplers:
        out[s] = {}
        variants = list(dict.fromkeys(r["variant"] for r in rows if r["sampler"] == s))
        full = {r["seed"]: r for r in rows if r["sampler"] == s and r["variant"] == "full"}
        for v in variants:
            rs = [r for r in rows if r["sampler"] == s and r["variant"] == v]
            out[s][v] = {
                "fd_proxy": float(np.mean([r["fd_proxy"] for r in rs])),
                "fd_proxy_std": float(np.std([r["fd_proxy"] for r in rs])),
                "label_accuracy": float(np.mean([r["label_accuracy"] for r in rs])),
                "images_per_s": float(np.mean([r["images_per_s"] for r in rs])),
                "speedup_vs_full": float(np.mean([r["images_per_s"] / full[r["seed"]]["images_per_s"] for r in rs])),
                "blocks_per_image": float(np.mean([r["blocks_per_image"] for r in rs])),
                "fd_ratio_vs_full": float(np.mean([r["fd_proxy"] for r in rs])
                                          / np.mean([full[r["seed"]]["fd_proxy"] for r in rs])),
            }
    return out


def compute_claims(summary: dict, samplers: list[str], speedup: float, tolerance: float) -> dict[str, bool]:
    """The paper's claims, each required for every sampler, from the numbers in ``summary``."""
    claims = {
        "ase_faster": all(summary[s]["ase"]["speedup_vs_full"] >= speedup for s in samplers),
        "ase_quality_kept": all(summary[s]["ase"]["fd_proxy"] <= tolerance * summary[s]["full"]["fd_proxy"]
                                for s in samplers),
        "finetuning_needed": all(summary[s]["naive"]["fd_proxy"] > summary[s]["ase"]["fd_proxy"] for s in samplers),
    }
    if all("reversed" in summary[s] for s in samplers):
        claims["schedule_direction_matters"] = all(
            summary[s]["reversed"]["fd_proxy"] > summary[s]["ase"]["fd_proxy"] for s in samplers)
    if all("full_control" in summary[s] for s in samplers):
        # stricter: against the full model given the same extra training steps without exits
        claims["ase_quality_kept_vs_equal_steps_full"] = all(
            summary[s]["ase"]["fd_proxy"] <= tolerance * summary[s]["full_control"]["fd_proxy"] for s in samplers)
    return claims


def _grid_figure(ctx: StageContext, variant: str, sampler: str, imgs, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if imgs.shape[1] != 1:  # latents: show the first channel
        imgs = imgs[:, :1]
    n = imgs.shape[0]
    rows = max(1, n // 10)
    fig, axes = plt.subplots(rows, 10, figsize=(10, rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(imgs[i, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
    fig.suptitle(f"{variant} ({sampler}): one column per class")
    ctx.log_figure(fig, f"samples_{variant}.png")


def _tradeoff_figure(ctx: StageContext, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = list(summary)
    fig, axes = plt.subplots(1, len(samplers), figsize=(4.2 * len(samplers), 3.6), squeeze=False)
    for ax, s in zip(axes[0], samplers):
        for v, r in summary[s].items():
            ax.scatter(r["images_per_s"], r["fd_proxy"], s=40)
            ax.annotate(v, (r["images_per_s"], r["fd_proxy"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_title(s)
        ax.set_xlabel("images / s")
        ax.set_ylabel("FD-proxy (lower is better)")
        ax.set_yscale("log")
    fig.tight_layout()
    ctx.log_figure(fig, "tradeoff.png")
