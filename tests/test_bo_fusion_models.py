"""Unit tests of the BOMF method (models/bo_fusion/) and its data set (tasks/bo_fusion/data.py)."""

import pytest
import torch
from torch import nn

from models.bo_fusion import backbone, bo, fusion, training
from tasks.bo_fusion.data import build_templated_sentiment
from tasks.metrics import macro_f1


def test_simplex_weights_normalise_and_fall_back_to_uniform():
    w = fusion.simplex_weights(torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.allclose(w[0], torch.tensor([0.25, 0.75, 0.0]))
    assert torch.allclose(w[1], torch.full((3,), 1 / 3))
    assert torch.allclose(w.sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="non-negative"):
        fusion.simplex_weights(torch.tensor([-0.1, 1.0]))


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, inputs, attention_mask):
        h = (self.emb(inputs) * attention_mask[..., None]).sum(1)
        return self.head(h)


def _checkpoints(model, k=3):
    out = []
    for i in range(k):
        torch.manual_seed(i)
        out.append({n: torch.randn_like(p) for n, p in model.named_parameters() if n.startswith("head")})
    return out


def _data(n=20):
    g = torch.Generator().manual_seed(0)
    return fusion.TextBatches(torch.randint(0, 10, (n, 5), generator=g), torch.ones(n, 5),
                          torch.randint(0, 3, (n,), generator=g))


def test_fused_parameters_equal_a_checkpoint_for_one_hot_and_the_mean_for_uniform():
    model = TinyClassifier()
    ckpts = _checkpoints(model)
    fused = fusion.FusedClassifier(model, ckpts, macro_f1)
    one_hot = fused.params(torch.tensor([0.0, 1.0, 0.0]))
    for name in ckpts[1]:
        assert torch.equal(one_hot[name], ckpts[1][name])
    uniform = fused.params(torch.full((3,), 1 / 3))
    for name in ckpts[0]:
        assert torch.allclose(uniform[name], sum(c[name] for c in ckpts) / 3, atol=1e-6)


def test_functional_call_matches_loading_the_fused_weights():
    model = TinyClassifier()
    ckpts = _checkpoints(model)
    data = _data()
    fused = fusion.FusedClassifier(model, ckpts, macro_f1)
    w = fusion.simplex_weights(torch.tensor([0.2, 0.5, 0.9]))
    f1, loss = fused.evaluate(w, data)
    model.load_state_dict(fused.params(w), strict=False)
    f1_loaded, loss_loaded = fusion.evaluate(model, data, macro_f1)
    assert f1 == pytest.approx(f1_loaded)
    assert loss == pytest.approx(loss_loaded, rel=1e-6)


def test_fusion_needs_two_checkpoints_with_matching_names():
    model = TinyClassifier()
    ckpts = _checkpoints(model, 2)
    with pytest.raises(ValueError, match="K=2"):
        fusion.stack_checkpoints(ckpts[:1])
    with pytest.raises(ValueError, match="different parameter names"):
        fusion.stack_checkpoints([ckpts[0], {"x": torch.zeros(1), "y": torch.zeros(1)}])
    with pytest.raises(ValueError, match="not in the model"):
        fusion.FusedClassifier(model, [{"nope": torch.zeros(1)}] * 2, macro_f1)


def test_macro_f1_weighs_rare_class_like_frequent_one():
    # the one macro-F1 (tasks.metrics) that the stages pass into the model code
    target = torch.tensor([0] * 9 + [1]).numpy()
    assert macro_f1(torch.zeros(10, dtype=torch.long).numpy(), target, 2) == pytest.approx((18 / 19) / 2)
    assert macro_f1(target, target, 2) == 1.0
    assert macro_f1(target, target, 3) == pytest.approx(2 / 3)  # a class absent from both scores 0


def test_pick_evenly_keeps_the_ends_and_spaces_by_position():
    assert training.pick_evenly([50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150, 160, 170, 180, 190, 200], 4) \
        == [50, 100, 150, 200]
    assert training.pick_evenly([30, 10, 20], 5) == [10, 20, 30]  # fewer candidates than K: all of them


def _early_stop(model, data, **kw):
    args = dict(metric=macro_f1, lr=0.05, batch_size=16, max_steps=200, warmup_steps=2, weight_decay=0.0, seed=0,
                eval_every=5, patience=3, save_every=5, n_checkpoints=4, window=(0.5, 2.0))
    return training.finetune_early_stopping(model, data, data, **{**args, **kw})


