"""AutoAttack (amt.autoattack) on a tiny real timm ViT with a cosine ProtoNet head: targets, worst case, strength,
threat model, side effects, the optional dependency. Few queries and steps: the whole file runs in seconds."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch

from amt.attacks import adversarial_queries
from amt.autoattack import VERSIONS, AutoAttackResult, autoattack, square
from amt.backbone import Backbone
from amt.config import AttackConfig, AutoAttackConfig, ConfigError
from amt.head import cosine_logits, prototypes

from conftest import assert_same_state, gen, snapshot, tiny_backbone

torchattacks = pytest.importorskip("torchattacks")

SIZE, N_WAY, SCALE = 32, 5, 10.0
EPS = 4 / 255  # flips about half of the queries of the task below: every stage has something to do
APGD = AutoAttackConfig(version="apgd", steps=10)
STANDARD = AutoAttackConfig(version="standard", steps=3, restarts=1, square_queries=10)


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return tiny_backbone("vit_tiny_test", SIZE)


def make_task(backbone: Backbone, n_way: int, shots: int, per_class: int, seed: int = 0):
    """A task of class-coloured noisy images; returns (logits_fn, query images [Q, 3, H, W], query labels [Q])."""
    g = gen(seed)
    colours = torch.rand(n_way, 3, 1, 1, generator=g)

    def draw(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n_way).repeat_interleave(k)
        images = (colours[labels] + 0.25 * torch.randn(len(labels), 3, SIZE, SIZE, generator=g)).clamp(0, 1)
        return images, labels

    support, support_labels = draw(shots)
    queries, labels = draw(per_class)
    with torch.no_grad():
        protos = prototypes(backbone(support), support_labels, n_way)

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        return cosine_logits(backbone(x), protos, SCALE)

    return logits_fn, queries, labels


@pytest.fixture(scope="module")
def task(backbone):
    return make_task(backbone, N_WAY, shots=2, per_class=5)


def _correct(logits_fn, images, labels) -> torch.Tensor:
    with torch.no_grad():
        return logits_fn(images).argmax(-1) == labels


def _spy(monkeypatch, cls, method: str, record: list, fn) -> None:
    """Wrap ``cls.method`` so that each call appends ``fn(self, *args)`` to ``record``."""
    original = getattr(cls, method)

    def wrapped(self, *args, **kwargs):
        record.append(fn(self, *args))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, wrapped)


@pytest.mark.parametrize("n_way", [5, 6])
def test_targeted_attacks_use_every_other_class_once(backbone, monkeypatch, n_way):
    # one query per class, an ε too small to flip any: every query meets every target of both targeted attacks
    logits_fn, images, labels = make_task(backbone, n_way, shots=2, per_class=1, seed=0)
    apgdt, fab = [], []
    _spy(monkeypatch, torchattacks.APGDT, "dlr_loss_targeted", apgdt,
         lambda self, logits, y, target: (self.target_class, logits.shape[1], y.tolist(), target.tolist()))
    _spy(monkeypatch, torchattacks.FAB, "get_diff_logits_grads_batch_targeted", fab,
         lambda self, imgs, y, target: (self.target_class, None, y.tolist(), target.tolist()))
    result = autoattack(logits_fn, images, labels, n_way, 1e-4, STANDARD, seed=0, model=backbone)
    assert bool(result.robust.all()), "precondition: nothing flipped, so every target is tried on every query"
    for name, calls in (("apgd-t", apgdt), ("fab-t", fab)):
        assert calls, f"{name} never ran"
        assert {c[0] for c in calls} == set(range(2, n_way + 1)), f"{name}: not n_way - 1 target rounds"
        assert all(c[1] in (None, n_way) for c in calls)
        targets: dict[int, set[int]] = {}
        for _, _, ys, ts in calls:
            for y, t in zip(ys, ts):
                assert 0 <= t < n_way and t != y, f"{name}: target {t} for a query of class {y}"
                targets.setdefault(y, set()).add(t)
        assert targets == {c: set(range(n_way)) - {c} for c in range(n_way)}, f"{name}: targets {targets}"


def test_worst_case_over_the_sequence(backbone, task, monkeypatch):
    logits_fn, images, labels = task
    labels = labels.clone()
    labels[0] = (labels[0] + 1) % N_WAY  # query 0 is wrong on the clean input
    clean = _correct(logits_fn, images, labels)
    assert not clean[0] and clean[1:].all()
    seen = []
    _spy(monkeypatch, torchattacks.APGDT, "forward", seen, lambda self, x, y: x.shape[0])
    result = autoattack(logits_fn, images, labels, N_WAY, EPS, APGD, seed=0, model=backbone)
    assert isinstance(result, AutoAttackResult)
    assert list(result.per_attack) == list(VERSIONS["apgd"])
    ce, t = result.per_attack["apgd-ce"], result.per_attack["apgd-t"]
    for mask in (result.robust, ce, t):
        assert mask.dtype == torch.bool and mask.shape == labels.shape
    flipped_by_ce = clean & ~ce
    assert 0 < int(flipped_by_ce.sum()) < int(clean.sum()), "precondition: APGD-CE breaks some, not all"
    # worst case: robust ⊆ clean-correct ⊆ ..., and ⊆ every per-attack mask; masks shrink along the sequence
    assert not (result.robust & ~clean).any()
    assert not (ce & ~clean).any() and not (t & ~ce).any()
    assert torch.equal(result.robust, t)
    # APGD-T ran on the survivors of APGD-CE only, and a query APGD-CE flipped stays broken
    assert seen == [int(ce.sum())]
    assert not result.robust[flipped_by_ce].any()
    assert not _correct(logits_fn, result.adversarial, labels)[~result.robust].any()
    # the adversarial image is the clean one where nothing flipped the query (and for the clean-wrong query)
    untouched = result.robust | ~clean
    assert torch.equal(result.adversarial[untouched], images[untouched])


def test_at_least_as_strong_as_pgd_and_breaks_everything_at_large_eps(backbone, task):
    logits_fn, images, labels = task
    pgd_cfg = AttackConfig(eps=EPS, step_size=EPS / 10, steps=10, objective="ce")
    adv = adversarial_queries(pgd_cfg, logits_fn, images, labels=labels, generator=gen(1), model=backbone)
    pgd_acc = _correct(logits_fn, adv, labels).float().mean().item()
    aa_acc = autoattack(logits_fn, images, labels, N_WAY, EPS, APGD, seed=0, model=backbone).robust.float().mean()
    assert aa_acc.item() <= pgd_acc + 0.05, (aa_acc.item(), pgd_acc)
    assert aa_acc.item() < _correct(logits_fn, images, labels).float().mean().item()  # it does break queries
    large = autoattack(logits_fn, images, labels, N_WAY, 64 / 255, APGD, seed=0, model=backbone)
    assert large.robust.float().mean().item() <= 0.05


def test_threat_model_side_effects_and_determinism(task):
    # a separate backbone that is trainable and in train mode: FAB's .backward() must not touch it
    backbone = tiny_backbone("vit_tiny_test", SIZE).train().requires_grad_(True)
    logits_fn, images, labels = make_task(backbone, N_WAY, shots=2, per_class=5)
    images = images.clone()
    images[:, :, :3] = 0.0  # saturated pixels exercise the [0, 1] box
    images[:, :, -3:] = 1.0
    modes = []

    def spied(x):
        modes.append(backbone.training)
        return logits_fn(x)

    before, rng = snapshot(backbone), torch.get_rng_state()
    with torch.no_grad():  # the caller's no_grad does not stop the attack
        first = autoattack(spied, images, labels, N_WAY, EPS, STANDARD, seed=3, model=backbone)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG state changed"
    assert_same_state(before, backbone)
    assert all(p.requires_grad and p.grad is None for p in backbone.parameters())
    assert backbone.training and all(m.training for m in backbone.modules())
    assert modes and not any(modes), "the model was not in eval mode during the attack"
    assert not first.robust.all(), "precondition: the attack broke queries"
    delta = (first.adversarial - images).abs().amax()
    assert delta.item() <= EPS + 1e-6
    assert first.adversarial.min() >= 0 and first.adversarial.max() <= 1
    assert first.adversarial.shape == images.shape and not first.adversarial.requires_grad
    second = autoattack(logits_fn, images, labels, N_WAY, EPS, STANDARD, seed=3, model=backbone)
    assert torch.equal(first.robust, second.robust) and torch.equal(first.adversarial, second.adversarial)
    assert all(torch.equal(first.per_attack[k], second.per_attack[k]) for k in first.per_attack)


def test_standard_runs_fab_t_and_square_with_the_configured_budget(backbone, task, monkeypatch):
    logits_fn, images, labels = task
    built = {}
    for cls in (torchattacks.APGD, torchattacks.APGDT, torchattacks.FAB, torchattacks.Square):
        record: list = []
        built[cls.__name__] = record
        _spy(monkeypatch, cls, "forward", record, lambda self, x, y: (dict(vars(self)), x.shape[0]))
    cfg = replace(STANDARD, restarts=2, square_queries=7)
    result = autoattack(logits_fn, images, labels, N_WAY, EPS, cfg, seed=0, model=backbone)
    assert list(result.per_attack) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(len(calls) == 1 for calls in built.values()), {k: len(v) for k, v in built.items()}
    (apgd, _), (apgdt, _), (fab, _), (sq, n_sq) = (built[k][0] for k in ("APGD", "APGDT", "FAB", "Square"))
    assert (apgd["steps"], apgd["n_restarts"], apgd["loss"], apgd["norm"]) == (cfg.steps, 2, "ce", "Linf")
    assert (apgdt["steps"], apgdt["n_target_classes"], apgdt["n_restarts"]) == (cfg.steps, N_WAY - 1, 1)
    assert (fab["steps"], fab["n_target_classes"], fab["multi_targeted"]) == (cfg.steps, N_WAY - 1, True)
    assert (sq["n_queries"], sq["eps"], fab["eps"], apgdt["eps"]) == (7, EPS, EPS, EPS)
    assert n_sq == int(result.per_attack["fab-t"].sum())  # Square attacked the survivors of FAB-T


def test_square_alone(backbone, task):
    logits_fn, images, labels = task
    clean = _correct(logits_fn, images, labels)
    rng = torch.get_rng_state()
    small = square(logits_fn, images, labels, 1e-4, queries=20, seed=0, model=backbone)
    assert small.dtype == torch.bool and torch.equal(small, clean)
    large = square(logits_fn, images, labels, 64 / 255, queries=100, seed=0, model=backbone)
    assert torch.equal(large, square(logits_fn, images, labels, 64 / 255, queries=100, seed=0, model=backbone))
    assert not (large & ~clean).any() and large.float().mean().item() <= 0.2
    assert torch.equal(torch.get_rng_state(), rng)


def test_missing_torchattacks_is_a_config_error(task, monkeypatch):
    logits_fn, images, labels = task
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks now raises ImportError
    with pytest.raises(ConfigError, match=r"amt\[autoattack\]"):
        autoattack(logits_fn, images, labels, N_WAY, EPS, APGD, seed=0)
    with pytest.raises(ConfigError, match=r"amt\[autoattack\]"):
        square(logits_fn, images, labels, EPS, queries=10, seed=0)


def test_refusals_and_zero_eps(backbone, task):
    logits_fn, images, labels = task
    with pytest.raises(ValueError, match="version"):
        autoattack(logits_fn, images, labels, N_WAY, EPS, AutoAttackConfig(version="none"), seed=0)
    few_logits, few_images, few_labels = make_task(backbone, 3, shots=1, per_class=1)
    with pytest.raises(ValueError, match="n_way >= 4"):
        autoattack(few_logits, few_images, few_labels, 3, EPS, APGD, seed=0)
    with pytest.raises(ValueError, match="expected"):  # logits width must match n_way
        autoattack(logits_fn, images, labels, N_WAY + 1, EPS, APGD, seed=0)
    with pytest.raises(RuntimeError, match="inference_mode"), torch.inference_mode():
        autoattack(logits_fn, images, labels, N_WAY, EPS, APGD, seed=0)
    zero = autoattack(logits_fn, images, labels, N_WAY, 0.0, APGD, seed=0, model=backbone)
    assert torch.equal(zero.robust, _correct(logits_fn, images, labels)) and torch.equal(zero.adversarial, images)
