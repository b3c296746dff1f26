"""ASE early-exit forward on diffusers' DiTTransformer2DModel: exactness, schedule, counting, errors."""
import copy

import pytest
import torch

from models.early_exit_diffusion import (
    PAPER_DIT_XL2_SCHEDULE,
    EarlyExitDenoiser,
    ExitSchedule,
    FitConfig,
    block_evaluations_per_image,
    disable_per_block_label_dropout,
    dit_init_,
    drop_labels,
    early_exit_forward,
    fit_denoiser,
    freeze_time_embedders,
    make_scheduler,
    sample,
    schedule_for,
    tiny_dit,
)


def _randomised(model):
    """Random non-zero weights everywhere (diffusers' init leaves nothing zero, DiT init would)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return _randomised(tiny_dit(num_layers=4, hidden=32, heads=2, sample_size=8, patch_size=2))


def _inputs(b=6, size=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 1, size, size, generator=g)
    t = torch.tensor([0, 99, 100, 450, 999, 731])[:b]
    y = torch.arange(b) % 10
    return x, t, y


def test_full_schedule_equals_the_models_own_forward_exactly(dit):
    x, t, y = _inputs()
    with torch.no_grad():
        ref = dit(x, timestep=t, class_labels=y).sample
        out = early_exit_forward(dit, x, t, y, schedule_for(dit, None))
    assert torch.equal(out, ref)


def test_full_schedule_exact_for_a_learned_sigma_model_too():
    torch.manual_seed(0)
    from diffusers import DiTTransformer2DModel

    m = _randomised(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2,
                                          out_channels=4, num_layers=3, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=5))
    x = torch.randn(3, 2, 8, 8)
    t, y = torch.tensor([5, 500, 900]), torch.tensor([0, 3, 4])
    with torch.no_grad():
        assert torch.equal(early_exit_forward(m, x, t, y, schedule_for(m, None)), m(x, t, y).sample)
        eps = EarlyExitDenoiser(m, schedule_for(m, None))(x, t, y)
    assert eps.shape == x.shape  # eps half of [eps, sigma], as DiTPipeline uses it


def test_early_exit_equals_a_truncated_model(dit):
    """Exiting after k blocks == the model's own forward with only its first k blocks."""
    x, _, y = _inputs()
    t = torch.full((x.shape[0],), 950)  # last bin
    sched = ExitSchedule((4, 4, 4, 4, 4, 4, 4, 4, 4, 2), num_layers=4)
    truncated = copy.deepcopy(dit)
    truncated.transformer_blocks = truncated.transformer_blocks[:2]
    with torch.no_grad():
        assert torch.equal(early_exit_forward(dit, x, t, y, sched), truncated(x, t, y).sample)


def test_mixed_exits_in_one_batch_match_per_sample_forwards(dit):
    x, t, y = _inputs()
    sched = ExitSchedule((4, 4, 3, 3, 2, 2, 1, 1, 1, 1), num_layers=4)
    with torch.no_grad():
        batch = early_exit_forward(dit, x, t, y, sched)
        single = torch.cat([early_exit_forward(dit, x[i:i + 1], t[i:i + 1], y[i:i + 1], sched) for i in range(len(t))])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-5)
    # and samples with fewer blocks do differ from the full model's output
    with torch.no_grad():
        full = dit(x, t, y).sample
    assert not torch.allclose(batch[4], full[4])  # t=999 ran 1 block
    torch.testing.assert_close(batch[0], full[0], rtol=1e-5, atol=1e-5)  # t=0 ran all 4


def test_gradients_reach_only_the_blocks_a_sample_used(dit):
    m = copy.deepcopy(dit).train()
    x, _, y = _inputs(2)
    t = torch.tensor([950, 960])
    sched = ExitSchedule((4,) * 9 + (2,), num_layers=4)
    early_exit_forward(m, x, t, y, sched).pow(2).mean().backward()
    assert m.transformer_blocks[1].ff.net[2].weight.grad is not None
    assert m.transformer_blocks[2].ff.net[2].weight.grad is None
    assert m.transformer_blocks[3].ff.net[2].weight.grad is None


@pytest.mark.parametrize("t,expected", [(0, 6), (99, 6), (100, 6), (199, 6), (200, 5), (399, 5), (400, 4),
                                        (599, 4), (600, 3), (899, 3), (900, 3), (999, 3)])
