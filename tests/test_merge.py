"""Test-time merging pieces on a tiny real timm ViT with a trained-looking pool: pseudo-queries, member scores,
coefficients, merging, trimming."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from amt.attacks import adversarial_queries
from amt.backbone import Backbone
from amt.config import AttackConfig, AugmentConfig, LoRAConfig, MergeConfig
from amt.lora import active_adapter, inject_lora, lora_layers
from amt.merge import (
    MemberScores,
    member_scores,
    merge_coefficients,
    merge_grid,
    merged_task,
    pseudo_queries,
    trim_weight,
    trimmed_layers,
)

from conftest import assert_same_state, gen, snapshot, tiny_backbone

SIZE = 32
NAMES = ["m0", "m1", "m2"]
CFG = MergeConfig(lambda_grid=(0.5,), beta_grid=(6.0,), rho_grid=(1.0, 0.5), trim_group_grid=("mlp",))
AUG = AugmentConfig(pseudo_per_image=2)


def make_pool() -> Backbone:
    """A tiny ViT with 3 SVD-initialised members whose factors were moved apart (as training would)."""
    model = tiny_backbone(image_size=SIZE)
    inject_lora(model.vit, LoRAConfig().targets, NAMES, rank=4)
    g = gen(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for i, name in enumerate(NAMES):
                layer.lora_B[name].add_(0.05 * (i + 1) * torch.randn(layer.lora_B[name].shape, generator=g))
    return model


def make_support(n_way=3, n_shot=2, seed=0):
    return torch.rand(n_way * n_shot, 3, SIZE, SIZE, generator=gen(seed)), torch.arange(n_way).repeat_interleave(n_shot)


def test_merge_and_trim_restore_the_weights_bit_for_bit():
    model = make_pool()
    before = snapshot(model)
    with merged_task(model, {"m0": 0.3, "m2": 0.7}, rho=0.5, group="all"):
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert_same_state(before, model)
    with pytest.raises(RuntimeError, match="boom"), merged_task(model, {"m1": 1.0}, rho=0.5, group="mlp"):
        raise RuntimeError("boom")
    assert_same_state(before, model)


def test_coefficients_are_a_convex_combination_of_the_top_k():
    scores = MemberScores(torch.tensor([0.9, 0.5, 0.8, 0.1]), torch.tensor([0.1, 0.2, 0.3, 0.0]), torch.zeros(4))
    for k in (1, 2, 3):
        zeta = merge_coefficients(scores, 0.5, 6.0, k)
        assert zeta.sum().item() == pytest.approx(1.0) and (zeta > 0).sum() == k and (zeta >= 0).all()
    zeta = merge_coefficients(scores, 0.5, 6.0, 2)
    score = 0.5 * scores.compactness - 0.5 * scores.divergence
    assert set(torch.nonzero(zeta).flatten().tolist()) == set(torch.topk(score, 2).indices.tolist())
    assert merge_coefficients(scores, 1.0, 12.0, 2)[0] > merge_coefficients(scores, 1.0, 1.0, 2)[0]  # β sharpens


@pytest.mark.parametrize("lam,beta", [(0.5, 6.0), (0.25, 2.0), (1.0, 12.0)])
def test_coefficient_ratios_follow_the_exponential_of_the_score_difference(lam, beta):
    c, v = torch.tensor([0.9, 0.5, 0.8, 0.1]), torch.tensor([0.1, 0.25, 0.3, 0.05])  # no tied scores
    zeta = merge_coefficients(MemberScores(c, v, torch.zeros(4)), lam, beta, 3)
    score = [lam * float(ci) - (1 - lam) * float(vi) for ci, vi in zip(c, v)]
    kept = sorted(range(4), key=lambda i: -score[i])[:3]
    u = {i: math.exp(-beta * (1 - score[i])) for i in kept}
    for i in range(4):  # by hand: ζ_i = u_i / Σ_kept u, and ζ_i / ζ_j = exp(β (s_i − s_j))
        assert float(zeta[i]) == pytest.approx(u[i] / sum(u.values()) if i in kept else 0.0, rel=1e-5, abs=1e-7)
    i, j = kept[0], kept[1]
    assert float(zeta[i] / zeta[j]) == pytest.approx(math.exp(beta * (score[i] - score[j])), rel=1e-5)


def test_member_scores_match_a_hand_computation_per_member():
    model = make_pool()
    x, y = make_support()
    pseudo, py = pseudo_queries(x, y, AUG, gen(0))
    scales = [7.0, 10.0, 13.0]
    scores = member_scores(model, NAMES, scales, x, y, 3, pseudo, py)
    for i, name in enumerate(NAMES):
        with torch.no_grad(), active_adapter(model, name):
            fs, fq = F.normalize(model(x), dim=-1), F.normalize(model(pseudo), dim=-1)
        protos = F.normalize(torch.stack([fs[y == c].mean(0) for c in range(3)]), dim=-1)
        cos = fq @ protos.T  # [M, 3]
        own = cos[torch.arange(len(py)), py]
        others = (cos.sum(1) - own) / 2
        assert float(scores.compactness[i]) == pytest.approx(float(own.mean()), abs=1e-5)
        assert float(scores.divergence[i]) == pytest.approx(float(others.mean()), abs=1e-5)
        assert float(scores.support_ce[i]) == pytest.approx(float(F.cross_entropy(scales[i] * cos, py)), abs=1e-4)
    assert len(set(scores.compactness.tolist())) == 3  # the members really differ


def test_one_member_with_weight_one_equals_that_member():
    model = make_pool()
    x = torch.rand(4, 3, SIZE, SIZE, generator=gen(3))
    with torch.no_grad(), active_adapter(model, "m1"):
        ref = model(x)
    with torch.no_grad(), merged_task(model, {"m1": 1.0}):
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_trimming_keeps_the_expected_rank_and_rho_one_is_the_identity():
    g = gen(0)
    for shape in [(48, 144), (144, 48)]:
        w = torch.randn(*shape, generator=g)
        assert torch.equal(trim_weight(w, 1.0), w) or torch.allclose(trim_weight(w, 1.0), w, atol=1e-5)
        t = trim_weight(w, 0.25)
        assert torch.linalg.matrix_rank(t, rtol=1e-4).item() == 12
        s_full, s_trim = torch.linalg.svdvals(w.double()), torch.linalg.svdvals(t.double())
        torch.testing.assert_close(s_trim[:12], s_full[:12])  # the top singular values are kept exactly
    model = make_pool()
    layers = trimmed_layers(model, "mlp")
    assert layers and all(n.endswith(("mlp.fc1", "mlp.fc2")) for n in layers)
    with merged_task(model, {"m0": 1.0}, rho=0.5, group="mlp"):
        for layer in layers.values():
            assert torch.linalg.matrix_rank(layer.weight, rtol=1e-4).item() == min(layer.weight.shape) // 2
    with pytest.raises(ValueError, match="rho"):
        trim_weight(w, 0.0)


def test_batched_trimming_equals_trimming_each_layer():
    from amt.merge import trim_

    g = gen(0)
    stack = torch.randn(3, 40, 24, generator=g)
    batched = trim_weight(stack, 0.5)
    for w, t in zip(stack, batched):
        torch.testing.assert_close(t, trim_weight(w, 0.5), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(trim_weight(stack, 0.5, "svd"), batched, atol=1e-5, rtol=1e-5)
    model = make_pool()  # layers of several shapes (qkv, proj, fc1, fc2), trimmed in one call per shape
    with merged_task(model, {"m0": 0.5, "m1": 0.5}):
        expected = {n: trim_weight(layer.weight, 0.5) for n, layer in trimmed_layers(model, "all").items()}
        trim_(model, 0.5, "all")
        for n, layer in trimmed_layers(model, "all").items():
            torch.testing.assert_close(layer.weight, expected[n], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="trim method"):
        trim_weight(stack, 0.5, "qr")


def test_pseudo_queries_are_seeded_augmentations_in_range():
    x, y = make_support()
    a, ya = pseudo_queries(x, y, AUG, gen(0))
    b, _ = pseudo_queries(x, y, AUG, gen(0))
    c, _ = pseudo_queries(x, y, AUG, gen(1))
    assert a.shape == (2 * len(x), 3, SIZE, SIZE) and torch.equal(ya, y.repeat(2))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.min() >= 0 and a.max() <= 1
    none = AugmentConfig(pseudo_per_image=1, pseudo_prob=0.0)
    assert torch.equal(pseudo_queries(x, y, none, gen(0))[0], x)


def test_grid_starts_without_trimming():
    grid = merge_grid(CFG)
    assert grid[0].rho == 1.0 and grid[0].trim_group == "none"
    assert {(p.rho, p.trim_group) for p in grid} == {(1.0, "none"), (0.5, "mlp")}
    only_trim = merge_grid(MergeConfig(lambda_grid=(0.5,), beta_grid=(6.0,), rho_grid=(0.5,), trim_group_grid=("all",)))
    assert [(p.rho, p.trim_group) for p in only_trim] == [(0.5, "all")]


def test_gram_and_svd_trimming_agree():
    g = gen(1)
    for shape in [(96, 288), (384, 96), (64, 64)]:
        w = torch.randn(*shape, generator=g)
        for rho in (0.9, 0.5, 0.1):
            torch.testing.assert_close(trim_weight(w, rho, "gram"), trim_weight(w, rho, "svd"), atol=1e-5, rtol=1e-5)


def test_adversarial_member_scores_are_measured_on_pseudo_queries_attacked_against_each_member():
    model = make_pool()
    x, y = make_support()
    pseudo, py = pseudo_queries(x, y, AUG, gen(0))
    scales = [7.0, 10.0, 13.0]
    attack = AttackConfig(eps=16 / 255, step_size=8 / 255, steps=2)
    scores = member_scores(model, NAMES, scales, x, y, 3, pseudo, py, attack, gen(3))
    plain = member_scores(model, NAMES, scales, x, y, 3, pseudo, py)
    assert plain.adv_compactness is None and torch.equal(plain.compactness, scores.compactness)
    g = gen(3)  # the members draw their random starts one after the other from the one generator
    for i, name in enumerate(NAMES):
        with active_adapter(model, name):
            with torch.no_grad():
                protos = F.normalize(torch.stack([model(x)[y == c].mean(0) for c in range(3)]), dim=-1)
            probes, labels = pseudo[: len(x)], py[: len(x)]  # one augmented copy of every support image
            adv = adversarial_queries(attack, lambda q: scales[i] * F.normalize(model(q), dim=-1) @ protos.T,  # noqa: B023
                                      probes, labels=labels, generator=g)
            with torch.no_grad():
                cos = F.normalize(model(adv), dim=-1) @ protos.T
        assert (adv - probes).abs().max() <= 16 / 255 + 1e-6 and torch.equal(labels, y)
        own = cos[torch.arange(len(labels)), labels]
        assert float(scores.adv_compactness[i]) == pytest.approx(float(own.mean()), abs=1e-5)
        assert float(scores.adv_divergence[i]) == pytest.approx(float(((cos.sum(1) - own) / 2).mean()), abs=1e-5)
    assert bool((scores.adv_compactness < scores.compactness).all())  # the attack pulls queries off their class


def test_adversarial_weight_blends_the_clean_and_adversarial_weightings():
    c, v = torch.tensor([0.9, 0.7, 0.7]), torch.tensor([0.2, 0.1, 0.3])
    ca, va = torch.tensor([0.3, 0.6, 0.5]), torch.tensor([0.2, 0.2, 0.3])
    scores = MemberScores(c, v, torch.zeros(3), ca, va)
    clean = merge_coefficients(MemberScores(c, v, torch.zeros(3)), 0.5, 6.0, 3)
    adv = merge_coefficients(MemberScores(ca, va, torch.zeros(3)), 0.5, 6.0, 3)
    mixed = 0.75 * clean + 0.25 * adv
    assert torch.allclose(merge_coefficients(scores, 0.5, 6.0, 3, 0.0), clean)
    assert torch.allclose(merge_coefficients(scores, 0.5, 6.0, 3, 1.0), adv)
    assert torch.allclose(merge_coefficients(scores, 0.5, 6.0, 3, 0.25), mixed)
    two = merge_coefficients(scores, 0.5, 6.0, 1, 0.25)  # top-1 each: the clean and the robust member
    assert torch.allclose(two, torch.tensor([0.75, 0.25, 0.0]))
    assert int(clean.argmax()) == 0 and int(adv.argmax()) == 1  # the weight moves to the robust member
    with pytest.raises(ValueError, match="adversarial member scores"):
        merge_coefficients(MemberScores(c, v, torch.zeros(3)), 0.5, 6.0, 3, 0.5)


def test_grid_puts_the_paper_rule_first_and_checks_the_adversarial_weights():
    grid = merge_grid(MergeConfig(lambda_grid=(0.5,), beta_grid=(6.0,), rho_grid=(1.0,), adv_weight_grid=(0.0, 0.5)))
    assert [p.adv_weight for p in grid] == [0.0, 0.5]
    with pytest.raises(ValueError, match="adv_weight_grid"):
        merge_grid(MergeConfig(adv_weight_grid=(1.5,)))
