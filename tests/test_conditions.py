"""Conditions and their measurement: worst-case PGD over iterates and restarts, the input-gradient check, the
protocol's list of conditions, and the gradient-masking flags computed from them."""

from __future__ import annotations

import torch

from amt.conditions import Condition, conditions, nonzero_input_gradients, robust_under_pgd
from amt.config import AttackConfig, AutoAttackConfig, EvalConfig, MaskingConfig
from amt.masking import masking_flags

from conftest import gen

ATTACK = AttackConfig(eps=8 / 255, step_size=2 / 255, steps=3, restarts=1)


def _linear_logits(weight: torch.Tensor):
    """A differentiable 3-class classifier of mean colour: logits = mean RGB @ weight."""
    return lambda x: x.mean(dim=(2, 3)) @ weight


def test_a_query_flipped_at_an_intermediate_iterate_counts_as_broken():
    images, labels = torch.full((4, 3, 8, 8), 0.5), torch.zeros(4, dtype=torch.long)
    base = _linear_logits(torch.eye(3) * torch.tensor([10.0, 0.0, 0.0]))  # class 0 wins by far everywhere
    calls = []

    def flips_once(x):  # query 1 is misclassified at the second point the attack evaluates, and only there
        logits = base(x)
        calls.append(len(x))
        if len(calls) == 2:
            logits = logits + torch.tensor([[0.0, 0.0, 0.0], [0.0, 100.0, 0.0], [0.0] * 3, [0.0] * 3])
        return logits

    robust = robust_under_pgd(ATTACK, flips_once, images, labels, gen(0))
    assert robust.tolist() == [True, False, True, True]
    with torch.no_grad():
        assert (flips_once(images).argmax(-1) == labels).all()  # correct again at the end: the last iterate hides it


def test_every_restart_is_counted_and_starts_elsewhere():
    images, labels = torch.rand(5, 3, 8, 8, generator=gen(1)), torch.arange(5) % 3
    seen = []

    def record(x):
        seen.append(x.detach().clone())
        return _linear_logits(torch.randn(3, 3, generator=gen(2)))(x)

    robust_under_pgd(AttackConfig(eps=8 / 255, step_size=2 / 255, steps=3, restarts=2), record, images, labels, gen(0))
    assert len(seen) == 2 * (3 + 1)  # per restart: 3 steps from the start, then the final images
    assert not torch.equal(seen[0], seen[4])  # the second restart draws another random start
    for x in seen:
        assert (x - images).abs().max() <= 8 / 255 + 1e-6 and x.min() >= 0 and x.max() <= 1


def test_more_restarts_never_find_more_robust_queries():
    images, labels = torch.rand(12, 3, 8, 8, generator=gen(3)), torch.arange(12) % 3
    logits = _linear_logits(torch.randn(3, 3, generator=gen(4)) * 5)
    one = robust_under_pgd(AttackConfig(eps=8 / 255, step_size=2 / 255, steps=2, restarts=1), logits, images,
                           labels, gen(5))
    three = robust_under_pgd(AttackConfig(eps=8 / 255, step_size=2 / 255, steps=2, restarts=3), logits, images,
                             labels, gen(5))
    assert not (three & ~one).any()  # the first restart is the same run: restarts only remove robust queries


def test_input_gradients_are_nonzero_unless_the_model_ignores_the_input():
    images, labels = torch.rand(4, 3, 8, 8, generator=gen(6)), torch.tensor([0, 1, 2, 0])
    assert nonzero_input_gradients(_linear_logits(torch.randn(3, 3, generator=gen(7))), images, labels).all()
    flat = lambda x: torch.zeros(len(x), 3, requires_grad=True) + 0 * x.sum()  # noqa: E731
    assert not nonzero_input_gradients(flat, images, labels).any()


def test_the_protocol_lists_its_conditions_for_the_methods_asked():
    cfg = EvalConfig(n_tasks=10, adv_tasks=6, sweep_tasks=4, eps_sweep=(4 / 255,), l2_eps=(), corruptions=())
    conds = conditions(cfg, ATTACK, AutoAttackConfig(version="apgd", n_tasks=3, methods=("PM",)),
                       MaskingConfig(n_tasks=2), ["PM", "AMT"])
    roles = [(c.kind, c.role, c.n_tasks) for c in conds]
    assert roles == [("clean", "", 10), ("adversarial", "headline", 6), ("adversarial", "sweep", 4),
                     ("autoattack", "autoattack", 3), ("adversarial", "large_eps", 2),
                     ("adversarial", "many_steps", 2), ("adversarial", "square", 2), ("gradient", "", 2)]
    aa = conds[3]
    assert aa.applies_to("PM", 2) and not aa.applies_to("AMT", 0) and not aa.applies_to("PM", 3)
    assert conds[1].describe()["attack"]["restarts"] == 1 and conds[1].describe()["attack"]["headline"]
    assert len({c.key() for c in conds}) == len(conds)
    only_other = conditions(cfg, ATTACK, AutoAttackConfig(version="apgd", methods=("AMT-FT",)), None, ["PM", "AMT"])
    assert not [c for c in only_other if c.kind == "autoattack"]  # the named method is not evaluated: no AA
    some = conditions(cfg, ATTACK, AutoAttackConfig(version="apgd", methods=("PM", "AMT-FT")), None, ["PM", "AMT"])
    assert [c.methods for c in some if c.kind == "autoattack"] == [("PM",)]


def _flags(**acc) -> dict:
    """Masking flags from per-condition accuracies given as lists per role."""
    conds = {"clean": Condition("clean", 4)}
    for role, eps, steps in (("headline", 8 / 255, 10), ("sweep", 4 / 255, 10), ("large_eps", 64 / 255, 10),
                             ("many_steps", 8 / 255, 50)):
        conds[role] = Condition("adversarial", 4, role, AttackConfig(eps=eps, steps=steps))
    conds["square"] = Condition("adversarial", 4, "square", AttackConfig(eps=8 / 255), queries=100)
    conds["gradient"] = Condition("gradient", 4)
    values = {"clean": 90, "sweep": 70, "headline": 50, "large_eps": 0, "many_steps": 48, "square": 60,
              "gradient": 100} | acc
    return masking_flags({c: [float(values[r])] * 4 for r, c in conds.items()}, MaskingConfig(n_tasks=4))


def test_masking_flags_fire_on_each_sign_and_not_on_a_healthy_model():
    assert not _flags()["masking"]
    assert _flags(headline=75)["flags"]["rises_with_eps"]  # 8/255 above 4/255
    assert _flags(large_eps=20)["flags"]["not_zero_at_large_eps"]
    assert _flags(many_steps=60)["flags"]["more_steps_help"]
    assert _flags(square=30)["flags"]["black_box_stronger"]
    assert _flags(gradient=96)["flags"]["zero_gradients"]
    fired = [k for k, v in _flags(headline=75, square=80)["flags"].items() if v]
    assert fired == ["rises_with_eps"]