def test_exit_count_follows_the_schedule_at_bin_edges(t, expected):
    sched = ExitSchedule((6, 6, 5, 5, 4, 4, 3, 3, 3, 3), num_layers=6)
    assert int(sched.blocks_at(t)) == expected


def test_bins_scale_with_the_number_of_training_timesteps():
    sched = ExitSchedule((10, 9, 8, 7, 6, 5, 4, 3, 2, 1), num_layers=10, num_train_timesteps=100)
    assert sched.blocks_at(torch.tensor([0, 9, 10, 55, 99])).tolist() == [10, 10, 9, 5, 1]
    assert int(sched.blocks_at(torch.tensor(99.7))) == 1  # float timesteps are floored into a bin


def test_paper_schedule_keeps_20_of_28_blocks():
    sched = ExitSchedule(PAPER_DIT_XL2_SCHEDULE, num_layers=28)
    assert sched.mean_blocks == 20
    assert abs(sched.compute_fraction - 20 / 28) < 1e-12
    assert sched.reversed().blocks == tuple(reversed(PAPER_DIT_XL2_SCHEDULE))


def test_block_counting_along_sampler_timesteps(dit):
    sched = ExitSchedule((4, 4, 3, 3, 2, 2, 1, 1, 1, 1), num_layers=4)
    den = EarlyExitDenoiser(dit, sched)
    scheduler = make_scheduler("ddim")
    labels = torch.arange(3)
    sample(den, scheduler, labels, (1, 8, 8), 10, torch.Generator().manual_seed(0))
    # DDIM-10 visits t = 900, 800, ..., 0: one timestep per bin, so each image runs sum(schedule) blocks
    assert [int(t) for t in scheduler.timesteps] == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert den.block_evaluations == 3 * sum(sched.blocks)
    assert block_evaluations_per_image(sched, scheduler.timesteps) == sum(sched.blocks)
    assert block_evaluations_per_image(sched, scheduler.timesteps, guidance=True) == 2 * sum(sched.blocks)
    full = EarlyExitDenoiser(dit, schedule_for(dit, None))
    sample(full, scheduler, labels, (1, 8, 8), 10, torch.Generator().manual_seed(0))
    assert full.block_evaluations == 3 * 10 * 4


@pytest.mark.parametrize("blocks,match", [
    ((7, 6, 5, 5, 4, 4, 3, 3, 3, 3), "has only 6"),
    ((6, 6, 5, 5, 4, 4, 3, 3, 3, 0), "at least 1"),
    ((6, 6, 5, 5, 4, 4, 3, 3, -1, 3), "at least 1"),
    ((6, 6, 5, 5, 4, 4, 3, 3, 3), "expected 10"),
    ((6, 6, 5, 5, 4, 4, 3, 3, 3, 3, 3), "expected 10"),
    ((6, 6, 5.5, 5, 4, 4, 3, 3, 3, 3), "integers"),
    ((6, 6, 5.0, 5, 4, 4, 3, 3, 3, 3), "integers"),
    ((6, 6, "5", 5, 4, 4, 3, 3, 3, 3), "integers"),
    ((6, 6, True, 5, 4, 4, 3, 3, 3, 3), "integers"),
])
def test_bad_schedules_give_clear_errors(blocks, match):
    with pytest.raises(ValueError, match=match):
        ExitSchedule(blocks, num_layers=6)


def test_schedule_is_checked_against_the_models_depth(dit):
    with pytest.raises(ValueError, match="has only 4"):
        schedule_for(dit, [6, 6, 5, 5, 4, 4, 3, 3, 3, 3])
    with pytest.raises(ValueError, match="list of 10"):
        ExitSchedule("6655443333", num_layers=6)


def test_label_dropout_happens_once_per_sample_not_per_block():
    m = tiny_dit(num_layers=3, hidden=32, heads=2, sample_size=8, patch_size=2).train()
    null = disable_per_block_label_dropout(m)
    assert null == 10
    assert all(b.norm1.emb.class_embedder.dropout_prob == 0 for b in m.transformer_blocks)
    y = torch.arange(1000) % 10
    dropped = drop_labels(y, 0.1, null, torch.Generator().manual_seed(0))
    assert 0.05 < (dropped == null).float().mean() < 0.15
    assert torch.equal(dropped[dropped != null], y[dropped != null])


