"""Test-time merging, trimming, merge rules and fine-tuning on a tiny real timm ViT with a trained-looking pool."""

from __future__ import annotations

import pytest
import torch

from amt.backbone import Backbone, build_vit
from amt.config import FinetuneConfig, LoRAConfig, MergeConfig
from amt.finetune import FinetunedMethod
from amt.lora import active_adapter, inject_lora, lora_layers
from amt.merge import (BackboneMethod, MemberScores, MergeParams, PoolMethod, merge_coefficients, merge_grid,
                       merged_task, pseudo_queries, trim_weight, trimmed_layers)

SIZE = 32
NAMES = ["m0", "m1", "m2"]
CFG = MergeConfig(pseudo_per_image=2, lambda_grid=(0.5,), beta_grid=(6.0,), rho_grid=(1.0, 0.5),
                  trim_layers_grid=("mlp",))


def _pool() -> Backbone:
    """A tiny ViT with 3 SVD-initialised members whose factors were moved apart (as training would)."""
    torch.manual_seed(0)
    model = Backbone(build_vit("vit_tiny_test", SIZE), mean=(0.5,) * 3, std=(0.5,) * 3).eval()
    inject_lora(model.vit, LoRAConfig().targets, NAMES, rank=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for i, name in enumerate(NAMES):
                layer.lora_B[name].add_(0.05 * (i + 1) * torch.randn(layer.lora_B[name].shape, generator=g))
    return model


def _support(n_way=3, n_shot=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_way * n_shot, 3, SIZE, SIZE, generator=g), torch.arange(n_way).repeat_interleave(n_shot)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_merge_and_trim_restore_the_weights_bit_for_bit():
    model = _pool()
    before = _weights(model)
    with merged_task(model, {"m0": 0.3, "m2": 0.7}, rho=0.5, group="all"):
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError, match="boom"):
        with merged_task(model, {"m1": 1.0}, rho=0.5, group="mlp"):
            raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())


def test_coefficients_are_a_convex_combination_of_the_top_k():
    scores = MemberScores(torch.tensor([0.9, 0.5, 0.8, 0.1]), torch.tensor([0.1, 0.2, 0.3, 0.0]), torch.zeros(4))
    for k in (1, 2, 3):
        zeta = merge_coefficients(scores, 0.5, 6.0, k)
        assert zeta.sum().item() == pytest.approx(1.0) and (zeta > 0).sum() == k and (zeta >= 0).all()
    zeta = merge_coefficients(scores, 0.5, 6.0, 2)
    score = 0.5 * scores.compactness - 0.5 * scores.divergence
    assert set(torch.nonzero(zeta).flatten().tolist()) == set(torch.topk(score, 2).indices.tolist())
    assert merge_coefficients(scores, 1.0, 12.0, 2)[0] > merge_coefficients(scores, 1.0, 1.0, 2)[0]  # β sharpens


def test_one_member_with_weight_one_equals_that_member():
    model = _pool()
    x = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), active_adapter(model, "m1"):
        ref = model(x)
    with torch.no_grad(), merged_task(model, {"m1": 1.0}):
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_trimming_keeps_the_expected_rank_and_rho_one_is_the_identity():
    g = torch.Generator().manual_seed(0)
    for shape in [(48, 144), (144, 48)]:
        w = torch.randn(*shape, generator=g)
        assert torch.equal(trim_weight(w, 1.0), w) or torch.allclose(trim_weight(w, 1.0), w, atol=1e-5)
        t = trim_weight(w, 0.25)
        assert torch.linalg.matrix_rank(t, rtol=1e-4).item() == 12
        s_full, s_trim = torch.linalg.svdvals(w.double()), torch.linalg.svdvals(t.double())
        torch.testing.assert_close(s_trim[:12], s_full[:12])  # the top singular values are kept exactly
    model = _pool()
    layers = trimmed_layers(model, "mlp")
    assert layers and all(n.endswith(("mlp.fc1", "mlp.fc2")) for n in layers)
    with merged_task(model, {"m0": 1.0}, rho=0.5, group="mlp"):
        for layer in layers.values():
            assert torch.linalg.matrix_rank(layer.weight, rtol=1e-4).item() == min(layer.weight.shape) // 2
    with pytest.raises(ValueError, match="rho"):
        trim_weight(w, 0.0)


