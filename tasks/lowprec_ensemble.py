"""Ex Uno Pluria / LPE-BSR stages: prepare -> train -> ensemble -> evaluate.

CPU scale: scikit-learn digits and a small MLP; paper scale: a pretrained ViT classifier
(`from_pretrained` of a local folder) on a local image folder, with the same ensembling code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from tasks.core import Params, StageContext, stage
from tasks.core import io
from tasks.core.errors import ParamsError

PAPER = "lowprec_ensemble"


# ----------------------------------------------------------------------------------------- prepare
class PrepareParams(Params):
    source: Literal["digits", "image_folder"] = Field(description="digits (CPU) or a local image folder")
    image_folder: str | None = Field(None, description="paper scale: <folder>/<class>/<image>")
    model_dir: str | None = Field(None, description="paper scale: folder with the image processor config")
    max_per_class: int | None = Field(None, gt=0, description="paper scale: cap on images per class")
    val_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _paths(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave a training split (< 1)")
        if self.source == "image_folder" and not (self.image_folder and self.model_dir):
            raise ValueError("source 'image_folder' needs 'image_folder' and 'model_dir'")
        return self


@stage(PAPER, "prepare", params=PrepareParams)
def prepare(ctx: StageContext, p: PrepareParams) -> None:
    """Stratified train/val/test splits of digits (or of a local image folder)."""
    from tasks.data.digits import load_digits_array, stratified_split

    if p.source == "digits":
        x, y = load_digits_array()
        x = x.reshape(len(x), -1)
        classes = [str(i) for i in range(10)]
    else:
        from tasks.data.image_folder import load_image_folder

        x, y, classes = load_image_folder(Path(p.image_folder), Path(p.model_dir), p.max_per_class)
    splits = stratified_split(y, {"test": p.test_fraction, "val": p.val_fraction}, ctx.seed)
    io.save_arrays(ctx.out_dir / "data.npz", **{f"x_{k}": x[v] for k, v in splits.items()},
                   **{f"y_{k}": y[v] for k, v in splits.items()})
    io.write_json(ctx.out_dir / "meta.json", {"classes": classes, "source": p.source,
                                              **{f"n_{k}": len(v) for k, v in splits.items()}})


def load_data(folder: Path):
    import torch

    arrays = io.load_arrays(folder / "data.npz")
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


# ------------------------------------------------------------------------------------------- train
class TrainParams(Params):
    model: Literal["mlp", "pretrained"] = Field(description="mlp (trained here) or a pretrained HF classifier")
    model_dir: str | None = Field(None, description="paper scale: local from_pretrained folder")
    hidden: list[int] = Field(default_factory=lambda: [128, 128], description="MLP hidden widths")
    epochs: int = Field(gt=0, description="epochs of one training run (the training budget unit)")
    lr: float = Field(gt=0, description="SGD learning rate (peak of the cyclic schedule for snapshots)")
    batch_size: int = Field(gt=0)
    weight_decay: float = Field(ge=0)
    seeds: list[int] = Field(min_length=1, description="one trained solution per seed")
    deep_ensemble_size: int = Field(ge=0, description="independent trainings per seed (0: skip)")
    snapshots: int = Field(ge=0, description="snapshot-ensemble cycles within one budget (0: skip)")
    swag_epochs: int = Field(ge=0, description="final epochs whose iterates feed SWAG-diagonal (0: skip)")

    @field_validator("hidden")
    @classmethod
    def _hidden(cls, v):
        if not v or any(h <= 0 for h in v):
            raise ValueError("hidden widths must be positive integers")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.model == "pretrained" and not self.model_dir:
            raise ValueError("model 'pretrained' needs 'model_dir'")
        if self.snapshots == 1:
            raise ValueError("snapshots must be 0 (skip) or >= 2")
        if self.swag_epochs > self.epochs:
            raise ValueError("swag_epochs cannot exceed epochs")
        return self


def build_mlp(meta: dict):
    from models.common.mlp import MLP

    return MLP(meta["in_features"], meta["hidden"], meta["num_classes"])


def save_state(path: Path, state: dict) -> None:
    from safetensors.torch import save

    with io.atomic_file(path, "wb") as fh:
        fh.write(save({k: v.detach().contiguous() for k, v in state.items()}))


def load_state(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@stage(PAPER, "train", params=TrainParams, inputs=("prepare",), gpu=True)
def train(ctx: StageContext, p: TrainParams) -> None:
    """Full-precision solutions per seed, plus deep-ensemble, snapshot and SWAG baselines."""
    import torch

    from models.common.train import fit_classifier
    from models.lowprec_ensemble import SWAGDiagonal, cyclic_cosine_lr

    if p.model == "pretrained":
        from transformers import AutoModelForImageClassification

        if not Path(p.model_dir).is_dir():
            from tasks.core.errors import MissingInputError

            raise MissingInputError(f"'{PAPER}.train.model_dir' = '{p.model_dir}' does not exist. Point "
                                    f"it at a local folder saved with save_pretrained (config.json + "
                                    f"model.safetensors).")
        model = AutoModelForImageClassification.from_pretrained(p.model_dir)
        model.save_pretrained(ctx.out_dir / "pretrained", safe_serialization=True)
        io.write_json(ctx.out_dir / "meta.json", {"kind": "pretrained", "seeds": p.seeds})
        return

    torch.set_num_threads(1)  # a small MLP: threading overhead exceeds the gain on 2 cores
    data = load_data(ctx.input("prepare"))
    x, y = data["x_train"].float().to(ctx.device), data["y_train"].to(ctx.device)
    meta = {"kind": "mlp", "in_features": x.shape[1], "hidden": p.hidden,
            "num_classes": int(max(data[k].max() for k in data if k.startswith("y_")) + 1),
            "seeds": p.seeds, "deep_ensemble_size": p.deep_ensemble_size, "snapshots": p.snapshots,
            "swag": p.swag_epochs > 0}
    steps_per_epoch = (len(y) + p.batch_size - 1) // p.batch_size

    def run(seed: int, tag: str, **kw):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = build_mlp(meta).to(ctx.device)
        losses = []
        fit_classifier(model, x, y, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size,
                       weight_decay=p.weight_decay, generator=gen,
                       on_epoch=lambda e, l: losses.append(l), **kw)
        return model, losses

    for seed in ctx.progress(p.seeds, desc="seeds"):
        folder = ctx.out_dir / f"seed{seed}"
        swag = None
        swag_start = (p.epochs - p.swag_epochs) * steps_per_epoch

        def collect(step, model):
            nonlocal swag
            if p.swag_epochs and step > swag_start and step % steps_per_epoch == 0:
                swag = swag or SWAGDiagonal(model)
                swag.collect(model)

        model, losses = run(seed, "fp32", on_step=collect)
        save_state(folder / "fp32.safetensors", model.state_dict())
        for epoch, loss in enumerate(losses):
            ctx.log_metrics({f"train_loss_seed{seed}": loss}, step=epoch)
        if swag is not None:
            save_state(folder / "swag.safetensors", swag.state())
        for k in range(p.deep_ensemble_size):  # members 1.. are extra trainings; member 0 is fp32
            if k == 0:
                save_state(folder / "de0.safetensors", model.state_dict())
                continue
            member, _ = run(1000 * (seed + 1) + k, f"de{k}")
            save_state(folder / f"de{k}.safetensors", member.state_dict())
        if p.snapshots:
            cycle = (p.epochs * steps_per_epoch) // p.snapshots
            snaps = []

            def snapshot(step, model):
                if step % cycle == 0 and len(snaps) < p.snapshots:
                    snaps.append({k: v.clone() for k, v in model.state_dict().items()})

            run(seed, "sse", lr_at=lambda s, total: cyclic_cosine_lr(s, cycle, p.lr), on_step=snapshot)
            for k, state in enumerate(snaps):
                save_state(folder / f"sse{k}.safetensors", state)
    io.write_json(ctx.out_dir / "meta.json", meta)


# ---------------------------------------------------------------------------------------- ensemble
class EnsembleParams(Params):
    bits: list[int] = Field(min_length=1, description="INT-b grids to ensemble in")
    sizes: list[int] = Field(min_length=1, description="ensemble sizes M reported (max M is drawn)")
    snapshot_lpe_bits: int = Field(description="bits of the LPE-BSR members drawn around each snapshot")
    snapshot_lpe_members: int = Field(gt=0, description="LPE-BSR members per snapshot")
    swag_samples: int = Field(ge=0, description="SWAG-diagonal posterior samples")
    batch_size: int = Field(gt=0, description="evaluation batch size")

    @field_validator("bits", "snapshot_lpe_bits")
    @classmethod
    def _bits(cls, v):
        bad = [b for b in (v if isinstance(v, list) else [v]) if not 2 <= b <= 32]
        if bad:
            raise ValueError(f"bits must be between 2 and 32, got {bad}")
        return v

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v):
        if any(m < 1 for m in v):
            raise ValueError(f"ensemble sizes must be >= 1, got {v}")
        return sorted(set(v))


def load_model(train_dir: Path, meta: dict, seed: int, name: str = "fp32", device="cpu"):
    """The trained MLP of ``seed`` (or the pretrained HF model) and its logits accessor."""
    if meta["kind"] == "pretrained":
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(str(train_dir / "pretrained"))
        return model.eval().to(device), (lambda out: out.logits)
    model = build_mlp(meta)
    model.load_state_dict(load_state(train_dir / f"seed{seed}" / f"{name}.safetensors"))
    return model.eval().to(device), (lambda out: out)


@stage(PAPER, "ensemble", params=EnsembleParams, inputs=("prepare", "train"), gpu=True)
def ensemble(ctx: StageContext, p: EnsembleParams) -> None:
    """Member predictions on the test split: FP32, RTN, LPE-BSR members, and the baselines."""
    import torch

    from models.lowprec_ensemble import (SWAGDiagonal, count_params, lpe_bsr_members, predict_probs,
                                         quantized_params)

    data = load_data(ctx.input("prepare"))
    train_dir = ctx.input("train")
    meta = io.read_json(train_dir / "meta.json")
    if meta["kind"] == "mlp":
        torch.set_num_threads(1)
    x_test = data["x_test"].float().to(ctx.device)

    def batches():
        for i in range(0, len(x_test), p.batch_size):
            yield (x_test[i:i + p.batch_size],)

    m_max = max(p.sizes)
    counts = None
    for seed in ctx.progress(meta["seeds"], desc="seeds"):
        gen = torch.Generator(device=ctx.device).manual_seed(seed)
        model, logits_of = load_model(train_dir, meta, seed, device=ctx.device)
        counts = count_params(model)
        out = {"labels": data["y_test"].numpy(), "fp32": predict_probs(model, batches, None, logits_of)}
        for b in p.bits:
            out[f"rtn_b{b}"] = predict_probs(model, batches, quantized_params(model, b, "nearest"), logits_of)
            out[f"lpe_b{b}"] = torch.stack(list(lpe_bsr_members(model, batches, b, m_max, gen, logits_of)))
        if meta.get("deep_ensemble_size"):
            out["deep"] = torch.stack([predict_probs(load_model(train_dir, meta, seed, f"de{k}", ctx.device)[0], batches)
                                       for k in range(meta["deep_ensemble_size"])])
        if meta.get("snapshots"):
            snap_probs, snap_lpe = [], []
            for k in range(meta["snapshots"]):
                snap, _ = load_model(train_dir, meta, seed, f"sse{k}", ctx.device)
                snap_probs.append(predict_probs(snap, batches))
                snap_lpe += list(lpe_bsr_members(snap, batches, p.snapshot_lpe_bits,
                                                 p.snapshot_lpe_members, gen))
            out["sse"], out["sse_lpe"] = torch.stack(snap_probs), torch.stack(snap_lpe)
        if meta.get("swag") and p.swag_samples:
            state = load_state(train_dir / f"seed{seed}" / "swag.safetensors")
            out["swag"] = torch.stack([predict_probs(model, batches, SWAGDiagonal.sample(state, gen))
                                       for _ in range(p.swag_samples)])
        io.save_arrays(ctx.out_dir / f"probs_seed{seed}.npz",
                       **{k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in out.items()})
    io.write_json(ctx.out_dir / "meta.json", {"seeds": meta["seeds"], "bits": p.bits, "sizes": p.sizes,
                                              "quantized_params": counts[0], "fp_params": counts[1],
                                              "snapshot_lpe_bits": p.snapshot_lpe_bits,
                                              "snapshot_lpe_members": p.snapshot_lpe_members})


# ---------------------------------------------------------------------------------------- evaluate
class EvaluateParams(Params):
    ece_bins: int = Field(gt=0)
    claim_size: int = Field(gt=0, description="ensemble size M at which the claims are checked")
    low_bits: list[int] = Field(min_length=1, description="bits where LPE-BSR error <= RTN error is claimed")


def _metrics(probs, labels, bins):
    from tasks.metrics import ece, error, nll

    return {"nll": nll(probs, labels), "err": error(probs, labels), "ece": ece(probs, labels, bins)}


def _mean_std(rows: list[dict]) -> dict:
    keys = rows[0].keys()
    return {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
            for k in keys}


@stage(PAPER, "evaluate", params=EvaluateParams, inputs=("ensemble",))
def evaluate(ctx: StageContext, p: EvaluateParams) -> None:
    """NLL / error / ECE / ambiguity / memory per method, mean over seeds; claims; plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.metrics import ambiguity, nll

    src = ctx.input("ensemble")
    meta = io.read_json(src / "meta.json")
    bits, sizes, seeds = meta["bits"], meta["sizes"], meta["seeds"]
    if p.claim_size > max(sizes):
        from tasks.core.errors import ParamsError

        raise ParamsError(f"'{PAPER}.evaluate.claim_size' = {p.claim_size} exceeds the largest ensemble "
                          f"size drawn ({max(sizes)} in '{PAPER}.ensemble.sizes').")
    qp, fp = meta["quantized_params"], meta["fp_params"]

    def mem(members, b):  # bits of memory, relative to one FP32 model
        return members * ((32 if b is None else b) * qp + 32 * fp) / (32 * (qp + fp))

    per_seed: dict[str, list[dict]] = {}
    curves_size, curves_mem = [], []

    def add(name, row):
        per_seed.setdefault(name, []).append(row)

    for seed in seeds:
        a = io.load_arrays(src / f"probs_seed{seed}.npz")
        y = a["labels"]
        add("fp32", {**_metrics(a["fp32"], y, p.ece_bins), "memory": mem(1, None)})
        for b in bits:
            add(f"rtn_b{b}", {**_metrics(a[f"rtn_b{b}"], y, p.ece_bins), "memory": mem(1, b)})
            members = a[f"lpe_b{b}"]
            add(f"sr_member_b{b}", {**_metrics(members[0], y, p.ece_bins), "memory": mem(1, b)})
            for m in sizes:
                sub = members[:m]
                add(f"lpe_b{b}_m{m}", {**_metrics(sub.mean(0), y, p.ece_bins), "memory": mem(m, b),
                                       "amb": ambiguity(sub, y),
                                       "member_nll": float(np.mean([nll(q, y) for q in sub]))})
        for name, key in (("deep_ensemble", "deep"), ("snapshot", "sse"), ("snapshot_lpe", "sse_lpe"),
                          ("swag_diag", "swag")):
            if key in a:
                n = len(a[key])
                b = meta["snapshot_lpe_bits"] if key == "sse_lpe" else None
                add(name, {**_metrics(a[key].mean(0), y, p.ece_bins), "memory": mem(n, b),
                           "amb": ambiguity(a[key], y), "members": n})
    table = {name: _mean_std(rows) for name, rows in per_seed.items()}
    M = p.claim_size

    def val(name, key="nll"):
        return table[name][key]["mean"]

    amb = {b: val(f"lpe_b{b}_m{M}", "amb") for b in bits}
    ordered = [b for b in (3, 4, 5, 6) if b in bits]
    claims = {
        "ambiguity_positive": all(v > 0 for v in amb.values()),
        "ambiguity_grows_as_bits_drop": len(ordered) >= 2 and all(
            amb[lo] > amb[hi] for lo, hi in zip(ordered[:-1], ordered[1:])),
        "ensemble_beats_members": all(val(f"lpe_b{b}_m{M}") < val(f"lpe_b{b}_m{M}", "member_nll")
                                      for b in bits),
        "lpe_error_le_rtn_low_bits": all(val(f"lpe_b{b}_m{M}", "err") <= val(f"rtn_b{b}", "err")
                                         for b in p.low_bits if b in bits),
    }
    if "snapshot" in table:
        claims["lpe_adds_to_snapshots"] = val("snapshot_lpe") <= val("snapshot")
    evidence = {
        "ambiguity_by_bits": {str(b): amb[b] for b in bits},
        "lpe_nll_by_bits": {str(b): val(f"lpe_b{b}_m{M}") for b in bits},
        "member_nll_by_bits": {str(b): val(f"lpe_b{b}_m{M}", "member_nll") for b in bits},
        "lpe_err_by_bits": {str(b): val(f"lpe_b{b}_m{M}", "err") for b in bits},
        "rtn_err_by_bits": {str(b): val(f"rtn_b{b}", "err") for b in bits},
        "rtn_nll_by_bits": {str(b): val(f"rtn_b{b}") for b in bits},
        "fp32": {k: val("fp32", k) for k in ("nll", "err", "ece")},
    }
    if "snapshot" in table:
        evidence["snapshot_nll"] = val("snapshot")
        evidence["snapshot_lpe_nll"] = val("snapshot_lpe")
    if "deep_ensemble" in table:
        evidence["deep_ensemble_nll"] = val("deep_ensemble")
    if "swag_diag" in table:
        evidence["swag_diag_nll"] = val("swag_diag")
    ctx.write_metrics({"claims": claims, "claim_size": M, "seeds": seeds, "evidence": evidence,
                       "table": table})

    for b in bits:
        for m in sizes:
            curves_size.append({"bits": f"INT-{b}", "size": m, "nll": val(f"lpe_b{b}_m{m}")})
            curves_mem.append({"method": f"LPE-BSR INT-{b}", "memory": val(f"lpe_b{b}_m{m}", "memory"),
                               "nll": val(f"lpe_b{b}_m{m}")})
    for name in ("fp32", "deep_ensemble", "snapshot", "snapshot_lpe", "swag_diag"):
        if name in table:
            curves_mem.append({"method": name, "memory": val(name, "memory"), "nll": val(name)})
    io.write_json(ctx.results_file("curves/nll_vs_size.json"), curves_size)
    io.write_json(ctx.results_file("curves/nll_vs_memory.json"), curves_mem)
    for k, rows in enumerate(curves_size):
        ctx.log_metrics({f"nll_{rows['bits']}": rows["nll"]}, step=rows["size"])
    ctx.log_metrics({f"claim_{k}": float(v) for k, v in claims.items()})
    ctx.log_metrics({f"amb_b{b}": v for b, v in amb.items()})

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for b in bits:
        ax.plot(sizes, [val(f"lpe_b{b}_m{m}") for m in sizes], marker="o", label=f"LPE-BSR INT-{b}")
    ax.axhline(val("fp32"), color="k", ls="--", label="FP32")
    ax.set_xscale("log")
    ax.set_xlabel("ensemble size M")
    ax.set_ylabel("test NLL")
    ax.legend(fontsize=7)
    ax.set_title(f"NLL vs ensemble size ({len(seeds)} seeds)")
    ctx.log_figure(fig, "nll_vs_size.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for b in bits:
        ax.plot([val(f"lpe_b{b}_m{m}", "memory") for m in sizes], [val(f"lpe_b{b}_m{m}") for m in sizes],
                marker="o", label=f"LPE-BSR INT-{b}")
    markers = {"fp32": "k*", "deep_ensemble": "rs", "snapshot": "g^", "snapshot_lpe": "bv", "swag_diag": "mD"}
    for name, style in markers.items():
        if name in table:
            ax.plot(val(name, "memory"), val(name), style, ms=9, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("memory budget (x one FP32 model)")
    ax.set_ylabel("test NLL")
    ax.legend(fontsize=7)
    ax.set_title("NLL vs memory budget")
    ctx.log_figure(fig, "nll_vs_memory.png")

    lines = ["| method | NLL | ERR | ECE | AMB | memory (x FP32) |", "|---|---|---|---|---|---|"]
    for name, stats in table.items():
        if "_m" in name and not name.endswith(f"_m{M}"):
            continue
        f = lambda k: f"{stats[k]['mean']:.4f} ± {stats[k]['std']:.4f}" if k in stats else "—"
        lines.append(f"| {name} | {f('nll')} | {f('err')} | {f('ece')} | {f('amb')} | "
                     f"{stats['memory']['mean']:.2f} |")
    io.write_text(ctx.results_file("table.md"), "\n".join(lines) + "\n")
