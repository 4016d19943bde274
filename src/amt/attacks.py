"""Pixel-space attacks on query images: PGD (ℓ∞, ℓ2) and the authors' multi-scale "pyramid".

An attack maximises a scalar **loss closure** ``loss_fn(adv_images) -> loss`` over perturbations of
``images`` ``[B, 3, H, W]`` (pixels in [0, 1], ε in pixel units) and returns detached adversarial
images of the same shape, dtype and device, inside the threat model and inside [0, 1]. The closure
decides what is attacked; :func:`kl_objective` (training: KL(p_clean ‖ p_adv), TRADES-style, label-free)
and :func:`ce_objective` (evaluation: cross-entropy on the labels) build the usual ones.

Few-shot use: the support set stays clean; prototypes are computed once from it, the clean query
logits once (for KL), and only the queries are perturbed::

    with torch.no_grad():
        protos = prototypes(backbone(support_images), support_labels, n_way)   # [N, D], clean support
        clean_logits = cosine_logits(backbone(query_images), protos, scale)   # [Q, N], reused every step

    def logits_fn(x: torch.Tensor) -> torch.Tensor:   # [Q, 3, H, W] -> [Q, N]
        return cosine_logits(backbone(x), protos, scale)

    adv = pgd(kl_objective(logits_fn, clean_logits), query_images,
              eps=8 / 255, step_size=4 / 255, steps=2, generator=gen, model=backbone)

or, from an :class:`~amt.config.AttackConfig`, ``adversarial_queries(cfg, logits_fn, query_images,
labels=query_labels, generator=gen, model=backbone)``. Keep the prototypes detached: the attack needs
no gradient through the support branch.

Guarantees of every attack here:
  * ``model`` (if given) runs in eval mode and every submodule's previous mode is restored, also on error
    (:func:`eval_mode`);
  * gradients are taken with ``torch.autograd.grad`` w.r.t. the perturbation only: parameters and their
    ``.grad`` are never touched;
  * all randomness comes from ``generator`` (drawn on the generator's device, then moved to the images'
    device); the same seed gives the same output;
  * works when called under ``torch.no_grad()`` (gradients are re-enabled locally).

Registries: :data:`ATTACKS` (``"pgd"``, ``"pyramid"``) and :data:`OBJECTIVES` (``"kl"``, ``"ce"``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from amt.config import AttackConfig

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor], torch.Tensor]  # adv images [B, 3, H, W] -> scalar loss to maximise
LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # images [B, 3, H, W] -> logits [B, N]
NORMS = ("linf", "l2")
_TINY = 1e-12  # guards divisions by a zero gradient / perturbation norm


# ----------------------------------------------------------------------------------------------
# Mode and argument handling
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: nn.Module | None) -> Iterator[None]:
    """Put ``model`` in eval mode for the block; restore each submodule's own ``training`` flag after.

    Restoration happens in ``finally`` (also when the block raises) and is per submodule, so a model
    with mixed modes (e.g. a frozen part kept in eval) comes back exactly as it was. ``None``: no-op.
    """
    if model is None:
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _check_common(images: torch.Tensor, eps: float, step_size: float, steps: int) -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError("attacks need autograd: call them outside torch.inference_mode() (torch.no_grad() is fine)")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"attack expects images [B, 3, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"attack expects float images in [0, 1], got dtype {images.dtype}")
    if images.numel() and (bool(images.min() < 0) or bool(images.max() > 1)):
        raise ValueError(
            f"attack expects pixels in [0, 1], got range [{images.min().item():.4g}, {images.max().item():.4g}]; "
            f"attack the unnormalised images (normalisation is the backbone's first operation)"
        )
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0 (pixel units, e.g. 8/255), got {eps}")
    if not step_size >= 0:
        raise ValueError(f"step_size must be >= 0 (pixel units), got {step_size}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")


def _rand(
    shape: Sequence[int], generator: torch.Generator | None, like: torch.Tensor, normal: bool = False
) -> torch.Tensor:
    """U[0, 1) (or N(0, 1)) noise drawn on ``generator``'s device (CPU if None), cast to ``like``'s device/dtype."""
    device = generator.device if generator is not None else torch.device("cpu")
    draw = torch.randn if normal else torch.rand
    noise = draw(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype)


def _grad(loss_fn: LossFn, inputs: Sequence[torch.Tensor], make_adv: Callable[..., torch.Tensor]) -> tuple:
    """Gradients of ``loss_fn(make_adv(*inputs))`` w.r.t. fresh leaf copies of ``inputs`` (nothing else)."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    loss = loss_fn(make_adv(*leaves))
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor (reduce over the batch, e.g. mean), got {shape}")
    if not loss.requires_grad:
        raise ValueError(
            "loss_fn's output does not depend on the adversarial images (no autograd graph); "
            "compute the loss from the images passed to the closure"
        )
    return torch.autograd.grad(loss, leaves)


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """ℓ2 norm over (C, H, W) for each sample: [B, C, H, W] → [B, 1, 1, 1]."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


def _project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project ``x_adv`` onto the ε-ball around ``x`` (per sample), then clamp to [0, 1].

    ℓ∞: exact projection onto the intersection of both boxes. ℓ2: radial projection onto the ball,
    then the clamp; the clamp only shrinks |x_adv − x| element-wise (x is in [0, 1]), so the result
    stays in the ball.
    """
    if norm == "linf":
        return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    delta = x_adv - x
    factor = (eps / _per_sample_norm(delta).clamp_min(_TINY)).clamp(max=1.0)
    return (x + delta * factor).clamp(0.0, 1.0)


