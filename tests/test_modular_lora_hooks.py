"""What each adapter does, seen by forward hooks: Modular LoRA trains the ``ft`` adapter with the safety
adapter off and serves their sum; ESD's teacher is W0 without adapters; SDD returns its EMA weights."""
from __future__ import annotations

import copy

import pytest
import torch

from models.modular_lora import adapters as ad
from models.modular_lora import erasure
from models.modular_lora import tiny_diffusion as td

torch.set_flush_denormal(True)


def _den():
    torch.manual_seed(0)
    den = td.Denoiser(td.build_unet(channels=(8, 16), cross_dim=8, head_dim=4), td.TinyTextEncoder(dim=8))
    den.unet.requires_grad_(False)
    den.text.requires_grad_(False)
    return den


def _with_safety(den):
    den.unet.add_adapter(ad.lora_config(2, layers="attn"), adapter_name=ad.SAFETY)
    with torch.no_grad():  # non-zero B so the safety adapter changes the output
        for n, p in den.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ad.activate(den.unet, {ad.SAFETY: 1.0})
    den.unet.requires_grad_(False)
    return den


class LoraCalls:
    """Counts the calls of every adapter's lora_A, with gradients on or off, through a global module hook."""

    def __init__(self):
        self.calls: list[tuple[int, bool]] = []

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: self.calls.append((id(m), torch.is_grad_enabled())))
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def count(self, unet, adapter: str, grad: bool | None = None) -> int:
        ids = {id(m) for n, m in unet.named_modules() if n.endswith(f"lora_A.{adapter}")}
        assert ids, adapter
        return sum(1 for i, g in self.calls if i in ids and (grad is None or g == grad))


def test_modular_training_runs_only_the_ft_adapter_and_inference_sums_both():
    den = _with_safety(_den())
    imgs = torch.rand(16, 1, 8, 8) * 2 - 1
    with LoraCalls() as calls:
        out = td.finetune_arm("modular", den.unet, den.text, imgs, td.prompt_tokens("new", torch.arange(16) % 9),
                              3, 1e-2, 4, 2, "attn", torch.Generator().manual_seed(0))
    assert calls.count(out, ad.FINETUNE, grad=True) > 0  # the ft adapter trains ...
    assert calls.count(out, ad.SAFETY) == 0  # ... and the safety adapter never runs during training
    x, t, tok = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900]), td.prompt_tokens("plain", [2, 1, 3])
    with LoraCalls() as calls, torch.no_grad():
        both = out(x, t, encoder_hidden_states=den.text(tok)).sample
    n_ft = calls.count(out, ad.FINETUNE)
    assert n_ft > 0 and calls.count(out, ad.SAFETY) == n_ft  # at inference both adapters run in every layer
    merged = ad.merged_unet(out, {ad.SAFETY: 1.0, ad.FINETUNE: 1.0})  # W0 + ΔW_safe + ΔW_ft in weight space
    torch.testing.assert_close(both, merged(x, t, encoder_hidden_states=den.text(tok)).sample, atol=1e-5,
                               rtol=1e-4)


