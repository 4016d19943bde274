"""APSV: adversarial perturbation of one member's LoRA factors (docs/method.md, "Meta-tuning", step 3).

Given the factor tensors T ∈ {A, B} of the member being trained and the gradients g = ∂L/∂T of the
training loss (the ascent direction), every tensor is moved, in place, by

    relative (default, AWP-style, as the authors' ``ADSV``):  T ← T + η1 · ‖T‖_F · g / (‖g‖_F + 1e-20)
    absolute (the paper's literal rule):                       T ← T + η1 · g

so in relative mode ‖ΔT‖_F = η1·‖T‖_F for each tensor separately (η1 = 1e-4) and only the direction of
each gradient survives: any positive scaling of the loss (e.g. a ``GradScaler`` scale) cancels. With the
SVD initialisation ‖A‖_F² = ‖B‖_F² = Σ_{i≤r} σ_i, so the step is tied to the principal singular values
(hence "adversarial singular values"). A tensor is skipped (left exactly as it is, nothing saved) when its
gradient is ``None`` (unused), all zeros or not finite (logged), or, in relative mode, when ‖T‖_F = 0.

Unlike the authors' code, which deep-copies the whole model every episode, the perturbation is applied in
place inside a context manager that saves copies of the perturbed tensors only (memory ∝ LoRA parameters)
and copies them back in ``finally``: the weights come back bit-for-bit, exception or not (never restored by
subtraction, which leaves ~1e-8 of float32 drift per step in the authors' code).

Order of operations for training (SAM/AWP): the gradient of the outer step is taken AT the perturbed
weights, the weights are restored, and the optimiser step is applied to the restored (clean) weights::

    params = mark_trainable(model, "member0")     # that member's A, B
    with adversarial_weights(params, loss_fn, cfg):   # ascend: grads of loss_fn() at the clean weights
        loss = loss_fn(); loss.backward()             # .grad at the perturbed weights
    optimizer.step()                                  # on the restored weights
    optimizer.zero_grad()

:func:`adversarial_weights` takes its ascent gradients with :func:`torch.autograd.grad`, so it never
touches ``.grad``. Caveat of any in-place perturbation: the factors' autograd version counters change on
entry and on exit, so a graph that saved the factors *before* entering (e.g. support features computed at
the clean weights with their graph kept) cannot be back-propagated inside the context in float32 —
autograd raises its "modified by an inplace operation" error instead of returning a wrong gradient.
Under autocast the saved tensors are cast copies of the clean factors, so it works and gives the authors'
semantics (support branch differentiated at the clean weights). In float32, either compute such features
inside the context or detach them. The autocast cast cache is cleared on entry and exit, so one autocast
region may span the whole episode.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from amt.config import PerturbConfig

logger = logging.getLogger(__name__)

PERTURB_MODES = ("relative", "absolute")
TINY = 1e-20  # added to ‖g‖ in relative mode, as in the authors' ``diff_in_weights``

__all__ = ["PERTURB_MODES", "adversarial_weights", "perturbed", "weight_perturbation"]


def _check_params(params: Sequence[Tensor], what: str) -> None:
    ids = [id(p) for p in params]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what}: the same tensor appears more than once in params; pass each LoRA factor once")


@torch.no_grad()
def weight_perturbation(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    eta: float,
    mode: str = "relative",
) -> list[Tensor | None]:
    """The APSV steps ΔT for each tensor T of ``params`` (a pure function: nothing is modified).

    Args:
        params: the factors, e.g. ``adapter_parameters(model, name)``: ``lora_A`` ``[splits·r, in]``,
            ``lora_B`` ``[out, r]``.
        grads: ∂L/∂T for each tensor (same shapes), or ``None`` for a tensor the loss does not use.
        eta: η1 ≥ 0; in relative mode the fraction of ‖T‖_F each tensor moves by (dimensionless), in
            absolute mode the step size on the raw gradient (units of T per unit of ∂L/∂T).
        mode: ``"relative"`` (ΔT = η1·‖T‖·g/(‖g‖+1e-20)) or ``"absolute"`` (ΔT = η1·g).

    Returns:
        One entry per tensor: ΔT (detached, T's shape, dtype and device), or ``None`` where the tensor is
        skipped (gradient ``None``, zero or non-finite; relative mode: ‖T‖ = 0; or η1 = 0).
        Norms are accumulated in at least float32; one host synchronisation for the whole list.
    """
    if mode not in PERTURB_MODES:
        raise ValueError(f"unknown perturbation mode {mode!r}; choose one of {PERTURB_MODES}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"perturbation eta must be a finite number >= 0, got {eta!r} (the paper uses 1e-4)")
    if len(params) != len(grads):
        raise ValueError(f"got {len(params)} params but {len(grads)} grads; pass one gradient (or None) per param")
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is not None and g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has shape {tuple(p.shape)}")
    deltas: list[Tensor | None] = [None] * len(params)
    live = [i for i, g in enumerate(grads) if g is not None]
    if eta == 0 or not live:
        return deltas

    def norm(t: Tensor) -> Tensor:
        return torch.linalg.vector_norm(t.detach(), dtype=torch.promote_types(t.dtype, torch.float32))

    device = grads[live[0]].device
    g_norms = [norm(grads[i]) for i in live]
    t_norms = [norm(params[i]) for i in live] if mode == "relative" else g_norms
    stats = torch.stack([n.to(device, torch.float64) for n in g_norms + t_norms]).tolist()  # one sync
    g_host, t_host = stats[: len(live)], stats[len(live):]
    skipped_nonfinite = []
    for k, i in enumerate(live):
        g, p = grads[i], params[i]
        if not math.isfinite(g_host[k]):
            skipped_nonfinite.append(i)
            continue
        if g_host[k] == 0 or t_host[k] == 0:
            continue
        acc = torch.promote_types(g.dtype, torch.float32)
        if mode == "relative":
            coeff = eta * t_norms[k] / (g_norms[k] + TINY)  # 0-dim tensor on device: no extra sync
            step = g.detach().to(acc) * coeff.to(device=g.device, dtype=acc)
        else:
            step = g.detach().to(acc) * eta
        deltas[i] = step.to(device=p.device, dtype=p.dtype)
    if skipped_nonfinite:
        logger.warning("APSV: non-finite gradient for %d tensor(s) (indices %s); they are not perturbed",
                       len(skipped_nonfinite), skipped_nonfinite[:8])
    logger.debug("APSV (%s, eta=%g): %d of %d tensors perturbed", mode, eta,
                 sum(d is not None for d in deltas), len(deltas))
    return deltas


@contextmanager
def perturbed(params: Sequence[Tensor], deltas: Sequence[Tensor | None]) -> Iterator[list[Tensor | None]]:
    """Context manager: T ← T + ΔT in place (under ``no_grad``) on entry; exact previous values in ``finally``.

    Only tensors with a non-``None`` delta are copied and modified (memory ∝ their size). Restoration copies
    the saved values back, so the tensors are bit-for-bit what they were (``torch.equal``), also when the
    body raises. ``.grad`` is not touched: gradients computed inside survive the exit (SAM/AWP order).
    The autocast weight cache is cleared on entry and on exit: within one autocast region it would otherwise
    keep serving low-precision casts of the unperturbed leaf parameters, silently undoing the perturbation.
    Yields ``deltas`` as a list.
    """
    if len(params) != len(deltas):
        raise ValueError(f"got {len(params)} params but {len(deltas)} deltas; pass one delta (or None) per param")
    _check_params(params, "perturbed")
    for i, (p, d) in enumerate(zip(params, deltas)):
        if d is not None and d.shape != p.shape:
            raise ValueError(f"deltas[{i}] has shape {tuple(d.shape)} but params[{i}] has shape {tuple(p.shape)}")
    saved: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for p, d in zip(params, deltas):
                if d is None:
                    continue
                saved.append((p, p.detach().clone()))
                p.add_(d.to(device=p.device, dtype=p.dtype))
        torch.clear_autocast_cache()  # else, inside one autocast region, stale casts of T would be reused
        yield list(deltas)
    finally:
        with torch.no_grad():
            for p, original in reversed(saved):
                p.copy_(original)
        torch.clear_autocast_cache()


@contextmanager
def adversarial_weights(
    params: Sequence[nn.Parameter],
    loss: Tensor | Callable[[], Tensor],
    cfg: PerturbConfig,
    *,
    retain_graph: bool = False,
) -> Iterator[list[Tensor | None]]:
    """APSV as one context manager: ascend the loss on ``params``, yield, restore the exact values.

    Args:
        params: the member's LoRA factors (``adapter_parameters(model, name)``); all must require grad.
        loss: a scalar loss at the current (clean) weights, or a closure computing it (called once, on entry,
            with grad enabled). Its gradients w.r.t. ``params`` are taken with :func:`torch.autograd.grad`,
            so no ``.grad`` attribute changes; unused params get no perturbation.
        cfg: :class:`~amt.config.PerturbConfig` (``eta`` = η1, ``mode``). Whether APSV runs at all is the
            caller's decision (``TrainConfig.apsv``): this function always perturbs.
        retain_graph: keep the loss graph after the ascent gradient (when parts of it are reused later).

    Yields the deltas (see :func:`weight_perturbation`). Compute the outer gradient inside the context and
    step the optimiser after it (module docstring).
    """
    params = list(params)
    _check_params(params, "adversarial_weights")
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen:
        raise ValueError(f"APSV params {frozen[:8]} do not require grad; pass the trained member's factors "
                         "(e.g. the result of mark_trainable / adapter_parameters after mark_trainable)")
    if callable(loss):
        with torch.enable_grad():
            loss = loss()
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"APSV needs a scalar loss, got {shape}; reduce it (e.g. .mean()) first")
    if not loss.requires_grad:
        raise ValueError("APSV loss does not require grad: it was computed under no_grad or does not depend "
                         "on the given params")
    grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True, retain_graph=retain_graph)
    deltas = weight_perturbation(params, grads, cfg.eta, cfg.mode)
    del grads
    with perturbed(params, deltas) as d:
        yield d