def test_early_stopping_finds_the_best_step_and_collects_half_to_twice_it():
    torch.manual_seed(0)
    model = TinyClassifier()
    data = _data(64)
    res = _early_stop(model, data)
    steps, f1s = [c[0] for c in res.val_curve], [c[1] for c in res.val_curve]
    assert res.best_step == steps[f1s.index(max(f1s))] and res.best_val_metric == max(f1s)
    assert res.stop_step == steps[-1] and res.stop_step - res.best_step == 3 * 5  # the patience ran out
    assert res.window == (0.5 * res.best_step, 2.0 * res.best_step)
    assert len(res.checkpoint_steps) == 4 and res.checkpoint_steps == sorted(res.checkpoint_steps)
    assert all(res.window[0] <= s <= res.window[1] and s % 5 == 0 for s in res.checkpoint_steps)
    assert res.last_step == max(res.stop_step, res.checkpoint_steps[-1]) and not res.truncated
    # the checkpoints are those of a plain re-run from the same seed (the paper re-trains to collect them)
    torch.manual_seed(0)
    again = TinyClassifier()
    rerun = training.finetune_collect(again, data, None, metric=macro_f1, lr=0.05, batch_size=16,
                                      steps=res.checkpoint_steps[-1], warmup_steps=2, weight_decay=0.0, seed=0,
                                      checkpoint_steps=res.checkpoint_steps)
    for a, b in zip(res.checkpoints, rerun.checkpoints):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_early_stopping_trains_on_to_twice_the_best_step_and_reports_a_cut():
    torch.manual_seed(0)
    data = _data(64)
    res = _early_stop(TinyClassifier(), data, patience=1, lr=0.01)
    assert res.last_step >= 2 * res.best_step or res.truncated
    cut = _early_stop(TinyClassifier(), data, max_steps=10, patience=50, lr=0.01)
    assert cut.stop_step == 10 and cut.truncated == (cut.window[1] > 10)
    with pytest.raises(ValueError, match="holds 1 checkpoint"):
        _early_stop(TinyClassifier(), data, max_steps=5, patience=50, save_every=5)
    with pytest.raises(ValueError, match="window"):
        _early_stop(TinyClassifier(), data, window=(2.0, 0.5))


def test_bomf_objectives_maximise_the_metric_and_the_negative_loss_on_the_members_scale():
    f1s, losses = [0.60, 0.70, 0.80], [0.50, 0.40, 0.45]
    members = [fusion.bomf_objectives(f, l, f1s, losses) for f, l in zip(f1s, losses)]
    assert members[2][0] == pytest.approx(1.0) and members[0][0] == pytest.approx(0.0)   # best / worst F1
    assert members[1][1] == pytest.approx(1.0) and members[0][1] == pytest.approx(0.0)   # lowest loss scores 1
    assert members[2][1] == pytest.approx(0.5)
    lower = fusion.bomf_objectives(0.7, 0.30, f1s, losses)  # a fused model below every member's loss
    higher = fusion.bomf_objectives(0.7, 0.60, f1s, losses)
    assert lower[1] > 1.0 > 0.0 > higher[1] and lower[1] == pytest.approx(2.0)  # sign: less loss is better
    assert fusion.bomf_objectives(0.7, 0.4, [0.7, 0.7], [0.4, 0.4]) == [0.0, 0.0]  # flat members: no division


def test_majority_metric_is_the_floor_of_always_predicting_the_frequent_class():
    labels = torch.tensor([1] * 6 + [0] * 3 + [2])
    assert fusion.majority_metric(labels, 3, macro_f1) == pytest.approx((2 * 6 / (6 + 10)) / 3)


