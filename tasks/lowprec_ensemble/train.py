"""train: full-precision solutions per seed, the deep-ensemble, snapshot, SWAG and IVON baselines, and
the width sweep behind ``lpe_gain_grows_with_width``."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.core import Params, StageContext, io, stage
from tasks.core.errors import MissingInputError

from .common import TrainMeta, build_mlp, load_data, member_file


class TrainParams(Params):
    model: Literal["mlp", "pretrained"] = Field(description="mlp (trained here) or a pretrained HF classifier")
    model_dir: str | None = Field(description="paper scale: local from_pretrained folder")
    hidden: list[int] = Field(description="MLP hidden widths")
    epochs: int = Field(gt=0, description="epochs of one training run (the training budget unit)")
    lr: float = Field(gt=0, description="SGD learning rate (peak of the cyclic schedule for snapshots)")
    batch_size: int = Field(gt=0)
    weight_decay: float = Field(ge=0)
    seeds: list[int] = Field(min_length=1, description="one trained solution per seed")
    deep_ensemble_size: int = Field(ge=0, description="independent trainings per seed (0: skip)")
    snapshots: int = Field(ge=0, description="snapshot-ensemble cycles within one budget (0: skip)")
    swag_epochs: int = Field(ge=0, description="SWAG: epochs at the constant swag_lr after the FP32 solution, "
                                               "one iterate collected per epoch (0: skip)")
    swag_lr: float = Field(gt=0, description="SWAG's constant collection learning rate")
    swag_rank: int = Field(ge=2, description="SWAG: rank K of the low-rank covariance (last K deviations)")
    ivon_epochs: int = Field(ge=0, description="IVON training epochs (0: skip)")
    ivon_lr: float = Field(gt=0, description="IVON peak learning rate (cosine decay)")
    ivon_hess_init: float = Field(gt=0, description="IVON initial Hessian estimate h0")
    ivon_beta2: float = Field(gt=0, lt=1, description="IVON Hessian EMA rate")
    widths: list[int] = Field(description="width sweep: every hidden layer this wide, one FP32 model "
                                          "per width and seed ([]: skip)")

    @field_validator("hidden", "widths")
    @classmethod
    def _positive(cls, v):
        if any(h <= 0 for h in v):
            raise ValueError("widths must be positive integers")
        return v

    @model_validator(mode="after")
    def _check(self):
        if not self.hidden:
            raise ValueError("hidden needs at least one width")
        if self.model == "pretrained" and not self.model_dir:
            raise ValueError("model 'pretrained' needs 'model_dir'")
        if self.snapshots == 1:
            raise ValueError("snapshots must be 0 (skip) or >= 2")
        if 0 < self.swag_epochs < self.swag_rank:
            raise ValueError("swag_epochs must be >= swag_rank (one deviation per collected epoch)")
        return self


def _save_pretrained(ctx: StageContext, p: TrainParams) -> None:
    from transformers import AutoModelForImageClassification

    if not Path(p.model_dir).is_dir():
        raise MissingInputError(f"'{ctx.paper}.train.model_dir' = '{p.model_dir}' does not exist. Point it "
                                f"at a local folder saved with save_pretrained (config.json + "
                                f"model.safetensors).")
    model = AutoModelForImageClassification.from_pretrained(p.model_dir, use_safetensors=True)
    model.save_pretrained(ctx.out_dir / "pretrained", safe_serialization=True)
    meta = TrainMeta(kind="pretrained", seeds=p.seeds, in_features=None, hidden=[], num_classes=None,
                     deep_ensemble_size=0, snapshots=0, swag=False, ivon=False, widths=[])
    io.write_json(ctx.out_dir / "meta.json", meta.model_dump())


def _train_seed(ctx: StageContext, p: TrainParams, meta: TrainMeta, x, y, seed: int) -> None:
    """One seed: the FP32 solution, SWAG, IVON, deep-ensemble members, snapshots, widths."""
    import torch

    from models.common.train import fit_classifier
    from models.lowprec_ensemble import cyclic_cosine_lr

    def run(run_seed: int, width: int | None = None, **kw):
        torch.manual_seed(run_seed)
        model = build_mlp(meta, width).to(ctx.device)
        losses: list[float] = []
        fit_classifier(model, x, y, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size,
                       weight_decay=p.weight_decay, generator=torch.Generator().manual_seed(run_seed),
                       on_epoch=lambda e, loss: losses.append(loss), **kw)
        return model, losses

    model, losses = run(seed)
    save = lambda name, state: io.save_state(ctx.out_dir / member_file(seed, name), state)
    save("fp32", model.state_dict())
    for epoch, loss in enumerate(losses):
        ctx.log_metrics({f"train_loss_seed{seed}": loss}, step=epoch)
    if p.swag_epochs:
        save("swag", _swag(p, model, x, y, seed))
    if p.ivon_epochs:
        save("ivon", _ivon(p, meta, x, y, seed, ctx.device))
    for k in range(p.deep_ensemble_size):  # member 0 is the FP32 solution, members 1.. extra trainings
        save(f"de{k}", (model if k == 0 else run(1000 * (seed + 1) + k)[0]).state_dict())
    if p.snapshots:
        steps_per_epoch = (len(y) + p.batch_size - 1) // p.batch_size
        cycle = (p.epochs * steps_per_epoch) // p.snapshots
        snaps: list[dict] = []

        def snapshot(step, model):
            if step % cycle == 0 and len(snaps) < p.snapshots:
                snaps.append({k: v.clone() for k, v in model.state_dict().items()})

        run(seed, lr_at=lambda s, total: cyclic_cosine_lr(s, cycle, p.lr), on_step=snapshot)
        for k, state in enumerate(snaps):
            save(f"sse{k}", state)
    for width in p.widths:
        save(f"width{width}", run(seed, width)[0].state_dict())


def _swag(p: TrainParams, model, x, y, seed: int) -> dict:
    """SWAG's collection schedule (Maddox et al. 2019): from the trained solution, SGD at a constant
    learning rate, one iterate per epoch into the moments and the last K deviations."""
    import copy

    import torch

    from models.common.train import fit_classifier
    from models.lowprec_ensemble import SWAG

    walker, swag = copy.deepcopy(model), SWAG(p.swag_rank)
    fit_classifier(walker, x, y, epochs=p.swag_epochs, lr=p.swag_lr, batch_size=p.batch_size,
                   weight_decay=p.weight_decay, generator=torch.Generator().manual_seed(7919 + seed),
                   on_epoch=lambda e, loss: swag.collect(walker))
    return swag.state()


def _ivon(p: TrainParams, meta: TrainMeta, x, y, seed: int, device) -> dict:
    """IVON from scratch (its own training run, the same epochs budget as SGD), prior precision =
    the SGD weight decay."""
    import torch

    from models.lowprec_ensemble import fit_ivon

    torch.manual_seed(seed)
    model = build_mlp(meta).to(device)
    return fit_ivon(model, x, y, epochs=p.ivon_epochs, lr=p.ivon_lr, batch_size=p.batch_size,
                    hess_init=p.ivon_hess_init, weight_decay=p.weight_decay, beta2=p.ivon_beta2,
                    generator=torch.Generator().manual_seed(seed))


@stage(params=TrainParams, inputs=("prepare",), gpu=True)
def train(ctx: StageContext, p: TrainParams) -> None:
    """Full-precision solutions per seed, plus deep-ensemble, snapshot, SWAG and IVON baselines, widths."""
    import torch

    if p.model == "pretrained":
        return _save_pretrained(ctx, p)
    torch.set_num_threads(1)  # a small MLP: threading overhead exceeds the gain on 2 cores
    data = load_data(ctx.input("prepare"))
    x, y = data["x_train"].float().to(ctx.device), data["y_train"].to(ctx.device)
    meta = TrainMeta(kind="mlp", seeds=p.seeds, in_features=x.shape[1], hidden=p.hidden,
                     num_classes=int(max(data[k].max() for k in data if k.startswith("y_")) + 1),
                     deep_ensemble_size=p.deep_ensemble_size, snapshots=p.snapshots,
                     swag=p.swag_epochs > 0, ivon=p.ivon_epochs > 0, widths=p.widths)
    for seed in ctx.progress(p.seeds, desc="seeds"):
        _train_seed(ctx, p, meta, x, y, seed)
    io.write_json(ctx.out_dir / "meta.json", meta.model_dump())
