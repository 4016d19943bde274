"""The evaluated methods behind one interface, on a tiny real timm ViT with a trained-looking pool: every rule
classifies and restores the weights, members keep their trained logit scales, tuning chooses on validation tasks,
fine-tuning changes the task model and restores it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amt.config import AttackConfig, AugmentConfig, FinetuneConfig, MergeConfig
from amt.data.episodes import Episode
from amt.head import cosine_logits, prototypes
from amt.lora import active_adapter
from amt.merge import MemberScores, MergeParams, merge_coefficients, merged_task
from amt.methods import BackboneMethod, FinetunedMethod, Method, PoolMethod
from amt.rundir import LoadedPool

from conftest import assert_same_state, gen, snapshot
from test_merge import NAMES, SIZE, make_pool, make_support

CFG = MergeConfig(lambda_grid=(0.5,), beta_grid=(6.0,), rho_grid=(1.0, 0.5), trim_group_grid=("mlp",))
AUG = AugmentConfig(pseudo_per_image=2)
SCALES = (7.0, 10.0, 13.0)
POOL = LoadedPool(tuple(NAMES), SCALES)


ATTACK = AttackConfig(eps=16 / 255, step_size=4 / 255, steps=2)


def _method(rule="ttm", member_index=0, cfg=CFG, model=None, attack=None) -> PoolMethod:
    return PoolMethod(model or make_pool(), POOL, rule, cfg, AUG, member_index, attack)


def _queries(n=6, seed=5, grad=False):
    return torch.rand(n, 3, SIZE, SIZE, generator=gen(seed)).requires_grad_(grad)


def test_every_method_is_a_method():
    inner = _method("uniform")
    for m in (BackboneMethod(make_pool(), 10.0), inner, FinetunedMethod(inner, FinetuneConfig(), AUG)):
        assert isinstance(m, Method)
    assert inner.pool_names == tuple(NAMES) and BackboneMethod(make_pool(), 10.0).pool_names == ()


@pytest.mark.parametrize("rule", ["ttm", "uniform", "logit_avg", "min_support_ce", "single"])
def test_every_rule_classifies_and_restores_the_weights(rule):
    method = _method(rule, member_index=2)
    method.params = MergeParams(0.5, 6.0, 0.5, "mlp")
    before = snapshot(method.model)
    x, y = make_support()
    with method.adapt(x, y, 3, gen(0)) as (fn, record):
        logits = fn(_queries())
        assert logits.shape == (6, 3)
        if rule == "logit_avg":
            assert record.coefficients is None
        else:
            z = torch.tensor(record.coefficients)
            assert z.sum().item() == pytest.approx(1.0)
            expected_nonzero = {"ttm": 2, "uniform": 3, "min_support_ce": 1, "single": 1}[rule]
            assert int((z > 0).sum()) == expected_nonzero
            if rule == "single":
                assert z[2] == 1.0
    assert_same_state(before, method.model)


def test_a_single_member_uses_its_trained_logit_scale():
    method = _method("single", member_index=2)
    x, y = make_support()
    q = _queries()
    with torch.no_grad(), active_adapter(method.model, "m2"):
        cos = cosine_logits(method.model(q), prototypes(method.model(x), y, 3), 1.0)
    with torch.no_grad(), method.adapt(x, y, 3, gen(0)) as (fn, _):
        torch.testing.assert_close(fn(q), SCALES[2] * cos, atol=1e-4, rtol=1e-4)
        assert fn.scale == SCALES[2]


def test_a_merged_model_uses_the_coefficient_weighted_scale():
    method = _method("ttm")
    method.params = MergeParams(0.5, 6.0, 1.0, "none")
    x, y = make_support()
    with torch.no_grad(), method.adapt(x, y, 3, gen(0)) as (fn, record):
        expected = sum(z * s for z, s in zip(record.coefficients, SCALES))
        assert fn.scale == pytest.approx(expected) and fn.scale not in SCALES


def test_logit_average_is_the_mean_of_the_members_logits():
    model = make_pool()
    x, y = make_support()
    q = _queries()
    singles = []
    for i in range(3):
        with torch.no_grad(), _method("single", i, model=model).adapt(x, y, 3, gen(0)) as (fn, _):
            singles.append(fn(q))
    with torch.no_grad(), _method("logit_avg", model=model).adapt(x, y, 3, gen(0)) as (fn, _):
        torch.testing.assert_close(fn(q), torch.stack(singles).mean(0), atol=1e-5, rtol=1e-5)


def test_no_ttm_picks_the_member_whose_pseudo_queries_it_classifies_best():
    method = _method("min_support_ce")
    x, y = make_support()
    from amt.merge import pseudo_queries

    pseudo, py = pseudo_queries(x, y, AUG, gen(0))
    ces = []
    for name, scale in zip(NAMES, SCALES):  # by hand: each member's own prototypes and trained scale
        with torch.no_grad(), active_adapter(method.model, name):
            logits = cosine_logits(method.model(pseudo), prototypes(method.model(x), y, 3), scale)
        ces.append(float(F.cross_entropy(logits, py)))
    with method.adapt(x, y, 3, gen(0)) as (_, record):
        assert record.coefficients.index(1.0) == min(range(3), key=ces.__getitem__)


def test_attack_gradients_reach_the_images_through_the_merged_model():
    method = _method("ttm")
    method.params = MergeParams(0.5, 6.0, 0.5, "all")
    x, y = make_support()
    q = _queries(grad=True)
    with method.adapt(x, y, 3, gen(0)) as (fn, _):
        fn(q).logsumexp(-1).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.model.parameters())  # evaluation models are frozen


def _tasks(n=3, n_shot=1):
    tasks = []
    for t in range(n):
        x, y = make_support(n_shot=n_shot, seed=10 + t)
        q, qy = make_support(n_shot=2, seed=20 + t)
        tasks.append(Episode(x, y, q, qy, torch.arange(3)))
    return tasks


def test_tuning_picks_the_first_best_grid_point_by_hand():
    cfg = MergeConfig(lambda_grid=(0.0, 1.0), beta_grid=(2.0,), rho_grid=(1.0, 0.3), trim_group_grid=("all",))
    method = _method("ttm", cfg=cfg)
    assert method.tunable and len(method.grid) == 4
    tasks = _tasks()
    info = method.tune(tasks, lambda t: gen(100 + t))
    by_hand = []  # mean accuracy of every grid point, computed without the tuning code
    for params in method.grid:
        accs = []
        for t, e in enumerate(tasks):
            scores = method.scores(e.support_images, e.support_labels, 3, gen(100 + t))
            zeta = method.coefficients(scores, params)
            coeffs = {n: float(z) for n, z in zip(NAMES, zeta) if float(z)}
            with torch.no_grad(), merged_task(method.model, coeffs, params.rho, params.trim_group):
                protos = prototypes(method.model(e.support_images), e.support_labels, 3)
                pred = cosine_logits(method.model(e.query_images), protos, 1.0).argmax(-1)
            accs.append(100.0 * float((pred == e.query_labels).float().mean()))
        by_hand.append(sum(accs) / len(accs))
    assert [v["acc"] for v in info["validation"]] == pytest.approx(by_hand)
    best = max(by_hand)
    assert method.params == method.grid[by_hand.index(best)] and info["chosen"] == method.params.as_dict()


def test_a_single_grid_point_needs_no_validation_tasks_and_many_do():
    one = _method("ttm", cfg=MergeConfig(lambda_grid=(0.5,), beta_grid=(6.0,), rho_grid=(1.0,)))
    assert not one.tunable and one.tune([], gen)["chosen"] == {"lambda": 0.5, "beta": 6.0, "rho": 1.0,
                                                                "trim_group": "none", "adv_weight": 0.0}
    with pytest.raises(ValueError, match="val_tasks"):
        _method("ttm").tune([], gen)
    assert not _method("uniform").tunable and _method("uniform").tune([], gen) == {"rule": "uniform",
                                                                                    "members": NAMES}


def test_finetuning_changes_the_task_model_and_restores_every_weight():
    inner = _method("uniform")
    before = snapshot(inner.model)
    x, y = make_support()
    q = _queries()
    outs = {}
    for lr in (0.0, 1e-2):
        method = FinetunedMethod(inner, FinetuneConfig(steps=3, lr_grid=(lr,)), AUG)
        assert not method.tunable
        with method.adapt(x, y, 3, gen(0)) as (fn, record):
            with torch.no_grad():
                outs[lr] = fn(q)
            assert record.extra["finetune_lr"] == lr and fn.scale == pytest.approx(sum(SCALES) / 3)
        assert_same_state(before, inner.model)
        assert all(not p.requires_grad for n, p in inner.model.named_parameters() if "lora" not in n)
    assert not torch.allclose(outs[0.0], outs[1e-2])
    pm = FinetunedMethod(BackboneMethod(make_pool(), 10.0), FinetuneConfig(steps=2, lr_grid=(1e-2,)), AUG)
    with pm.adapt(x, y, 3, gen(0)) as (fn, _):
        assert fn(q).shape == (6, 3)
    with pytest.raises(ValueError, match="logit_avg"):
        FinetunedMethod(_method("logit_avg"), FinetuneConfig(), AUG)


def test_finetuning_lr_is_tuned_on_the_validation_tasks():
    method = FinetunedMethod(_method("uniform"), FinetuneConfig(steps=2, lr_grid=(0.0, 5e-2)), AUG)
    assert method.tunable
    info = method.tune(_tasks(2), lambda t: gen(t))
    accs = [v["acc"] for v in info["finetune"]["lr_validation"]]
    assert method.lr == (0.0, 5e-2)[accs.index(max(accs))] == info["finetune"]["chosen_lr"]


def test_robust_selection_weighs_clean_and_robust_validation_accuracy():
    grid = dict(lambda_grid=(0.0, 1.0), beta_grid=(2.0,), rho_grid=(1.0, 0.3), trim_group_grid=("all",),
                adv_weight_grid=(0.0, 1.0), select_steps=2)
    tasks = _tasks()
    infos = {}
    for objective, w in (("clean", 0.5), ("robust", 0.5), ("balance", 0.0), ("balance", 0.3), ("balance", 1.0)):
        method = _method("ttm", cfg=MergeConfig(objective=objective, robust_weight=w, **grid), attack=ATTACK)
        info = method.tune(tasks, lambda t: gen(100 + t))
        assert info["chosen"] == method.params.as_dict() and len(info["validation"]) == 8
        infos[objective, w] = info
    clean = [v["acc"] for v in infos["clean", 0.5]["validation"]]
    robust = [v["robust_acc"] for v in infos["robust", 0.5]["validation"]]
    first_max = lambda values: max(range(len(values)), key=lambda i: (values[i], -i))  # noqa: E731
    grid_dicts = [v["params"] for v in infos["clean", 0.5]["validation"]]
    assert infos["clean", 0.5]["chosen"] == grid_dicts[first_max(clean)]
    assert infos["robust", 0.5]["chosen"] == grid_dicts[first_max(robust)]
    for w in (0.0, 0.3, 1.0):  # the same validation runs (same seeds): the objective is the weighted mean
        val = infos["balance", w]["validation"]
        assert [v["acc"] for v in val] == pytest.approx(clean)
        assert [v["robust_acc"] for v in val] == pytest.approx(robust)
        value = [(1 - w) * c + w * r for c, r in zip(clean, robust)]
        assert [v["objective"] for v in val] == pytest.approx(value)
        assert infos["balance", w]["chosen"] == grid_dicts[first_max(value)]
        assert infos["balance", w]["selection"]["robust_weight"] == w
    assert "robust_acc" not in infos["clean", 0.5]["validation"][0]
    for tol in (0.0, 5.0, 100.0):  # the most robust point within tol of the best clean one
        method = _method("ttm", cfg=MergeConfig(objective="constrained", clean_tolerance=tol, **grid), attack=ATTACK)
        info = method.tune(tasks, lambda t: gen(100 + t))
        allowed = [i for i, c in enumerate(clean) if c >= max(clean) - tol]
        assert info["chosen"] == grid_dicts[max(allowed, key=lambda i: (robust[i], -i))]
        assert info["selection"] == {"objective": "constrained", "clean_tolerance": tol, "selection_attack": {
            "eps": ATTACK.eps, "steps": 2, "step_size": pytest.approx(2.5 * ATTACK.eps / 2)}}


def test_adversarial_scores_need_the_threat_model_and_steer_the_test_time_merge():
    cfg = MergeConfig(lambda_grid=(0.5,), beta_grid=(6.0,), rho_grid=(1.0,), adv_weight_grid=(1.0,))
    with pytest.raises(ValueError, match="attack"):
        _method("ttm", cfg=cfg)
    with pytest.raises(ValueError, match="robust_weight"):
        _method("ttm", cfg=MergeConfig(robust_weight=1.5), attack=ATTACK)
    method = _method("ttm", cfg=cfg, attack=ATTACK)
    x, y = make_support()
    scores = method.scores(x, y, 3, gen(4), adversarial=True)
    with method.adapt(x, y, 3, gen(4)) as (_, record):
        pass
    adv_only = MemberScores(scores.adv_compactness, scores.adv_divergence, scores.support_ce)
    assert record.coefficients == pytest.approx(merge_coefficients(adv_only, 0.5, 6.0, 2).tolist())
    assert record.coefficients != pytest.approx(merge_coefficients(scores, 0.5, 6.0, 2).tolist())