def _random_start(x: torch.Tensor, norm: str, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """ℓ∞: δ ~ U[-eps, eps] per element. ℓ2: δ uniform in the ε-ball, i.e. a Gaussian direction
    normalised per sample times radius eps·U^(1/d), d = C·H·W (≈ eps for image-sized d)."""
    if norm == "linf":
        return (2.0 * _rand(x.shape, generator, x) - 1.0) * eps
    direction = _rand(x.shape, generator, x, normal=True)
    direction = direction / _per_sample_norm(direction).clamp_min(_TINY)
    d = x[0].numel()
    radius = eps * _rand((x.shape[0], 1, 1, 1), generator, x) ** (1.0 / d)
    return direction * radius


def _ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """ℓ∞: sign(g). ℓ2: g / ‖g‖₂ per sample (a zero gradient gives a zero step)."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_sample_norm(grad).clamp_min(_TINY)


# ----------------------------------------------------------------------------------------------
# PGD
# ----------------------------------------------------------------------------------------------


def pgd(
    loss_fn: LossFn,
    images: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = AttackConfig.norm,
    random_start: bool = AttackConfig.random_start,
    generator: torch.Generator | None = None,
    model: nn.Module | None = None,
) -> torch.Tensor:
    """Projected gradient ascent of ``loss_fn`` in pixel space (Madry et al. 2018).

    Each step: x ← Π(x + step_size·d), with d = sign(∇) for ℓ∞ and ∇/‖∇‖₂ per image for ℓ2; Π projects
    onto the per-image ε-ball around ``images`` and then clamps to [0, 1].

    Args:
        loss_fn: adv images ``[B, 3, H, W]`` → scalar loss to **maximise** (e.g. :func:`kl_objective`).
            Reduce with a mean over the batch: per-image steps do not depend on the loss scale.
        images: clean images ``[B, 3, H, W]``, float, in [0, 1].
        eps: radius of the threat model, pixel units (ℓ∞: max |δ|; ℓ2: ‖δ‖₂ over C·H·W per image).
        step_size: step length per iteration, pixel units (ℓ∞: per pixel; ℓ2: per image).
        steps: iterations; each costs one forward and one backward through ``loss_fn``.
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a random point of the ball (ℓ∞: uniform per pixel; ℓ2: uniform in the
            ball, see :func:`_random_start`), clamped to [0, 1]; else from ``images``.
        generator: source of the random start (None: the global CPU generator).
        model: module put in eval mode during the attack (previous modes restored after).

    Returns:
        Detached adversarial images ``[B, 3, H, W]`` (dtype/device of ``images``) with
        ‖adv − images‖ ≤ eps (up to float rounding, ~1e-7) and 0 ≤ adv ≤ 1.
        ``eps == 0`` returns an exact copy of ``images`` without calling ``loss_fn``; ``steps == 0``
        returns the projected random start (or a copy of ``images`` without random start).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    _check_common(images, eps, step_size, steps)
    x = images.detach()
    if eps == 0:
        return x.clone()
    logger.debug("pgd: norm=%s eps=%.4g step_size=%.4g steps=%d random_start=%s on %s",
                 norm, eps, step_size, steps, random_start, tuple(x.shape))
    with eval_mode(model), torch.enable_grad():
        x_adv = _project(x + _random_start(x, norm, eps, generator), x, norm, eps) if random_start else x.clone()
        for _ in range(steps):
            (grad,) = _grad(loss_fn, [x_adv], lambda leaf: leaf)
            with torch.no_grad():
                x_adv = _project(x_adv + step_size * _ascent_direction(grad, norm), x, norm, eps)
    return x_adv.detach()


# ----------------------------------------------------------------------------------------------
# Pyramid (the authors' multi-scale perturbation)
# ----------------------------------------------------------------------------------------------


def pyramid_bound(
    eps: float, multipliers: Sequence[float] = AttackConfig.pyramid_multipliers, total_eps: float | None = None
) -> float:
    """The ℓ∞ bound, pixel units, that :func:`pyramid_pgd` enforces: min(Σ m_s·eps, total_eps).

    Authors' default (multipliers 20, 10, 1; no total clip) at eps = 8/255: 31·8/255 ≈ 0.973.
    """
    bound = float(sum(multipliers)) * eps
    return bound if total_eps is None else min(bound, total_eps)


def _level_shape(images: torch.Tensor, grid: int) -> tuple[int, int, int, int]:
    b, c, h, w = images.shape
    return (b, c, h, w) if grid == 0 else (b, c, grid, grid)


def _pyramid_apply(
    x: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    grids: Sequence[int],
    multipliers: Sequence[float],
    total_eps: float | None,
) -> torch.Tensor:
    """J(x, δ) = clamp(x + clip(Σ_s m_s·NearestUp(δ_s), ±total_eps), 0, 1); ``[B, 3, H, W]``."""
    size = x.shape[-2:]
    total = torch.zeros_like(x)
    for delta, grid, m in zip(deltas, grids, multipliers):
        up = delta if grid == 0 else F.interpolate(delta, size=size, mode="nearest-exact")
        total = total + m * up
    if total_eps is not None:
        total = total.clamp(-total_eps, total_eps)
    return (x + total).clamp(0.0, 1.0)


def pyramid_pgd(
    loss_fn: LossFn,
    images: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = AttackConfig.random_start,
    grids: Sequence[int] = AttackConfig.pyramid_grids,
    multipliers: Sequence[float] = AttackConfig.pyramid_multipliers,
    total_eps: float | None = AttackConfig.pyramid_total_eps,
    generator: torch.Generator | None = None,
    model: nn.Module | None = None,
) -> torch.Tensor:
    """The authors' multi-scale "pyramid" perturbation (AMT code ``adsv.py:adv_jitter``), ℓ∞ only.

    Level s has its own perturbation δ_s ``[B, 3, g_s, g_s]`` (``g_s = grids[s]`` cells per side,
    nearest-upsampled to H×W; ``0`` = per pixel, ``[B, 3, H, W]``) and multiplier m_s. Authors' default
    at 128 px: grids (4, 8, per-pixel) = 32-px, 16-px and 1-px cells, multipliers (20, 10, 1). Each step:
    δ_s ← clip(δ_s + step_size·sign(∂L/∂δ_s), −eps, eps), i.e. **each level is projected to its own
    ε-ball**; the image is x_adv = clamp(x + Σ_s m_s·Up(δ_s), 0, 1) (one clamp on the sum; the authors
    clamp after each level, which differs only at saturated pixels).

    **Bound actually enforced** (:func:`pyramid_bound`): ‖x_adv − x‖∞ ≤ Σ_s m_s·eps — 31·eps with the
    default multipliers, 0.97 pixel units at eps = 8/255. That is a large structured perturbation, not
    an eps ℓ∞ threat model. With ``total_eps`` set, the summed perturbation is additionally clipped to
    ±total_eps (inside the forward, so gradients see the clip) and the bound is min(Σ m_s·eps, total_eps).

    Args:
        loss_fn, images, step_size, steps, generator, model: as in :func:`pgd`.
        eps: per-level radius, pixel units.
        norm: must be ``"linf"`` (kept for a uniform attack signature).
        random_start: δ_s ~ U[-eps, eps] per cell (the authors' ``random1`` init); else δ_s = 0.
        grids: cells per image side for each level (``0`` = per pixel; at most min(H, W)).
        multipliers: m_s for each level (same length as ``grids``), > 0.
        total_eps: optional ℓ∞ clip of the summed perturbation, pixel units; None = no clip.

    Returns:
        Detached ``[B, 3, H, W]`` images in [0, 1] within :func:`pyramid_bound` of ``images`` (up to
        float rounding). A zero bound returns an exact copy; ``steps == 0`` returns J(x, δ_init).
    """
    if norm != "linf":
        raise ValueError(f"the pyramid perturbation is ℓ∞ only (per-level clip); got norm={norm!r}, use 'linf'")
    _check_common(images, eps, step_size, steps)
    grids, multipliers = tuple(grids), tuple(float(m) for m in multipliers)
    h, w = images.shape[-2:]
    if not grids or len(grids) != len(multipliers):
        raise ValueError(f"pyramid needs one multiplier per grid level, got grids={grids}, multipliers={multipliers}")
    bad = [g for g in grids if isinstance(g, bool) or not isinstance(g, int) or g < 0 or g > min(h, w)]
    if bad:
        raise ValueError(f"pyramid grids must be ints in 0..{min(h, w)} (cells per side; 0 = per pixel), got {bad}")
    if any(not m > 0 for m in multipliers):
        raise ValueError(f"pyramid multipliers must be > 0, got {multipliers}")
    if total_eps is not None and not total_eps >= 0:
        raise ValueError(f"pyramid total_eps must be >= 0 or None, got {total_eps}")
    x = images.detach()
    bound = pyramid_bound(eps, multipliers, total_eps)
    if bound == 0:
        return x.clone()
    logger.debug("pyramid: eps=%.4g (bound %.4g) step_size=%.4g steps=%d grids=%s multipliers=%s on %s",
                 eps, bound, step_size, steps, grids, multipliers, tuple(x.shape))

    def apply(*deltas: torch.Tensor) -> torch.Tensor:
        return _pyramid_apply(x, deltas, grids, multipliers, total_eps)

    if random_start:
        deltas = [(2.0 * _rand(_level_shape(x, g), generator, x) - 1.0) * eps for g in grids]
    else:
        deltas = [torch.zeros(_level_shape(x, g), device=x.device, dtype=x.dtype) for g in grids]
    with eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            grads = _grad(loss_fn, deltas, apply)
            with torch.no_grad():
                deltas = [(d + step_size * g.sign()).clamp(-eps, eps) for d, g in zip(deltas, grads)]
    with torch.no_grad():
        return apply(*deltas).detach()


# ----------------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------------


def _check_logits(logits: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(logits.shape) != expected:
        raise ValueError(f"logits_fn returned shape {tuple(logits.shape)}, expected {expected} to match the {what}")


def kl_objective(logits_fn: LogitsFn, clean_logits: torch.Tensor) -> LossFn:
    """Closure x_adv ↦ KL(softmax(clean_logits) ‖ softmax(logits_fn(x_adv))), batch mean (TRADES).

    ``clean_logits`` ``[B, N]`` are computed once by the caller (e.g. under ``torch.no_grad()``) and
    detached here, so each attack step costs one forward, not two. Label-free. Computed in
    float32. Its gradient is zero at x_adv = x: use it with a random start.
    """
    target = F.log_softmax(clean_logits.detach().float(), dim=-1)

    def loss(x_adv: torch.Tensor) -> torch.Tensor:
        logits = logits_fn(x_adv)
        _check_logits(logits, tuple(target.shape), "clean logits")
        return F.kl_div(F.log_softmax(logits.float(), dim=-1), target, reduction="batchmean", log_target=True)

    return loss


def ce_objective(logits_fn: LogitsFn, labels: torch.Tensor) -> LossFn:
    """Closure x_adv ↦ cross-entropy(logits_fn(x_adv), labels), batch mean; ``labels`` ``[B]`` int64."""
    labels = labels.detach()

    def loss(x_adv: torch.Tensor) -> torch.Tensor:
        logits = logits_fn(x_adv)
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(f"logits_fn returned shape {tuple(logits.shape)}, expected [{labels.shape[0]}, N]")
        return F.cross_entropy(logits.float(), labels)

    return loss


def _kl_from(logits_fn: LogitsFn, clean_logits: torch.Tensor | None, labels: torch.Tensor | None) -> LossFn:
    if clean_logits is None:
        raise ValueError("objective 'kl' needs clean_logits (the clean query logits, computed once)")
    return kl_objective(logits_fn, clean_logits)


def _ce_from(logits_fn: LogitsFn, clean_logits: torch.Tensor | None, labels: torch.Tensor | None) -> LossFn:
    if labels is None:
        raise ValueError("objective 'ce' needs labels (the query labels)")
    return ce_objective(logits_fn, labels)


# Objective name -> builder(logits_fn, clean_logits, labels) -> loss closure.
OBJECTIVES: dict[str, Callable[[LogitsFn, torch.Tensor | None, torch.Tensor | None], LossFn]] = {
    "kl": _kl_from,
    "ce": _ce_from,
}

# Attack name -> function(loss_fn, images, *, eps, step_size, steps, norm, random_start, generator, model, ...).
ATTACKS: dict[str, Callable[..., torch.Tensor]] = {
    "pgd": pgd,
    "pyramid": pyramid_pgd,
}


def make_objective(
    name: str,
    logits_fn: LogitsFn,
    *,
    clean_logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> LossFn:
    """Loss closure ``name`` from :data:`OBJECTIVES`: ``"kl"`` needs ``clean_logits``, ``"ce"`` ``labels``."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown attack objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](logits_fn, clean_logits, labels)


def run_attack(
    cfg: AttackConfig,
    loss_fn: LossFn,
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    model: nn.Module | None = None,
) -> torch.Tensor:
    """Run the attack described by ``cfg`` (``pyramid_pgd`` if ``cfg.pyramid`` else ``pgd``) on ``images``."""
    kwargs: dict = {"eps": cfg.eps, "step_size": cfg.step_size, "steps": cfg.steps, "norm": cfg.norm,
                    "random_start": cfg.random_start, "generator": generator, "model": model}
    if cfg.pyramid:
        kwargs.update(grids=cfg.pyramid_grids, multipliers=cfg.pyramid_multipliers, total_eps=cfg.pyramid_total_eps)
    return ATTACKS["pyramid" if cfg.pyramid else "pgd"](loss_fn, images, **kwargs)


def adversarial_queries(
    cfg: AttackConfig,
    logits_fn: LogitsFn,
    query_images: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    clean_logits: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    model: nn.Module | None = None,
) -> torch.Tensor:
    """Attack ``query_images`` ``[Q, 3, H, W]`` with ``cfg``'s attack and objective; returns detached ``[Q, 3, H, W]``.

    ``logits_fn`` maps images to ``[Q, N]`` logits (e.g. cosine logits against clean-support prototypes).
    For ``cfg.objective == "kl"`` the clean logits are computed here once (no grad, ``model`` in eval
    mode) unless given; ``"ce"`` needs ``labels`` ``[Q]``.
    """
    if cfg.objective == "kl" and clean_logits is None:
        with torch.no_grad(), eval_mode(model):
            clean_logits = logits_fn(query_images)
    if cfg.objective == "kl" and not cfg.random_start:
        logger.warning("KL objective without random start: its gradient is 0 at the clean input, so the attack "
                       "may not move; set random_start=True")
    loss_fn = make_objective(cfg.objective, logits_fn, clean_logits=clean_logits, labels=labels)
    return run_attack(cfg, loss_fn, query_images, generator=generator, model=model)


def robust_under_pgd(attack: AttackConfig, logits_fn: LogitsFn, images: torch.Tensor, labels: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
    """``[Q]`` bool: the queries classified correctly at every point PGD evaluated — the start and every
    iterate of each of ``attack.restarts`` runs, and each run's final images (the worst case)."""
    robust = torch.ones(len(images), dtype=torch.bool)

    def recording(x: torch.Tensor) -> torch.Tensor:
        logits = logits_fn(x)
        robust.logical_and_(logits.detach().argmax(-1).cpu() == labels.cpu())
        return logits

    for _ in range(max(1, attack.restarts)):
        x_adv = adversarial_queries(attack, recording, images, labels=labels, generator=generator)
        with torch.no_grad():
            recording(x_adv)
    return robust
