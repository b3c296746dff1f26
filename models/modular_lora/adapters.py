"""The adapters of Modular LoRA, shared by both scales: peft LoRA configs on a diffusers UNet, exact sums
and merges, the arms' set-up, the adapter steps of the safety objectives and their constant-decay EMA
(diffusers' ``EMAModel``).

ΔW_safe is the adapter ``safety``, ΔW_ft the adapter ``ft``; both live on the same ``UNet2DConditionModel``
(``add_adapter``), are switched with ``set_adapters`` and saved/loaded with peft's
``get_peft_model_state_dict`` / ``set_peft_model_state_dict``.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
import torch.nn as nn
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

SAFETY = "safety"
FINETUNE = "ft"
ARMS = ("full", "lora_on_safe", "modular")

LORA_TARGETS = {
    # ESD-x analog: cross-attention only
    "xattn": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
    # all attention (self + cross)
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    # ESD-u analog: attention, resnet convs and the time embedding projection of each resnet
    "all": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj", "proj_in", "proj_out"],
}


def lora_config(rank: int, alpha: float | None = None, layers: str = "xattn") -> LoraConfig:
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if layers not in LORA_TARGETS:
        raise ValueError(f"unknown LoRA layer set {layers!r}; known: {sorted(LORA_TARGETS)}")
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                      target_modules=LORA_TARGETS[layers])


def adapter_parameters(unet: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of one adapter, found by name (set_adapters turns gradients on for every active one)."""
    params = [p for n, p in unet.named_parameters() if f".{name}." in n and "lora_" in n]
    if not params:
        raise ValueError(f"the UNet has no adapter named {name!r}")
    return params


