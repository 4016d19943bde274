"""Properties of APSV (adversarial LoRA-factor perturbation) on a tiny real timm ViT."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from amt.config import PerturbConfig
from amt.lora import adapter_parameters, inject_lora, mark_trainable
from amt.perturb import adversarial_weights, perturbed, weight_perturbation

from conftest import assert_same_state, gen, snapshot, tiny_vit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and OpenMP spinning on a busy machine costs seconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@functools.cache
def _tiny_lora_vit() -> VisionTransformer:
    model = tiny_vit()
    inject_lora(model, names=("m0", "m1"), rank=4)  # SVD init is the slow part: build once, copy per test
    return model


def setup():
    """Fresh copy of a tiny ViT with LoRA members m0 (active, trainable) and m1, a fixed batch, a CE closure."""
    model = copy.deepcopy(_tiny_lora_vit())
    params = mark_trainable(model, "m0")
    g = gen(1)
    images = torch.rand(6, 3, 32, 32, generator=g)
    labels = torch.arange(6) % 5
    classifier = torch.randn(48, 5, generator=g)

    def loss_fn():
        return F.cross_entropy(model(images) @ classifier, labels)

    return model, params, loss_fn


def clean_grads(params, loss_fn):
    return list(torch.autograd.grad(loss_fn(), params))


def test_restored_bit_for_bit_and_only_member_factors_move():
    model, params, loss_fn = setup()
    before = snapshot(model)
    own = {k for k in before if k.endswith(".m0")}
    assert len(own) == len(params) == 16  # 8 layers × {A, B}
    with adversarial_weights(params, loss_fn, PerturbConfig(eta=1e-2)):
        inside = model.state_dict()
        for k, v in before.items():
            assert torch.equal(inside[k], v) != (k in own), k  # m0 factors moved, all else untouched
    assert_same_state(before, model)


def test_restored_when_body_raises():
    model, params, loss_fn = setup()
    before = snapshot(model)
    with pytest.raises(KeyError, match="boom"), adversarial_weights(params, loss_fn, PerturbConfig(eta=1e-2)):
        loss_fn().backward()
        raise KeyError("boom")
    assert_same_state(before, model)


def test_relative_step_size_and_direction():
    _, params, loss_fn = setup()
    grads = clean_grads(params, loss_fn)
    originals = [p.detach().clone() for p in params]
    eta = 1e-4
    with adversarial_weights(params, loss_fn, PerturbConfig(eta=eta, mode="relative")) as deltas:
        for p, t, g, d in zip(params, originals, grads, deltas):
            moved = p.detach().double() - t.double()
            assert d is not None
            assert torch.allclose(moved.norm(), eta * t.double().norm(), rtol=1e-2)  # float32 rounding of T + ΔT
            assert torch.allclose(d.double().norm(), eta * t.double().norm(), rtol=1e-5)
            cos = F.cosine_similarity(d.double().flatten(), g.double().flatten(), dim=0)
            assert cos > 1 - 1e-6


def test_relative_mode_ignores_loss_scale():
    _, params, loss_fn = setup()
    grads = clean_grads(params, loss_fn)
    d1 = weight_perturbation(params, grads, 1e-3, "relative")
    d2 = weight_perturbation(params, [g * 1024.0 for g in grads], 1e-3, "relative")
    assert all(torch.allclose(a, b, rtol=1e-5, atol=0) for a, b in zip(d1, d2))


def test_absolute_mode_moves_by_eta_times_grad():
    _, params, loss_fn = setup()
    grads = clean_grads(params, loss_fn)
    originals = [p.detach().clone() for p in params]
    eta = 1e-2
    with adversarial_weights(params, loss_fn, PerturbConfig(eta=eta, mode="absolute")) as deltas:
        for p, t, g, d in zip(params, originals, grads, deltas):
            assert torch.allclose(d, eta * g, rtol=1e-6, atol=0)
            assert torch.allclose(p.detach(), t + eta * g, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode,eta", [("relative", 1e-2), ("absolute", 1e-3)])
def test_perturbation_increases_loss(mode, eta):
    _, params, loss_fn = setup()
    with torch.no_grad():
        clean = loss_fn().item()
    with adversarial_weights(params, loss_fn, PerturbConfig(eta=eta, mode=mode)), torch.no_grad():
        adv = loss_fn().item()
    assert adv > clean + 1e-5


def test_grad_attributes_untouched():
    model, params, loss_fn = setup()
    with adversarial_weights(params, loss_fn, PerturbConfig()):
        assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_eta_zero_perturbs_nothing():
    model, params, loss_fn = setup()
    before = snapshot(model)
    with adversarial_weights(params, loss_fn, PerturbConfig(eta=0.0)) as deltas:
        assert_same_state(before, model)
    assert deltas == [None] * len(params)
    assert all(p.grad is None for p in model.parameters())
    assert_same_state(before, model)


def test_skips_unused_zero_and_nonfinite_grads():
    _, params, loss_fn = setup()
    grads = clean_grads(params, loss_fn)
    grads[0] = None
    grads[1] = torch.zeros_like(grads[1])
    grads[2] = torch.full_like(grads[2], float("nan"))
    deltas = weight_perturbation(params, grads, 1e-3, "relative")
    assert deltas[:3] == [None, None, None] and all(d is not None for d in deltas[3:])
    before = [p.detach().clone() for p in params[:3]]
    with perturbed(params, deltas):
        assert all(torch.equal(p, b) for p, b in zip(params[:3], before))


def test_sam_order_with_sgd_matches_manual_computation():
    cfg = PerturbConfig(eta=1e-2)
    lr = 0.5
    # manual: gradient at clean weights → deltas → gradient at perturbed weights → step from clean weights
    _, params, loss_fn = setup()
    originals = [p.detach().clone() for p in params]
    deltas = weight_perturbation(params, clean_grads(params, loss_fn), cfg.eta, cfg.mode)
    with torch.no_grad():
        for p, d in zip(params, deltas):
            p.add_(d)
    g_adv = clean_grads(params, loss_fn)
    with torch.no_grad():
        for p, t in zip(params, originals):
            p.copy_(t)
    g_clean = clean_grads(params, loss_fn)
    expected = [t - lr * g for t, g in zip(originals, g_adv)]

    # the library, on a fresh identical model
    _, params2, loss_fn2 = setup()
    opt = torch.optim.SGD(params2, lr=lr, momentum=0.0)
    with adversarial_weights(params2, loss_fn2, cfg):
        loss_fn2().backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(params2, g_adv))  # .grad taken at the perturbed weights
    opt.step()
    for p, e in zip(params2, expected):
        assert torch.allclose(p.detach(), e, rtol=0, atol=1e-6)
    # and it is not the plain (unperturbed) SGD step
    assert any(not torch.allclose(p.detach(), t - lr * gc, rtol=0, atol=1e-7)
               for p, t, gc in zip(params2, originals, g_clean))


def test_graph_recorded_before_entering_fails_loudly_in_float32():
    _, params, loss_fn = setup()
    stale = loss_fn()  # saved the clean factors
    with adversarial_weights(params, loss_fn, PerturbConfig()), pytest.raises(RuntimeError, match="inplace"):
        stale.backward()


def test_argument_errors():
    _, params, loss_fn = setup()
    grads = clean_grads(params, loss_fn)
    with pytest.raises(ValueError, match="mode"):
        weight_perturbation(params, grads, 1e-4, "sideways")
    with pytest.raises(ValueError, match="eta"):
        weight_perturbation(params, grads, -1.0, "relative")
    with pytest.raises(ValueError, match="grads"):
        weight_perturbation(params, grads[:-1], 1e-4, "relative")
    with pytest.raises(ValueError, match="more than once"), perturbed([params[0], params[0]], [grads[0], grads[0]]):
        pass
    scalar_needed = adversarial_weights(params, lambda: torch.zeros(3, requires_grad=True), PerturbConfig())
    with pytest.raises(ValueError, match="scalar"), scalar_needed:
        pass
    model, _, _ = setup()
    frozen = adapter_parameters(model, "m1")
    with pytest.raises(ValueError, match="require grad"), adversarial_weights(frozen, loss_fn, PerturbConfig()):
        pass


def test_perturbation_is_seen_inside_one_autocast_region():
    """The autocast cache must not keep serving casts of the clean factors inside the context."""
    _, params, loss_fn = setup()
    deltas = weight_perturbation(params, clean_grads(params, loss_fn), 1e-1, "relative")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        clean = loss_fn()
        with perturbed(params, deltas):
            adv_same_region = loss_fn()
        clean_again = loss_fn()
    with perturbed(params, deltas), torch.autocast("cpu", dtype=torch.bfloat16):
        adv_fresh_region = loss_fn()
    assert torch.equal(adv_same_region, adv_fresh_region)
    assert torch.equal(clean, clean_again) and not torch.equal(clean, adv_same_region)