class UnetCalls:
    """Every call of the UNet: its inputs, output, whether gradients were on and how many safety-LoRA calls it
    made."""

    def __init__(self, unet):
        self.unet, self.records, self.lora = unet, [], LoraCalls()

    def __enter__(self):
        self.lora.__enter__()
        self.pre = self.unet.register_forward_pre_hook(self._pre, with_kwargs=True)
        self.post = self.unet.register_forward_hook(self._post, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.pre.remove()
        self.post.remove()
        self.lora.__exit__()

    def _pre(self, m, args, kwargs):
        self.start = len(self.lora.calls)

    def _post(self, m, args, kwargs, out):
        ids = {id(mod) for n, mod in self.unet.named_modules() if n.endswith(f"lora_A.{ad.SAFETY}")}
        safety = sum(1 for i, _ in self.lora.calls[self.start:] if i in ids)
        self.records.append({"x": args[0].detach().clone(), "t": args[1], "emb":
                             kwargs["encoder_hidden_states"].detach().clone(), "out": out.sample.detach().clone(),
                             "grad": torch.is_grad_enabled(), "safety": safety})


def test_esd_teacher_is_w0_without_adapters_and_x_t_comes_from_the_student():
    den = _den()
    w0 = copy.deepcopy(den.unet)
    with UnetCalls(den.unet) as rec:
        td.train_safety_lora(den, td.prompt_tokens("plain", [2]), td.prompt_tokens("plain", [0, 1]), "esd", 4,
                             1e-2, 3, 2, "attn", torch.Generator().manual_seed(3), ddim_steps=4, guidance=1.5,
                             esd_scale=3.0, preserve_weight=0.0, ema_decay=0.9)
    student = [k for k, r in enumerate(rec.records) if r["grad"]]
    assert len(student) == 4 and all(rec.records[k]["safety"] > 0 for k in student)
    sampling = []
    for prev, k in zip([-1] + student[:-1], student):
        teacher = rec.records[k - 1]  # the call just before the student's: the target, no gradient
        assert not teacher["grad"] and teacher["safety"] == 0
        with torch.no_grad():
            ref = w0(teacher["x"], teacher["t"], encoder_hidden_states=teacher["emb"]).sample
        torch.testing.assert_close(teacher["out"], ref)  # exactly W0's prediction
        sampling += rec.records[prev + 1:k - 1]
    assert sampling and all(r["safety"] > 0 and not r["grad"] for r in sampling)  # the student samples x_t


def test_sdd_returns_the_ema_of_its_adapter_weights(monkeypatch):
    den = _den()
    seen = []  # the adapter's weights before the first update and after every one
    real_step = erasure.adapter_step

    def step(opt, params, loss, ema=None):
        if not seen:
            seen.append([p.detach().clone() for p in params])
        real_step(opt, params, loss, ema)
        seen.append([p.detach().clone() for p in params])

    monkeypatch.setattr(erasure, "adapter_step", step)
    decay = 0.7
    td.train_safety_lora(den, td.prompt_tokens("plain", [2]), td.prompt_tokens("plain", [0]), "sdd", 3, 5e-2, 2, 2,
                         "attn", torch.Generator().manual_seed(0), ddim_steps=3, guidance=1.5, esd_scale=3.0,
                         preserve_weight=0.0, ema_decay=decay)
    ema = seen[0]
    for weights in seen[1:]:
        ema = [decay * e + (1 - decay) * w for e, w in zip(ema, weights)]
    final = ad.adapter_parameters(den.unet, ad.SAFETY)
    assert len(final) == len(ema)
    for f, e, last in zip(final, ema, seen[-1]):
        torch.testing.assert_close(f.detach(), e)
    assert any(not torch.allclose(f.detach(), last) for f, last in zip(final, seen[-1]))  # not the raw weights


def test_partial_sampling_stops_at_the_drawn_ddim_index():
    """The CPU scale's x_t comes from the same partial DDIM sampler as the paper scale's: i steps from noise."""
    den = _den()
    emb, null = den.text(td.prompt_tokens("plain", [2, 2])), den.text(td.null_tokens(1))
    x0, t0 = erasure.ddim_cfg(den.unet, td.ddim_sampler(), emb, null, 5, 1.5, torch.Generator().manual_seed(0),
                              (1, 8, 8), stop_at=0)
    torch.testing.assert_close(x0, torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0)))
    x2, t2 = erasure.ddim_cfg(den.unet, td.ddim_sampler(), emb, null, 5, 1.5, torch.Generator().manual_seed(0),
                              (1, 8, 8), stop_at=2)
    assert int(t2) < int(t0) and not torch.allclose(x0, x2)
    with pytest.raises(ValueError, match="objective"):
        erasure.train_erasure(den.unet, td.ddim_sampler, emb, emb, (1, 8, 8), "mace", 1, 1e-3, 2, "attn",
                              torch.Generator(), 2, 1.5, 3.0, 0.9)
