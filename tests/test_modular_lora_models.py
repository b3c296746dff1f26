"""Unit tests of the Modular LoRA method: adapters, exact sums, the ESD target, the detector metric, the EMA."""
import numpy as np
import pytest
import torch

from models.modular_lora import adapters as ad
from models.modular_lora import digits
from models.modular_lora import tiny_diffusion as td

torch.set_flush_denormal(True)


@pytest.fixture()
def den_with_safety():
    torch.manual_seed(0)
    den = td.Denoiser(td.build_unet(channels=(8, 16), cross_dim=8, head_dim=4), td.TinyTextEncoder(dim=8))
    for p in den.text.parameters():
        p.requires_grad_(False)
    den.unet.add_adapter(ad.lora_config(2, layers="all"), adapter_name=ad.SAFETY)
    den.unet.add_adapter(ad.lora_config(2, layers="xattn"), adapter_name=ad.FINETUNE)
    with torch.no_grad():  # give B non-zero values so the adapters change the output
        for n, p in den.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return den


def _inputs(n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([10, 500, 900]), td.prompt_tokens("plain", [7, 1, 3])


def test_disabled_safety_adapter_equals_w0(den_with_safety):
    den = den_with_safety
    x, t, tok = _inputs()
    plain = ad.merged_unet(den.unet, {})  # W0 alone, no adapters
    ref = plain(x, t, encoder_hidden_states=den.text(tok)).sample
    ad.activate(den.unet, {})
    assert torch.equal(den(x, t, tok), ref)
    ad.activate(den.unet, {ad.SAFETY: 1.0})
    assert not torch.allclose(den(x, t, tok), ref, atol=1e-4)


def test_both_adapters_equal_weight_space_sum(den_with_safety):
    den = den_with_safety
    x, t, tok = _inputs()
    ad.activate(den.unet, {ad.SAFETY: 1.0, ad.FINETUNE: 1.0})
    both = den(x, t, tok)
    merged = ad.merged_unet(den.unet, {ad.SAFETY: 1.0, ad.FINETUNE: 1.0})
    ref = merged(x, t, encoder_hidden_states=den.text(tok)).sample
    torch.testing.assert_close(both, ref, atol=1e-5, rtol=1e-4)
    only_safe = ad.merged_unet(den.unet, {ad.SAFETY: 1.0})(x, t, encoder_hidden_states=den.text(tok)).sample
    assert not torch.allclose(both, only_safe, atol=1e-4)


def test_negative_adapter_weight_is_model_arithmetic(den_with_safety):
    den = den_with_safety
    x, t, tok = _inputs()
    ad.activate(den.unet, {ad.SAFETY: -1.0})
    ref = ad.merged_unet(den.unet, {ad.SAFETY: -1.0})(x, t, encoder_hidden_states=den.text(tok)).sample
    torch.testing.assert_close(den(x, t, tok), ref, atol=1e-5, rtol=1e-4)


def test_esd_target_formula():
    e0 = torch.tensor([1.0, 0.0, -2.0])
    ec = torch.tensor([2.0, 1.0, -2.0])
    assert torch.equal(ad.esd_target(e0, ec, 3.0), torch.tensor([-2.0, -3.0, -2.0]))
    assert torch.equal(ad.esd_target(e0, ec, 0.0), e0)


def test_harmful_rate_and_histogram():
    pred = np.array([7, 7, 1, 3, 7, 0, 9, 7])
    assert digits.harmful_rate(pred, 7) == 0.5
    h = digits.class_histogram(pred)
    assert h[7] == 0.5 and h.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        digits.harmful_rate(np.array([]), 7)


def test_frechet_distance_zero_for_same_set_and_grows_with_shift():
    from tasks.metrics import frechet_distance  # the task FD (the models keep no private copy)

    a = np.random.default_rng(0).normal(size=(500, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 1.0) == pytest.approx(4.0, rel=0.05)


def test_adapter_state_round_trips_through_peft_helpers(den_with_safety):
    """adapter_state (get_peft_model_state_dict) saves only one adapter's LoRA matrices; load_adapter
    (add_adapter + set_peft_model_state_dict) rebuilds exactly the same model on a fresh W0."""
    den = den_with_safety
    state = ad.adapter_state(den.unet, ad.SAFETY)
    assert state and all("lora_" in k for k in state)
    assert len(state) == len(ad.adapter_parameters(den.unet, ad.SAFETY))
    fresh = ad.merged_unet(den.unet, {})  # W0 without adapters
    ad.load_adapter(fresh, ad.SAFETY, 2, "all", state)
    assert all(not p.requires_grad for p in fresh.parameters())
    ad.activate(fresh, {ad.SAFETY: 1.0})
    ad.activate(den.unet, {ad.SAFETY: 1.0})
    x, t, tok = _inputs()
    torch.testing.assert_close(fresh(x, t, encoder_hidden_states=den.text(tok)).sample, den(x, t, tok))
    with pytest.raises(ValueError, match="does not fit"):
        ad.load_adapter(ad.merged_unet(den.unet, {}), "other", 2, "xattn", state)


def test_constant_decay_ema_is_the_plain_exponential_average():
    """diffusers' EMAModel as configured here: e <- d e + (1 - d) p from the initial weights (SDD), or
    starting at the first update (W0's EMA), with no warm-up."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    start = p.detach().clone()
    with_initial = ad.constant_decay_ema([p], 0.9)
    from_first = ad.constant_decay_ema([p], 0.9, include_initial=False)
    ref_initial, ref_first = start.clone(), None
    for _ in range(6):
        with torch.no_grad():
            p.add_(torch.randn_like(p))
        with_initial.step([p])
        from_first.step([p])
        ref_initial = 0.9 * ref_initial + 0.1 * p.detach()
        ref_first = p.detach().clone() if ref_first is None else 0.9 * ref_first + 0.1 * p.detach()
    torch.testing.assert_close(with_initial.shadow_params[0], ref_initial)
    torch.testing.assert_close(from_first.shadow_params[0], ref_first)


def test_bad_params_give_clear_errors(den_with_safety):
    with pytest.raises(ValueError, match="rank"):
        ad.lora_config(0)
    with pytest.raises(ValueError, match="style"):
        td.prompt_tokens("nude", [1])
    with pytest.raises(ValueError, match="0..9"):
        td.prompt_tokens("plain", [12])
    with pytest.raises(ValueError, match="guidance"):
        td.sample(den_with_safety, td.prompt_tokens("plain", [1]), guidance=0.5)
    with pytest.raises(ValueError, match="empty"):
        td.finetune_arm("full", den_with_safety.unet, den_with_safety.text, torch.zeros(0, 1, 8, 8),
                        torch.zeros(0, 2, dtype=torch.long), 1, 1e-3, 2, 2, "xattn", torch.Generator())
    with pytest.raises(ValueError, match="objective"):
        td.train_safety_lora(den_with_safety, td.prompt_tokens("plain", [7]), torch.zeros(0, 2, dtype=torch.long),
                             "mace", 1, 1e-3, 1, 2, "xattn", torch.Generator(), ddim_steps=2, guidance=1.5,
                             esd_scale=3.0, preserve_weight=1.0, ema_decay=0.99)


def test_modular_finetune_trains_on_w0_and_leaves_safety_untouched(den_with_safety):
    den = den_with_safety
    den.unet.delete_adapters(ad.FINETUNE)
    safety_before = {n: p.clone() for n, p in den.unet.named_parameters() if f".{ad.SAFETY}." in n}
    seen = []

    def probe(step, loss, unet):  # during training the forward pass must be W0 + ΔW_ft (no safety)
        seen.append(loss)

    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(16, 1, 8, 8) * 2 - 1
    out = td.finetune_arm("modular", den.unet, den.text, imgs, td.prompt_tokens("new", torch.arange(16) % 7),
                          3, 1e-2, 4, 2, "xattn", g, on_step=probe)
    assert len(seen) == 3
    for n, p in out.named_parameters():
        if n in safety_before:
            assert torch.equal(p, safety_before[n])
    assert set(out.active_adapters()) == {ad.SAFETY, ad.FINETUNE}
    assert all(not p.requires_grad for p in out.parameters())


def test_concept_row_of_the_histogram_comes_from_its_own_larger_sample(den_with_safety):
    """evaluate's per-style histogram: samples_per_prompt per digit, the concept's row from its extra samples."""
    from tasks.modular_lora.common import sample_digit_prompts

    class Detector:  # 'sees' the concept in every image of the concept block (the batch's tail), else digit 0
        def predict(self, imgs):
            pred = np.zeros(len(imgs), dtype=int)
            pred[-4:] = 7
            return pred

    samples = sample_digit_prompts(den_with_safety, Detector(), "plain", 2, 1, 1.5, seed=0, extra=(7, 4))
    hist, imgs = samples.histogram(), samples.images
    assert hist.shape == (10, 10) and imgs.shape[0] == 20  # the grid's samples: 2 per digit
    assert samples.pred.shape == (10, 2) and list(samples.extra) == [7] * 4  # per-sample outcomes for the claims
    assert np.allclose(hist.sum(1), 1)
    assert hist[7, 7] == 1.0  # the concept row: the 4 extra samples only
    assert all(hist[d, 0] == 1.0 for d in range(10) if d != 7)