def test_batched_trimming_equals_trimming_each_layer():
    from amt.merge import trim_

    g = torch.Generator().manual_seed(0)
    stack = torch.randn(3, 40, 24, generator=g)
    batched = trim_weight(stack, 0.5)
    for w, t in zip(stack, batched):
        torch.testing.assert_close(t, trim_weight(w, 0.5), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(trim_weight(stack, 0.5, "svd"), batched, atol=1e-5, rtol=1e-5)
    model = _pool()  # layers of several shapes (qkv, proj, fc1, fc2), trimmed in one call per shape
    with merged_task(model, {"m0": 0.5, "m1": 0.5}):
        expected = {n: trim_weight(layer.weight, 0.5) for n, layer in trimmed_layers(model, "all").items()}
        trim_(model, 0.5, "all")
        for n, layer in trimmed_layers(model, "all").items():
            torch.testing.assert_close(layer.weight, expected[n], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="trim method"):
        trim_weight(stack, 0.5, "qr")


def test_pseudo_queries_are_seeded_augmentations_in_range():
    x, y = _support()
    a, ya = pseudo_queries(x, y, CFG, torch.Generator().manual_seed(0))
    b, _ = pseudo_queries(x, y, CFG, torch.Generator().manual_seed(0))
    c, _ = pseudo_queries(x, y, CFG, torch.Generator().manual_seed(1))
    assert a.shape == (2 * len(x), 3, SIZE, SIZE) and torch.equal(ya, y.repeat(2))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.min() >= 0 and a.max() <= 1
    none = MergeConfig(pseudo_per_image=1, aug_prob=0.0)
    assert torch.equal(pseudo_queries(x, y, none, torch.Generator().manual_seed(0))[0], x)


@pytest.mark.parametrize("rule", ["amt", "uniform", "logit_avg", "min_support_ce", "single"])
def test_every_rule_classifies_and_restores_the_weights(rule):
    model = _pool()
    before = _weights(model)
    method = PoolMethod(model, NAMES, rule, CFG, member=2)
    method.params = MergeParams(0.5, 6.0, 0.5, "mlp")
    x, y = _support()
    q = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with method.adapt(x, y, 3, torch.Generator().manual_seed(0)) as (fn, record):
        logits = fn(q)
        assert logits.shape == (6, 3)
        if rule == "logit_avg":
            assert record.coefficients is None
        else:
            z = torch.tensor(record.coefficients)
            assert z.sum().item() == pytest.approx(1.0)
            expected_nonzero = {"amt": 2, "uniform": 3, "min_support_ce": 1, "single": 1}[rule]
            assert int((z > 0).sum()) == expected_nonzero
            if rule == "single":
                assert z[2] == 1.0
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())


def test_logit_average_is_the_mean_of_the_members_logits():
    model = _pool()
    x, y = _support()
    q = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    singles = []
    for i in range(3):
        with PoolMethod(model, NAMES, "single", CFG, member=i).adapt(x, y, 3, torch.Generator()) as (fn, _):
            with torch.no_grad():
                singles.append(fn(q))
    with PoolMethod(model, NAMES, "logit_avg", CFG).adapt(x, y, 3, torch.Generator()) as (fn, _):
        with torch.no_grad():
            torch.testing.assert_close(fn(q), torch.stack(singles).mean(0), atol=1e-5, rtol=1e-5)


def test_no_ttm_picks_the_member_with_the_lowest_support_ce():
    model = _pool()
    x, y = _support()
    method = PoolMethod(model, NAMES, "min_support_ce", CFG)
    scores = method.scores(x, y, 3, torch.Generator().manual_seed(0))
    z = method.coefficients(scores, method.params)
    assert int(z.argmax()) == int(scores.support_ce.argmin())


def test_attack_gradients_reach_the_images_through_the_merged_model():
    model = _pool()
    method = PoolMethod(model, NAMES, "amt", CFG)
    method.params = MergeParams(0.5, 6.0, 0.5, "all")
    x, y = _support()
    q = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    with method.adapt(x, y, 3, torch.Generator().manual_seed(0)) as (fn, _):
        fn(q).logsumexp(-1).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # evaluation models are frozen


def test_finetuning_changes_the_task_model_and_restores_every_weight():
    model = _pool()
    before = _weights(model)
    x, y = _support()
    q = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    inner = PoolMethod(model, NAMES, "uniform", CFG)
    outs = {}
    for lr in (0.0, 1e-2):
        method = FinetunedMethod(inner, FinetuneConfig(steps=3, lr=lr), CFG)
        with method.adapt(x, y, 3, torch.Generator().manual_seed(0)) as (fn, record):
            with torch.no_grad():
                outs[lr] = fn(q)
            assert record.extra["finetune_lr"] == lr
        assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
        assert all(not p.requires_grad for n, p in model.named_parameters() if "lora" not in n)
    assert not torch.allclose(outs[0.0], outs[1e-2])
    pm = FinetunedMethod(BackboneMethod(_pool()), FinetuneConfig(steps=2, lr=1e-2), CFG)
    with pm.adapt(x, y, 3, torch.Generator()) as (fn, _):
        assert fn(q).shape == (6, 3)


def test_grid_starts_without_trimming():
    grid = merge_grid(CFG)
    assert grid[0].rho == 1.0 and grid[0].trim_layers == "none"
    assert {(p.rho, p.trim_layers) for p in grid} == {(1.0, "none"), (0.5, "mlp")}


def test_gram_and_svd_trimming_agree():
    g = torch.Generator().manual_seed(1)
    for shape in [(96, 288), (384, 96), (64, 64)]:
        w = torch.randn(*shape, generator=g)
        for rho in (0.9, 0.5, 0.1):
            torch.testing.assert_close(trim_weight(w, rho, "gram"), trim_weight(w, rho, "svd"), atol=1e-5, rtol=1e-5)