def test_finetune_collects_checkpoints_and_lowers_training_loss():
    torch.manual_seed(0)
    model = TinyClassifier()
    data = _data(64)
    losses = []
    res = training.finetune_collect(model, data, data, metric=macro_f1, lr=0.05, batch_size=16, steps=40, warmup_steps=2,
                              weight_decay=0.0, seed=0, eval_every=10, checkpoint_steps=[20, 30, 40],
                              on_step=lambda s, l: losses.append(l))
    assert res.checkpoint_steps == [20, 30, 40]
    assert len(res.checkpoints) == 3 and not torch.equal(res.checkpoints[0]["head.weight"],
                                                         res.checkpoints[2]["head.weight"])
    assert sum(losses[-5:]) < sum(losses[:5])
    with pytest.raises(ValueError, match="positive"):
        training.finetune_collect(model, data, None, metric=macro_f1, lr=0.0, batch_size=16, steps=1, warmup_steps=0,
                            weight_decay=0.0, seed=0)


FAST = bo.AcquisitionBudget(num_restarts=2, raw_samples=32, mc_samples=32, maxiter=30, fit_maxiter=None)


def test_single_objective_bo_finds_the_peak_of_a_smooth_function():
    bounds = torch.tensor([[-5.0, 8.0], [-2.0, 64.0]])

    def f(x):
        return -((x[0] + 3.5) ** 2) - ((x[1] - 40.0) / 20.0) ** 2

    trace = bo.maximise_single_objective(f, bounds, n_initial=4, n_iterations=8, seed=0, budget=FAST,
                                         round_input=lambda x: torch.stack([x[0], x[1].round()]))
    assert trace.X.shape == (12, 2)
    assert torch.all(trace.X >= bounds[0]) and torch.all(trace.X <= bounds[1])
    assert torch.all(trace.X[:, 1] == trace.X[:, 1].round())
    assert trace.Y[4:].max() > trace.Y[:4].max()


def test_two_objective_bo_stays_in_bounds_and_grows_hypervolume_on_a_known_front():
    # f1 = x0, f2 = 1 - x0^2 - x1: the Pareto front is x1 = 0, x0 in [0, 1] (hypervolume 2/3 from ref 0).
    bounds = torch.tensor([[0.0, 0.0], [1.0, 1.0]])

    def f(x):
        return [x[0].item(), 1 - x[0].item() ** 2 - x[1].item()]

    trace = bo.maximise_two_objectives(f, bounds, [0.0, 0.0], n_initial=4, n_iterations=8, seed=0,
                                       budget=FAST)
    assert torch.all(trace.X >= 0) and torch.all(trace.X <= 1)
    hv = trace.hypervolume
    assert len(hv) == 9 and all(b >= a - 1e-12 for a, b in zip(hv, hv[1:]))
    assert hv[-1] > hv[0]
    assert hv[-1] <= 2 / 3 + 1e-9
    assert trace.model_seconds > 0 and trace.eval_seconds >= 0


def test_two_objective_bo_never_compiles_a_cpp_extension(monkeypatch):
    """botorch's optional fused qLogNEHVI kernel is JIT-compiled behind a lock file that a killed process
    leaves behind (every later run then waits forever): the pure-PyTorch path is used instead."""
    import torch.utils.cpp_extension as cpp_extension
    from botorch.acquisition.multi_objective import logei

    def refuse(*args, **kwargs):
        raise AssertionError("a C++ extension was compiled at run time")

    monkeypatch.setattr(cpp_extension, "load", refuse)
    monkeypatch.setattr(logei, "_load_attempted", False)
    trace = bo.maximise_two_objectives(lambda x: [x[0].item(), 1 - x[1].item()],
                                       torch.tensor([[0.0, 0.0], [1.0, 1.0]]), [0.0, 0.0], n_initial=3,
                                       n_iterations=1, seed=0, budget=FAST)
    assert len(trace.hypervolume) == 2 and logei._C is None


def test_bo_rejects_empty_search_space_and_bad_budgets():
    with pytest.raises(ValueError, match="empty search space"):
        bo.maximise_single_objective(lambda x: 0.0, torch.zeros(2, 0), n_initial=2, n_iterations=1, seed=0,
                                     budget=FAST)
    with pytest.raises(ValueError, match="upper bound"):
        bo.maximise_two_objectives(lambda x: [0, 0], torch.tensor([[1.0], [0.0]]), [0, 0], n_initial=2,
                                   n_iterations=1, seed=0, budget=FAST)
    with pytest.raises(ValueError, match="n_initial"):
        bo.maximise_single_objective(lambda x: 0.0, torch.tensor([[0.0], [1.0]]), n_initial=0,
                                     n_iterations=1, seed=0, budget=FAST)