def test_freezing_keeps_every_time_embedder_fixed_and_trains_the_rest():
    torch.manual_seed(0)
    m = dit_init_(tiny_dit(num_layers=2, hidden=32, heads=2, sample_size=8, patch_size=2))
    before = copy.deepcopy(m)
    x = torch.rand(64, 1, 8, 8) * 2 - 1
    y = torch.arange(64) % 10
    sched = ExitSchedule((2, 2, 2, 2, 2, 1, 1, 1, 1, 1), num_layers=2)
    fit_denoiser(m, sched, make_scheduler("ddpm"), x, y,
                 FitConfig(steps=3, batch_size=16, lr=1e-2, weight_decay=0.0, warmup_steps=0, ema_decay=0.999,
                           label_dropout=0.1, freeze_time_embedder=True, grad_clip=1.0),
                 torch.Generator().manual_seed(0))
    for b0, b1 in zip(before.transformer_blocks, m.transformer_blocks):
        for p0, p1 in zip(b0.norm1.emb.timestep_embedder.parameters(), b1.norm1.emb.timestep_embedder.parameters()):
            assert torch.equal(p0, p1)
    assert not torch.equal(before.proj_out_2.weight, m.proj_out_2.weight)
    assert not torch.equal(before.transformer_blocks[0].attn1.to_q.weight, m.transformer_blocks[0].attn1.to_q.weight)
    assert len(freeze_time_embedders(m)) < len(list(m.parameters()))


def test_dit_init_zeroes_adaln_gates_so_the_untrained_model_predicts_zero():
    m = dit_init_(tiny_dit(num_layers=2, hidden=32, heads=2, sample_size=8, patch_size=2)).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])).sample
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm_solver"])
def test_every_sampler_runs_with_the_early_exit_denoiser_and_guidance(dit, name):
    sched = ExitSchedule((4, 4, 3, 3, 2, 2, 1, 1, 1, 1), num_layers=4)
    den = EarlyExitDenoiser(dit, sched)
    out = sample(den, make_scheduler(name), torch.tensor([1, 2]), (1, 8, 8), 5, torch.Generator().manual_seed(0),
                 guidance_scale=1.5, null_label=10)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="null label"):
        sample(den, make_scheduler(name), torch.tensor([1]), (1, 8, 8), 2, torch.Generator(), guidance_scale=2.0)


def test_unknown_sampler_is_rejected():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("euler")


@pytest.mark.parametrize("name", ["ddpm", "dpm_solver"])
def test_lockstep_timing_grid_gives_exactly_the_images_of_sequential_sampling(dit, name):
    from models.early_exit_diffusion import sampling_grid

    dens = {"full": EarlyExitDenoiser(dit, ExitSchedule.full(4)),
            "ase": EarlyExitDenoiser(dit, ExitSchedule((4, 4, 3, 3, 2, 2, 1, 1, 1, 1), num_layers=4))}
    labels = torch.tensor([0, 1, 2])
    grid = sampling_grid(dens, {name: 4}, labels, (1, 8, 8), seeds=[3], batch_size=2, guidance_scale=1.5,
                         null_label=10, warmup=False)
    for variant, den in dens.items():
        gen = torch.Generator().manual_seed(3)
        ref = torch.cat([sample(den, make_scheduler(name), labels[i:i + 2], (1, 8, 8), 4, gen, 1.5, 10)
                         for i in (0, 2)])
        r = grid[(3, name, variant)]
        assert torch.equal(r["images"], ref)
        assert not r["images"].requires_grad  # no autograd graph kept across solver steps
        assert r["seconds"] > 0 and r["images_per_s"] > 0
    assert grid[(3, name, "ase")]["blocks_per_image"] < grid[(3, name, "full")]["blocks_per_image"]


