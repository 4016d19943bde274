"""Attacks on a tiny real timm ViT with fixed random prototypes: properties, not magic numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amt.attacks import (
    ATTACKS,
    OBJECTIVES,
    adversarial_queries,
    ce_objective,
    eval_mode,
    kl_objective,
    make_objective,
    pgd,
    pyramid_bound,
    pyramid_pgd,
    run_attack,
)
from amt.backbone import Backbone
from amt.config import AttackConfig, from_dict, to_dict
from amt.head import cosine_logits

from conftest import assert_same_state, gen, snapshot, tiny_backbone

SIZE, N_WAY, N_QUERY = 32, 5, 6
TOL = 1e-6
EPS = {"linf": 8 / 255, "l2": 0.5}


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return tiny_backbone("vit_tiny_test", SIZE)


@pytest.fixture(scope="module")
def data(backbone):
    g = gen(1)
    images = torch.rand(N_QUERY, 3, SIZE, SIZE, generator=g)
    images[0, :, :4] = 0.0  # saturated pixels exercise the [0, 1] clamp
    images[1, :, :4] = 1.0
    labels = torch.randint(0, N_WAY, (N_QUERY,), generator=g)
    protos = torch.randn(N_WAY, backbone.embed_dim, generator=g)
    return images, labels, protos


def _logits_fn(model, protos):
    return lambda x: cosine_logits(model(x), protos, 10.0)


def _linf(a, b):
    return (a - b).abs().flatten(1).amax(1)


def _l2(a, b):
    return (a - b).flatten(1).norm(dim=1)


def _dist(norm, a, b):
    return _linf(a, b) if norm == "linf" else _l2(a, b)


def _same_norm_noise(norm, images, eps, seed):
    """Random perturbation at the ball's boundary: ±eps signs (ℓ∞) or a Gaussian scaled to ‖δ‖₂ = eps."""
    g = gen(100 + seed)
    if norm == "linf":
        delta = (torch.randint(0, 2, images.shape, generator=g) * 2 - 1).float() * eps
    else:
        delta = torch.randn(images.shape, generator=g)
        delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
    return (images + delta).clamp(0, 1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_output_in_eps_ball_and_unit_box_and_detached(backbone, data, norm):
    images, labels, protos = data
    loss = ce_objective(_logits_fn(backbone, protos), labels)
    eps = EPS[norm]
    adv = pgd(loss, images, norm=norm, eps=eps, step_size=eps / 2, steps=3, generator=gen())
    assert adv.shape == images.shape and adv.dtype == images.dtype
    assert not adv.requires_grad and adv.grad_fn is None
    assert bool((_dist(norm, adv, images) <= eps + TOL).all())
    assert adv.min() >= 0 and adv.max() <= 1
    assert bool((_dist(norm, adv, images) > 0.5 * eps).all())  # it does move


@pytest.mark.parametrize("attack", ["pgd", "pyramid"])
def test_eps_zero_returns_input_exactly_without_calling_the_loss(data, attack):
    images = data[0]

    def never(x):
        raise AssertionError("loss_fn must not be called at eps = 0")

    adv = ATTACKS[attack](never, images, eps=0.0, step_size=0.1, steps=3, generator=gen())
    assert torch.equal(adv, images) and adv is not images


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_steps_zero_is_random_start_or_input(data, norm):
    images = data[0]
    eps = EPS[norm]
    def never(x):
        raise AssertionError("no step at steps = 0")

    start = pgd(never, images, norm=norm, eps=eps, step_size=0.1, steps=0, generator=gen())
    assert bool((_dist(norm, start, images) <= eps + TOL).all()) and start.min() >= 0 and start.max() <= 1
    assert not torch.equal(start, images)
    plain = pgd(never, images, norm=norm, eps=eps, step_size=0.1, steps=0, random_start=False)
    assert torch.equal(plain, images)


@pytest.mark.parametrize("arch", ["vit_tiny_test", "amt_glyph_vit"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_ce_attack_raises_loss_and_beats_random_noise(data, arch, norm):
    images, labels, _ = data
    model = tiny_backbone(arch, SIZE)
    protos = torch.randn(N_WAY, model.embed_dim, generator=gen(3))
    loss = ce_objective(_logits_fn(model, protos), labels)
    eps = EPS[norm]
    with torch.no_grad():
        clean = loss(images).item()
        noise = sum(loss(_same_norm_noise(norm, images, eps, s)).item() for s in range(3)) / 3
    adv_losses = []
    for s in range(2):
        adv = pgd(loss, images, norm=norm, eps=eps, step_size=eps / 3, steps=5, generator=gen(s), model=model)
        with torch.no_grad():
            adv_losses.append(loss(adv).item())
    adv_mean = sum(adv_losses) / len(adv_losses)
    assert min(adv_losses) > clean
    assert adv_mean > noise


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_kl_attack_is_positive_and_beats_random_noise(backbone, data, norm):
    images, _, protos = data
    logits_fn = _logits_fn(backbone, protos)
    with torch.no_grad():
        clean_logits = logits_fn(images)
    loss = kl_objective(logits_fn, clean_logits)
    eps = EPS[norm]
    with torch.no_grad():
        assert abs(loss(images).item()) < 1e-6  # KL(p ‖ p) = 0
        noise = sum(loss(_same_norm_noise(norm, images, eps, s)).item() for s in range(3)) / 3
    adv = pgd(loss, images, norm=norm, eps=eps, step_size=eps / 3, steps=5, generator=gen(), model=backbone)
    with torch.no_grad():
        adv_kl = loss(adv).item()
    assert adv_kl > 0 and adv_kl > noise


@pytest.mark.parametrize("attack", ["pgd", "pyramid"])
def test_eval_mode_inside_previous_modes_restored_even_on_error(data, attack):
    images, labels, _ = data
    model = tiny_backbone("vit_tiny_test", SIZE)
    protos = torch.randn(N_WAY, model.embed_dim, generator=gen(4))
    model.train()
    model.vit.blocks[0].eval()  # a mixed-mode model must come back exactly as it was
    before = {name: m.training for name, m in model.named_modules()}
    seen = []
    logits_fn = _logits_fn(model, protos)

    def loss(x):
        seen.append(any(m.training for m in model.modules()))
        return F.cross_entropy(logits_fn(x), labels)

    ATTACKS[attack](loss, images, eps=4 / 255, step_size=1 / 255, steps=2, generator=gen(), model=model)
    assert seen and not any(seen)
    assert {name: m.training for name, m in model.named_modules()} == before

    def boom(x):
        raise RuntimeError("closure failed")

    with pytest.raises(RuntimeError, match="closure failed"):
        ATTACKS[attack](boom, images, eps=4 / 255, step_size=1 / 255, steps=2, generator=gen(), model=model)
    assert {name: m.training for name, m in model.named_modules()} == before


def test_eval_mode_none_is_a_noop():
    ran = []
    with eval_mode(None):
        ran.append(True)
    assert ran == [True]
    with pytest.raises(RuntimeError, match="inside"), eval_mode(None):  # errors in the block still propagate
        raise RuntimeError("inside")


@pytest.mark.parametrize("attack", ["pgd", "pyramid"])
def test_parameters_unchanged_bit_for_bit_and_grads_stay_none(data, attack):
    images, labels, _ = data
    model = tiny_backbone("vit_tiny_test", SIZE)
    scale = torch.nn.Parameter(torch.tensor(10.0))  # a trainable logit scale, as in meta-tuning
    protos = torch.randn(N_WAY, model.embed_dim, generator=gen(5))
    state = snapshot(model)
    loss = ce_objective(lambda x: cosine_logits(model(x), protos, scale), labels)
    ATTACKS[attack](loss, images, eps=4 / 255, step_size=1 / 255, steps=3, generator=gen(), model=model)
    assert_same_state(state, model)
    assert all(p.grad is None for p in model.parameters()) and scale.grad is None


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_same_seed_same_output(backbone, data, norm):
    images, labels, protos = data
    loss = ce_objective(_logits_fn(backbone, protos), labels)
    eps = EPS[norm]

    def run(seed):
        return pgd(loss, images, norm=norm, eps=eps, step_size=eps / 4, steps=3, generator=gen(seed))

    def run_pyramid(seed):
        return pyramid_pgd(loss, images, eps=2 / 255, step_size=1 / 255, steps=2, generator=gen(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert torch.equal(run_pyramid(7), run_pyramid(7))


@pytest.mark.parametrize("attack", ["pgd", "pyramid"])
def test_works_under_no_grad(backbone, data, attack):
    """Without a random start only gradient steps can move the images: under no_grad they must still be taken."""
    images, labels, protos = data
    loss = ce_objective(_logits_fn(backbone, protos), labels)
    kwargs = {"eps": 2 / 255, "step_size": 1 / 255, "steps": 2, "random_start": False}
    with torch.no_grad():
        adv = ATTACKS[attack](loss, images, **kwargs)
        assert loss(adv).item() > loss(images).item()
    assert not torch.equal(adv, images)
    assert torch.equal(adv, ATTACKS[attack](loss, images, **kwargs))  # the same steps as with grad enabled


def test_pyramid_respects_its_documented_bound(backbone, data):
    images, labels, protos = data
    loss = ce_objective(_logits_fn(backbone, protos), labels)
    eps = 2 / 255
    adv = pyramid_pgd(loss, images, eps=eps, step_size=eps / 2, steps=3, generator=gen())
    bound = pyramid_bound(eps)
    assert bound == pytest.approx(31 * eps)
    assert bool((_linf(adv, images) <= bound + TOL).all()) and adv.min() >= 0 and adv.max() <= 1
    assert _linf(adv, images).max() > 5 * eps  # the pyramid is far larger than an eps ℓ∞ attack
    assert not adv.requires_grad

    clipped = pyramid_pgd(loss, images, eps=eps, step_size=eps / 2, steps=3, total_eps=8 / 255, generator=gen())
    assert pyramid_bound(eps, total_eps=8 / 255) == pytest.approx(8 / 255)
    assert bool((_linf(clipped, images) <= 8 / 255 + TOL).all()) and clipped.min() >= 0 and clipped.max() <= 1


def test_pyramid_coarse_level_is_constant_on_its_cells(backbone, data):
    _, labels, protos = data
    images = torch.full((N_QUERY, 3, SIZE, SIZE), 0.5)  # mid-grey: no pixel reaches the [0, 1] clamp
    loss = ce_objective(_logits_fn(backbone, protos), labels)
    adv = pyramid_pgd(loss, images, eps=1 / 255, step_size=0.5 / 255, steps=2, grids=(4,), multipliers=(20.0,),
                      generator=gen())
    delta = (adv - images).view(N_QUERY, 3, 4, SIZE // 4, 4, SIZE // 4)
    cell_min, cell_max = delta.amin(dim=(3, 5)), delta.amax(dim=(3, 5))
    assert torch.allclose(cell_min, cell_max, atol=1e-6)
    assert delta.abs().max() <= 20 / 255 + TOL


def test_config_driven_attacks(backbone, data):
    images, labels, protos = data
    logits_fn = _logits_fn(backbone, protos)
    cfg = AttackConfig()
    adv = adversarial_queries(cfg, logits_fn, images, labels=labels, generator=gen(), model=backbone)
    assert bool((_linf(adv, images) <= cfg.eps + TOL).all())
    kl_cfg = AttackConfig(norm="l2", eps=0.25, step_size=0.1, steps=2, objective="kl")
    adv = adversarial_queries(kl_cfg, logits_fn, images, generator=gen(), model=backbone)
    assert bool((_l2(adv, images) <= 0.25 + TOL).all())
    pyr = AttackConfig(eps=1 / 255, step_size=0.5 / 255, steps=2, pyramid=True, pyramid_total_eps=16 / 255)
    adv = run_attack(pyr, ce_objective(logits_fn, labels), images, generator=gen())
    bound = pyramid_bound(pyr.eps, pyr.pyramid_multipliers, pyr.pyramid_total_eps)
    assert bound == pytest.approx(16 / 255)
    assert bool((_linf(adv, images) <= bound + TOL).all())
    assert from_dict(AttackConfig, to_dict(pyr)) == pyr
    assert set(OBJECTIVES) == {"kl", "ce"} and set(ATTACKS) == {"pgd", "pyramid"}


def test_errors_name_the_problem(backbone, data):
    images, labels, protos = data
    logits_fn = _logits_fn(backbone, protos)
    loss = ce_objective(logits_fn, labels)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(loss, images * 255, eps=8 / 255, step_size=1 / 255, steps=1)
    with pytest.raises(ValueError, match="norm"):
        pgd(loss, images, norm="l1", eps=8 / 255, step_size=1 / 255, steps=1)
    with pytest.raises(ValueError, match="linf"):
        pyramid_pgd(loss, images, norm="l2", eps=8 / 255, step_size=1 / 255, steps=1)
    with pytest.raises(ValueError, match="grids"):
        pyramid_pgd(loss, images, eps=1 / 255, step_size=1 / 255, steps=1, grids=(4, 64), multipliers=(1.0, 1.0))
    with pytest.raises(ValueError, match="unknown attack objective"):
        make_objective("cw", logits_fn, labels=labels)
    with pytest.raises(ValueError, match="clean_logits"):
        make_objective("kl", logits_fn)
    with pytest.raises(ValueError, match="scalar"):
        pgd(lambda x: logits_fn(x).sum(1), images, eps=8 / 255, step_size=1 / 255, steps=1)
    with pytest.raises(ValueError, match="shape"):
        pgd(kl_objective(logits_fn, torch.zeros(N_QUERY, N_WAY + 1)), images, eps=8 / 255, step_size=1 / 255, steps=1)
