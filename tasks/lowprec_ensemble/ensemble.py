"""ensemble: member predictions on the test split: FP32, RTN, LPE-BSR members, the baselines (SWAG and
IVON BMA with and without LPE-BSR on top), and the width sweep's FP32 and LPE-BSR predictions."""
from __future__ import annotations

from pydantic import Field, field_validator

from tasks.core import Params, StageContext, io, stage

from .common import EnsembleMeta, TrainMeta, load_data, load_model


class EnsembleParams(Params):
    bits: list[int] = Field(min_length=1, description="INT-b grids to ensemble in")
    sizes: list[int] = Field(min_length=1, description="ensemble sizes M reported (max M is drawn)")
    snapshot_lpe_bits: int = Field(description="bits of the LPE-BSR members drawn around each snapshot")
    snapshot_lpe_members: int = Field(gt=0, description="LPE-BSR members per snapshot")
    bma_samples: int = Field(ge=0, description="posterior samples of the SWAG and IVON BMA baselines")
    bma_lpe_bits: int = Field(description="bits of the LPE-BSR members drawn around each posterior sample; "
                                          "32 / bits members per sample keep the memory of one FP32 sample")
    width_bits: int = Field(description="bits of the LPE-BSR members of the width sweep's models")
    width_evidence_bits: list[int] = Field(description="more grids for the width sweep, reported as evidence "
                                                       "only (no claim)")
    batch_size: int = Field(gt=0, description="evaluation batch size")

    @field_validator("bits", "snapshot_lpe_bits", "width_bits", "width_evidence_bits")
    @classmethod
    def _bits(cls, v):
        bad = [b for b in (v if isinstance(v, list) else [v]) if not 2 <= b <= 32]
        if bad:
            raise ValueError(f"bits must be between 2 and 32, got {bad}")
        return v

    @field_validator("bma_lpe_bits")
    @classmethod
    def _divides(cls, v):
        if 32 % v:
            raise ValueError(f"bma_lpe_bits must divide 32 (equal memory: 32 / bits members), got {v}")
        return v

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v):
        if any(m < 1 for m in v):
            raise ValueError(f"ensemble sizes must be >= 1, got {v}")
        return sorted(set(v))


def _seed_predictions(ctx: StageContext, p: EnsembleParams, meta: TrainMeta, batches, labels, seed: int):
    """Every method's test probabilities for one seed (members stacked on the first axis)."""
    import torch

    from models.lowprec_ensemble import lpe_bsr_members, predict_probs, quantized_params

    train_dir = ctx.input("train")
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    load = lambda name="fp32", width=None: load_model(train_dir, meta, seed, name, ctx.device, width)
    model, logits_of = load()
    m_max = max(p.sizes)
    out = {"labels": labels, "fp32": predict_probs(model, batches, None, logits_of)}
    for b in p.bits:
        out[f"rtn_b{b}"] = predict_probs(model, batches, quantized_params(model, b, "nearest"), logits_of)
        out[f"lpe_b{b}"] = torch.stack(list(lpe_bsr_members(model, batches, b, m_max, gen, logits_of)))
    if meta.deep_ensemble_size:
        out["deep"] = torch.stack([predict_probs(load(f"de{k}")[0], batches)
                                   for k in range(meta.deep_ensemble_size)])
    if meta.snapshots:
        snap_probs, snap_lpe = [], []
        for k in range(meta.snapshots):
            snap = load(f"sse{k}")[0]
            snap_probs.append(predict_probs(snap, batches))
            snap_lpe += list(lpe_bsr_members(snap, batches, p.snapshot_lpe_bits, p.snapshot_lpe_members, gen))
        out["sse"], out["sse_lpe"] = torch.stack(snap_probs), torch.stack(snap_lpe)
    for name, on in (("swag", meta.swag), ("ivon", meta.ivon)):
        if on and p.bma_samples:
            state = io.load_state(train_dir / f"seed{seed}" / f"{name}.safetensors")
            out[name], out[f"{name}_lpe"] = _bma(name, state, model, batches, p, gen)
    for width in meta.widths:
        wide = load(f"width{width}", width)[0]
        out[f"width{width}_fp32"] = predict_probs(wide, batches)
        out[f"width{width}_lpe"] = torch.stack(list(lpe_bsr_members(wide, batches, p.width_bits, m_max, gen)))
        for b in p.width_evidence_bits:
            out[f"width{width}_lpe_b{b}"] = torch.stack(list(lpe_bsr_members(wide, batches, b, m_max, gen)))
    return out, model


def _bma(name: str, state: dict, model, batches, p: EnsembleParams, gen):
    """BMA over posterior samples (FP32), and the same samples with LPE-BSR on top at equal memory:
    each sample is replaced by 32 / b stochastic roundings of it to INT-b."""
    import copy

    import torch
    from torch.nn.utils import vector_to_parameters

    from models.lowprec_ensemble import SWAG, lpe_bsr_members, predict_probs, sample_diagonal

    draw = SWAG.sample if name == "swag" else sample_diagonal
    member = copy.deepcopy(model)
    fp, low = [], []
    for _ in range(p.bma_samples):
        vector_to_parameters(draw(state, gen), member.parameters())
        fp.append(predict_probs(member, batches))
        low += list(lpe_bsr_members(member, batches, p.bma_lpe_bits, 32 // p.bma_lpe_bits, gen))
    return torch.stack(fp), torch.stack(low)


@stage(params=EnsembleParams, inputs=("prepare", "train"), gpu=True)
def ensemble(ctx: StageContext, p: EnsembleParams) -> None:
    """Member predictions on the test split: FP32, RTN, LPE-BSR members, and the baselines."""
    import torch

    from models.lowprec_ensemble import count_params

    data = load_data(ctx.input("prepare"))
    meta = TrainMeta.read(ctx.input("train"))
    if meta.kind == "mlp":
        torch.set_num_threads(1)
    x_test = data["x_test"].float().to(ctx.device)

    def batches():
        for i in range(0, len(x_test), p.batch_size):
            yield (x_test[i:i + p.batch_size],)

    counts = None
    for seed in ctx.progress(meta.seeds, desc="seeds"):
        out, model = _seed_predictions(ctx, p, meta, batches, data["y_test"].numpy(), seed)
        counts = count_params(model)
        io.save_arrays(ctx.out_dir / f"probs_seed{seed}.npz",
                       **{k: (v.cpu().numpy() if hasattr(v, "numpy") else v) for k, v in out.items()})
    out_meta = EnsembleMeta(seeds=meta.seeds, bits=p.bits, sizes=p.sizes, quantized_params=counts[0],
                            fp_params=counts[1], snapshot_lpe_bits=p.snapshot_lpe_bits,
                            snapshot_lpe_members=p.snapshot_lpe_members, bma_lpe_bits=p.bma_lpe_bits,
                            widths=meta.widths,
                            width_bits=p.width_bits, width_evidence_bits=p.width_evidence_bits)
    io.write_json(ctx.out_dir / "meta.json", out_meta.model_dump())