def test_timing_passes_keep_the_images_and_block_counts_and_take_the_per_step_minimum(dit, monkeypatch):
    import models.early_exit_diffusion as eed

    dens = {"full": EarlyExitDenoiser(dit, ExitSchedule.full(4)),
            "ase": EarlyExitDenoiser(dit, ExitSchedule((4, 4, 3, 3, 2, 2, 1, 1, 1, 1), num_layers=4)),
            "other": EarlyExitDenoiser(dit, ExitSchedule.full(4).reversed())}
    labels = torch.tensor([0, 1, 2])
    kw = dict(seeds=[3], batch_size=2, guidance_scale=1.5, null_label=10, warmup=False)
    one = eed.sampling_grid(dens, {"ddpm": 4}, labels, (1, 8, 8), **kw)
    calls = []
    real = eed._sample_lockstep

    def fake_times(denoisers, *a, **k):  # pass r = 0, 1, 2: every step takes 3 - r s, but step 1 takes 1 + r s
        imgs, secs = real(denoisers, *a, **k)
        r = len(calls) % 3
        calls.append(sorted(denoisers))
        return imgs, {name: [3.0 - r if j != 1 else 1.0 + r for j in range(len(s))] for name, s in secs.items()}

    monkeypatch.setattr(eed, "_sample_lockstep", fake_times)
    three = eed.sampling_grid(dens, {"ddpm": 4}, labels, (1, 8, 8), timing_passes=3, timed=["full", "ase"], **kw)
    assert calls == [["ase", "full", "other"], ["ase", "full"], ["ase", "full"]] * 2  # 2 batches, 2 extra passes
    for v in dens:
        assert torch.equal(three[(3, "ddpm", v)]["images"], one[(3, "ddpm", v)]["images"])
        assert three[(3, "ddpm", v)]["blocks_per_image"] == one[(3, "ddpm", v)]["blocks_per_image"]
    # per step the minimum over the passes: 3 steps at 1 s (pass 3) and step 1 at 1 s (pass 1), per batch
    assert three[(3, "ddpm", "full")]["seconds"] == 2 * 4 * 1.0
    assert three[(3, "ddpm", "full")]["timing_passes"] == 3
    assert three[(3, "ddpm", "other")]["seconds"] == 2 * (3 * 3.0 + 1.0)  # one pass: untouched
    assert three[(3, "ddpm", "other")]["timing_passes"] == 1
    with pytest.raises(ValueError, match="timing_passes"):
        eed.sampling_grid(dens, {"ddpm": 4}, labels, (1, 8, 8), timing_passes=0, **kw)
    with pytest.raises(ValueError, match="among the denoisers"):
        eed.sampling_grid(dens, {"ddpm": 4}, labels, (1, 8, 8), timing_passes=2, timed=["ase", "nope"], **kw)


def test_ase_finetuning_lowers_the_early_exit_loss_below_naive_exiting():
    """The mechanism under test: after pretraining the full model, exiting early with its weights as they
    are (naive) costs loss; fine-tuning for the exit schedule (ASE) recovers part of it on a fixed batch."""
    import copy

    import torch

    from models import early_exit_diffusion as eed

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.tanh(torch.randn(64, 1, 8, 8, generator=g).cumsum(-1).cumsum(-2) / 4)  # smooth images
    y = torch.arange(64) % 4
    model = eed.tiny_dit(num_layers=4, hidden=16, heads=2, sample_size=8, patch_size=4, num_classes=4)
    noise = eed.make_scheduler("ddpm")
    cfg = eed.FitConfig(steps=60, batch_size=16, lr=3e-3, weight_decay=0.0, warmup_steps=10, ema_decay=0.9,
                        label_dropout=0.0, freeze_time_embedder=False, grad_clip=1.0)
    base = eed.fit_denoiser(model, eed.schedule_for(model, None), noise, x, y, cfg, g)
    exits = eed.schedule_for(base, [1, 1, 1, 1, 2, 2, 2, 3, 3, 4])

    def loss(m) -> float:
        with torch.no_grad():
            return float(eed.noise_prediction_loss(m, exits, noise, x, y, torch.Generator().manual_seed(7)))

    naive = loss(base)
    ase = eed.fit_denoiser(copy.deepcopy(base), exits, noise, x, y,
                           eed.FitConfig(**{**cfg.__dict__, "steps": 40}), torch.Generator().manual_seed(1))
    assert loss(ase) < 0.9 * naive


def test_lr_factor_warms_up_then_holds_or_decays_to_zero():
    from models.early_exit_diffusion import lr_factor

    def cfg(schedule):
        return FitConfig(steps=110, batch_size=1, lr=1.0, weight_decay=0.0, warmup_steps=10, ema_decay=0.9,
                         label_dropout=0.0, freeze_time_embedder=False, grad_clip=None, lr_schedule=schedule)

    const, cos = cfg("constant"), cfg("cosine")
    assert [lr_factor(s, const) for s in (0, 4, 9, 10, 109)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert lr_factor(4, cos) == 0.5 and lr_factor(10, cos) == 1.0
    assert lr_factor(60, cos) == pytest.approx(0.5) and lr_factor(110, cos) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_factor(s, cos) >= lr_factor(s + 1, cos) for s in range(10, 110))
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(20, cfg("linear"))