def test_greedy_soup_adds_members_only_while_metric_does_not_drop():
    # soup metric = mean of member qualities, so only members at least as good as the soup get added
    quality = [0.9, 0.5, 0.85, 0.95]

    def soup_metric(w):
        return float(sum(wi * q for wi, q in zip(w.tolist(), quality)))

    w, best = fusion.greedy_soup(soup_metric, quality)
    assert w[3] > 0 and w[1] == 0
    assert best >= max(quality)
    assert w.sum().item() == pytest.approx(1.0)


def test_templated_sentiment_is_imbalanced_noisy_and_holds_out_words():
    d = build_templated_sentiment(3000, 500, 500, seed=1)
    labels = torch.tensor(d["test"].labels)
    freq = torch.bincount(labels, minlength=3).float() / len(labels)
    assert freq[1] > 0.5 and freq[2] < 0.2
    train_words = {w for t in d["train"].texts for w in t.replace(",", "").split()}
    test_words = {w for t in d["test"].texts for w in t.replace(",", "").split()}
    assert len(test_words - train_words) >= 10
    with pytest.raises(ValueError, match="at least one"):
        build_templated_sentiment(0, 1, 1)


def test_top_layers_on_cached_features_give_the_full_models_logits():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=32, num_labels=3)
    full = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 50, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 4:] = 0
    feats = backbone.frozen_features(full, ids, mask, n_frozen=2)
    top = backbone.TopLayersClassifier(full, n_frozen=2).eval()
    with torch.no_grad():
        assert torch.allclose(top(feats, mask), full(ids, attention_mask=mask).logits, atol=1e-5)
    with pytest.raises(ValueError, match="n_frozen"):
        backbone.TopLayersClassifier(full, n_frozen=4)
    head_only = backbone.TopLayersClassifier(full, n_frozen=3).eval()
    with torch.no_grad():
        assert torch.allclose(head_only(backbone.frozen_features(full, ids, mask, 3), mask),
                              full(ids, attention_mask=mask).logits, atol=1e-5)


def test_feature_cache_continues_from_a_lower_cut_and_is_passed_explicitly():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=32, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 50, (5, 6))
    mask = torch.ones(5, 6, dtype=torch.long)
    cache = backbone.FrozenFeatureCache()
    low = cache.features(model, "train", ids, mask, 1)
    high = cache.features(model, "train", ids, mask, 2)  # continues from the cut at 1
    assert torch.allclose(high, backbone.frozen_features(model, ids, mask, 2), atol=1e-6)
    assert cache.features(model, "train", ids, mask, 1) is low  # computed once
    assert backbone.FrozenFeatureCache().features(model, "train", ids, mask, 1) is not low  # no shared global


def test_split_batches_feeds_the_top_layers_the_cached_features(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                             num_attention_heads=2, intermediate_size=32,
                                             num_labels=3)).save_pretrained(tmp_path)
    model = backbone.build_trainable(tmp_path, 3, num_layers=None, variant="full", frozen_layers=2,
                                     cache_frozen=True, lora_rank=2, lora_alpha=4.0, seed=0, device="cpu")
    assert model.n_cached == 2 and isinstance(model.module, backbone.TopLayersClassifier)
    trained = {n for n, p in model.hf.named_parameters() if p.requires_grad}
    assert trained and all("layer.0." not in n and "layer.1." not in n for n in trained)
    assert not any("embeddings" in n for n in trained)
    everything = backbone.build_trainable(tmp_path, 3, num_layers=None, variant="full", frozen_layers=0,
                                          cache_frozen=True, lora_rank=2, lora_alpha=4.0, seed=0, device="cpu")
    assert all(p.requires_grad for p in everything.hf.parameters())  # the paper's full fine-tune
    g = torch.Generator().manual_seed(1)
    tensors = {"val_ids": torch.randint(0, 50, (4, 6), generator=g), "val_mask": torch.ones(4, 6, dtype=torch.long),
               "val_labels": torch.tensor([0, 1, 2, 1])}
    data = backbone.split_batches(model, tensors, ("val",), backbone.FrozenFeatureCache())
    model.hf.eval()
    with torch.no_grad():
        assert torch.allclose(model.module(data["val"].inputs, data["val"].attention_mask),
                              model.hf(tensors["val_ids"], attention_mask=tensors["val_mask"]).logits, atol=1e-5)