def set_trainable(unet: nn.Module, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    params = list(params)
    ids = {id(p) for p in params}
    for p in unet.parameters():
        p.requires_grad_(id(p) in ids)
    return params


def adapter_state(unet: UNet2DConditionModel, name: str) -> dict[str, torch.Tensor]:
    """The LoRA matrices of one adapter (peft's state dict: keys without the adapter's name)."""
    return get_peft_model_state_dict(unet, adapter_name=name)


def load_adapter(unet: UNet2DConditionModel, name: str, rank: int, layers: str,
                 state: dict[str, torch.Tensor]) -> None:
    """Add adapter ``name`` and load its saved LoRA matrices (every parameter of the UNet frozen)."""
    unet.add_adapter(lora_config(rank, layers=layers), adapter_name=name)
    result = set_peft_model_state_dict(unet, state, adapter_name=name)
    if result.unexpected_keys:
        raise ValueError(f"adapter {name!r} does not fit the UNet: {sorted(result.unexpected_keys)[:3]}")
    unet.requires_grad_(False)


def merged_unet(unet: UNet2DConditionModel, weights: dict[str, float] | None = None) -> UNet2DConditionModel:
    """A plain UNet (no adapters) whose weights are W0 + Σ_k w_k ΔW_k, merged exactly in weight space."""
    weights = weights or {}
    src = copy.deepcopy(unet)
    for m in src.modules():
        if isinstance(m, BaseTunerLayer):
            base = m.get_base_layer()
            with torch.no_grad():
                for name, w in weights.items():
                    if name in m.lora_A:
                        m.set_scale(name, 1.0)  # undo any set_adapters weight: ΔW at its trained scale
                        base.weight += w * m.get_delta_weight(name).to(base.weight.dtype)
    state = {}
    for k, v in src.state_dict().items():
        if "lora_" in k:
            continue
        state[k.replace(".base_layer.", ".")] = v
    out = UNet2DConditionModel.from_config(unet.config)
    out.load_state_dict(state)
    return out.to(next(unet.parameters()).device)


def activate(unet: UNet2DConditionModel, weights: dict[str, float]) -> None:
    """Turn on exactly these adapters with these weights (an exact sum of LoRA outputs), or none.

    Which parameters are trainable is left as it was (peft's set_adapter would switch gradients on).
    """
    if not weights:
        unet.disable_adapters()
        return
    grad = {n: p.requires_grad for n, p in unet.named_parameters()}
    unet.enable_adapters()
    unet.set_adapters(list(weights), list(weights.values()))
    for n, p in unet.named_parameters():
        p.requires_grad_(grad[n])


# ----------------------------------------------------------------------------------------------------------
# The benign fine-tuning arms (both scales)
# ----------------------------------------------------------------------------------------------------------
def arm_unet(arm: str, base: UNet2DConditionModel, rank: int, layers: str
             ) -> tuple[UNet2DConditionModel, list[nn.Parameter]]:
    """The model an arm trains and its trainable parameters; ``base`` (W0 + the ``safety`` adapter) is kept.

    full: all weights of the merged W0 + ΔW_safe; lora_on_safe: a new ``ft`` LoRA on the merged safe
    model; modular: a new ``ft`` LoRA on W0 with the safety adapter disabled (both on at inference).
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; known: {ARMS}")
    device = next(base.parameters()).device
    if arm == "modular":
        unet = copy.deepcopy(base)
        unet.add_adapter(lora_config(rank, layers=layers), adapter_name=FINETUNE)
        unet.to(device)
        activate(unet, {FINETUNE: 1.0})  # trains on W0: the safety adapter is off
        return unet, set_trainable(unet, adapter_parameters(unet, FINETUNE))
    unet = merged_unet(base, {SAFETY: 1.0})
    if arm == "full":
        return unet, set_trainable(unet, unet.parameters())
    unet.add_adapter(lora_config(rank, layers=layers), adapter_name=FINETUNE)
    unet.to(device)
    return unet, set_trainable(unet, adapter_parameters(unet, FINETUNE))


def inference_view(arm: str, unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """The arm's model as used at inference (modular: W0 + ΔW_safe + ΔW_ft, an exact sum of LoRA outputs)."""
    if arm == "modular":
        activate(unet, {SAFETY: 1.0, FINETUNE: 1.0})
    return unet


def training_view(arm: str, unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """The arm's model as it trains (modular: W0 + ΔW_ft, the safety adapter off)."""
    if arm == "modular":
        activate(unet, {FINETUNE: 1.0})
    return unet


def report_step(on_step: Callable | None, step: int, loss: torch.Tensor, arm: str,
                unet: UNet2DConditionModel) -> None:
    """Hand ``on_step(step, loss, model)`` the arm's inference view after an update (the
    re-emergence curves), then return the UNet to its training view."""
    if on_step:
        unet.eval()
        on_step(step, loss.item(), inference_view(arm, unet))
        training_view(arm, unet)
        unet.train()


def arm_state(arm: str, unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """What an arm saves: the whole UNet (full) or its ``ft`` LoRA matrices."""
    return unet.state_dict() if arm == "full" else adapter_state(unet, FINETUNE)


# ----------------------------------------------------------------------------------------------------------
# Safety objectives: the ESD target and the adapter's optimiser step (with SDD's EMA)
# ----------------------------------------------------------------------------------------------------------
def esd_target(e_null: torch.Tensor, e_concept: torch.Tensor, scale: float = 3.0) -> torch.Tensor:
    """ESD (Gandikota et al. 2023, eq. 3 with negative guidance): ε* = ε0 − s (ε_c − ε0), from the frozen model."""
    return e_null - scale * (e_concept - e_null)


def constant_decay_ema(params: Iterable[nn.Parameter], decay: float,
                       include_initial: bool = True) -> EMAModel:
    """diffusers' ``EMAModel`` at a constant ``decay`` (no warm-up: ``min_decay = decay``).

    ``include_initial``: the weights as they are now start the average (SDD's EMA teacher of the LoRA);
    otherwise the first update copies the weights and the average starts there (W0's EMA).
    """
    return EMAModel(params, decay=decay, min_decay=decay, update_after_step=-1 if include_initial else 0,
                    foreach=True)


def adapter_step(opt: torch.optim.Optimizer, params: list[nn.Parameter], loss: torch.Tensor,
                 ema: EMAModel | None = None) -> None:
    """One clipped optimiser step on the adapter parameters, then their EMA if one is kept (SDD)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if ema is not None:
        ema.step(params)
