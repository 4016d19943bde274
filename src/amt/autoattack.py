"""AutoAttack for few-shot tasks: the parameter-free ℓ∞ attack ensemble of Croce & Hein (2020) on a per-task classifier.

AutoAttack (F. Croce, M. Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020, https://github.com/fra31/auto-attack) is the accepted yardstick for a
robustness claim: instead of one hand-tuned PGD it runs, in sequence, attacks that need no step size

  * ``"apgd-ce"`` — APGD (auto step-size PGD with momentum) on the cross-entropy, ``cfg.restarts`` restarts;
  * ``"apgd-t"``  — targeted APGD on the targeted DLR loss, once per target class, 1 restart each;
  * ``"fab-t"``   — targeted FAB (minimum-norm boundary attack), once per target class, 1 restart each;
  * ``"square"``  — the black-box Square attack (random search, margin loss, ``cfg.square_queries`` queries,
    p_init 0.8, the reference's un-rescaled p schedule), which gradient masking cannot fool.

``cfg.version == "apgd"`` runs APGD-CE and APGD-T; ``"standard"`` all four (the reference's "standard"
version). APGD-CE, APGD-T and FAB-T run ``cfg.steps`` iterations each (the reference's 100).

**Targets.** The reference assumes 10 classes and attacks 9 targets. A few-shot task has ``n_way`` classes,
so the targeted attacks use exactly ``n_way − 1`` targets: every class other than the true one. With
``n_classes=n_way`` torchattacks' ``APGDT`` and ``FAB(multi_targeted=True)`` loop ``target_class`` over
``2..n_way`` and take ``clean_logits.sort()[1][:, -target_class]``, i.e. the classes ranked 2nd..n_way-th on
the clean input — all indices of the ``[Q, n_way]`` logits, never the top-1, which is the true label because
only correctly classified queries are attacked. (Left at torchattacks' default of 10, the 6th-ranked class of
a 5-way task does not exist and the attack fails with an IndexError.) The targeted DLR loss uses the 3rd and
4th largest logits, so ``n_way >= 4`` is required.

**Sequence and worst case.** As in the reference, each attack runs only on the queries still robust (correct
on the clean input and after every earlier attack); a query flipped by any attack is broken, whatever later
attacks would do. Correctness is always re-evaluated on the image the attack returns (after projecting it
onto the ε-ball and [0, 1]), so a query counts as broken only with an image that is misclassified.

**``per_attack[name]``** is the robust mask *after the ensemble up to and including* ``name``: True iff the
query was clean-correct, survived every earlier attack, and ``name`` (run on it) did not flip it. Queries
broken before ``name`` ran are False. So the masks shrink along the sequence, the last equals ``robust``,
and ``per_attack[name].float().mean()`` is the reference's running robust accuracy after ``name``. It is
*not* the accuracy under ``name`` alone; :func:`square` runs Square alone (the gradient-masking check).

Implementation: the maintained single attacks of torchattacks (H. Kim, "Torchattacks: A PyTorch repository
for adversarial attacks", arXiv:2010.01950; installed with ``pip install 'amt[autoattack]'``), not
``torchattacks.AutoAttack``, whose "standard" version runs APGD/APGD-T/FAB at 10 iterations instead of 100.
Guarantees: the model (if given; and ``logits_fn`` if it is itself an ``nn.Module``) runs in eval mode,
each submodule's mode restored after; its parameters are temporarily set to ``requires_grad=False`` (FAB
calls ``.backward()``) and restored, so weights, flags and ``.grad`` are unchanged; torchattacks re-seeds the
global RNG with ``seed``, which is done inside ``torch.random.fork_rng`` so the caller's RNG state (CPU, and
the CUDA devices in use) is unchanged and two calls with the same seed give identical results; works under
an outer ``torch.no_grad()`` (gradients are re-enabled locally; not under ``torch.inference_mode()``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from amt.attacks import LogitsFn, eval_mode
from amt.config import AutoAttackConfig, ConfigError

logger = logging.getLogger(__name__)

# cfg.version -> attacks run, in this order (the reference's order)
VERSIONS: dict[str, tuple[str, ...]] = {
    "apgd": ("apgd-ce", "apgd-t"),
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
}
MIN_WAY = 4  # the targeted DLR loss of APGD-T reads the 4th largest logit
_INSTALL_HINT = "pip install 'amt[autoattack]' (or set autoattack.version=none)"


@dataclass(frozen=True)
class AutoAttackResult:
    """Outcome of :func:`autoattack` on one task's ``Q`` queries.

    ``robust`` ``[Q]`` bool: correct on the clean input and after every attack of the ensemble (worst case).
    ``per_attack`` name → ``[Q]`` bool: the robust mask after the ensemble up to and including that attack
    (False for queries broken earlier; see the module docstring); keys in the order run.
    ``adversarial`` ``[Q, 3, H, W]``: the image that broke each query, the clean image where none did (also
    for queries wrong on the clean input); within ε (ℓ∞, pixel units) of the clean image and in [0, 1].
    """

    robust: torch.Tensor
    per_attack: dict[str, torch.Tensor]
    adversarial: torch.Tensor


class _LogitsModule(nn.Module):
    """``forward(x) = logits_fn(x)``: the ``nn.Module`` torchattacks expects.

    ``model`` (the backbone inside ``logits_fn``) is registered as a submodule so that torchattacks' mode
    switches reach it; without one, an empty parameter on ``device`` keeps torchattacks from failing to find a
    device (its device is set explicitly to the images' anyway).
    """

    def __init__(self, logits_fn: LogitsFn, model: nn.Module | None, device: torch.device) -> None:
        super().__init__()
        self.logits_fn = logits_fn
        if model is not None:
            self.model = model
        else:
            self.anchor = nn.Parameter(torch.empty(0, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_fn(x)


def _torchattacks():
    """The torchattacks module, imported lazily (an optional dependency: the ``autoattack`` extra)."""
    try:
        import torchattacks
    except ImportError as e:  # also a None entry in sys.modules
        raise ConfigError(f"AutoAttack needs the optional package torchattacks: {_INSTALL_HINT}") from e
    return torchattacks


@contextlib.contextmanager
def _frozen(model: nn.Module | None) -> Iterator[None]:
    """Set ``model``'s trainable parameters to ``requires_grad=False`` for the block, restore them after.

    FAB back-propagates with ``.backward()``, which would accumulate into the ``.grad`` of any parameter that
    requires grad; frozen, only the input gets a gradient.
    """
    params = [] if model is None else [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _modules(model: nn.Module | None, logits_fn: LogitsFn) -> list[nn.Module]:
    """The modules whose modes and ``requires_grad`` flags the attack sets and restores: ``model``, and
    ``logits_fn`` itself if it is an ``nn.Module`` (torchattacks' ``eval()`` reaches it as a submodule)."""
    found = [m for m in (model, logits_fn) if isinstance(m, nn.Module)]
    return found[:1] if len(found) == 2 and found[0] is found[1] else found


def _rng_devices(device: torch.device) -> list[int]:
    """CUDA devices whose RNG state :func:`torch.random.fork_rng` must save: torchattacks seeds the current one."""
    if not torch.cuda.is_available():
        return []
    devices = {torch.cuda.current_device()}
    if device.type == "cuda":
        devices.add(device.index if device.index is not None else torch.cuda.current_device())
    return sorted(devices)


def _project(adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Exact projection onto the ℓ∞ ε-ball around ``x`` intersected with [0, 1] (per element)."""
    return torch.minimum(torch.maximum(adv, x - eps), x + eps).clamp(0.0, 1.0)


def _check(images: torch.Tensor, labels: torch.Tensor, eps: float, seed: int) -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError("AutoAttack needs autograd: call it outside torch.inference_mode() "
                           "(torch.no_grad() is fine)")
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"AutoAttack expects float images [Q, 3, H, W], got {tuple(images.shape)} {images.dtype}")
    if images.numel() and (bool(images.min() < 0) or bool(images.max() > 1)):
        raise ValueError("AutoAttack expects pixels in [0, 1] (attack the unnormalised images), got range "
                         f"[{images.min().item():.4g}, {images.max().item():.4g}]")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be [Q] = [{images.shape[0]}], got {tuple(labels.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0 (ℓ∞, pixel units, e.g. 8/255), got {eps}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")


def _build(ta, name: str, net: nn.Module, eps: float, n_way: int, steps: int, restarts: int, queries: int,
           seed: int, rescale: bool = False):
    """The torchattacks attack ``name`` on ``net`` (ℓ∞, ``eps`` in pixel units), seeded with ``seed``."""
    if name == "apgd-ce":
        return ta.APGD(net, norm="Linf", eps=eps, steps=steps, n_restarts=restarts, seed=seed, loss="ce",
                       eot_iter=1, rho=0.75)
    if name == "apgd-t":  # targets: the classes ranked 2..n_way on the clean input (n_way - 1 of them)
        return ta.APGDT(net, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, eot_iter=1, rho=0.75,
                        n_classes=n_way)
    if name == "fab-t":
        return ta.FAB(net, norm="Linf", eps=eps, steps=steps, n_restarts=1, alpha_max=0.1, eta=1.05, beta=0.9,
                      seed=seed, multi_targeted=True, n_classes=n_way)
    if name == "square":
        return ta.Square(net, norm="Linf", eps=eps, n_queries=queries, n_restarts=1, p_init=0.8, loss="margin",
                         resc_schedule=rescale, seed=seed)
    raise ValueError(f"unknown AutoAttack attack {name!r}")


def _run(
    logits_fn: LogitsFn,
    images: torch.Tensor,
    labels: torch.Tensor,
    n_way: int | None,
    eps: float,
    seed: int,
    model: nn.Module | None,
    names: tuple[str, ...],
    make: Callable[[object, str, nn.Module, int], object],
) -> AutoAttackResult:
    """Clean pass, then the attacks ``names`` in sequence on the queries still robust (see the module docstring).

    ``make(torchattacks, name, net, n_way)`` builds each attack; ``n_way`` None: the logits' width.
    """
    _check(images, labels, eps, seed)
    ta = _torchattacks()
    x = images.detach()
    y = labels.detach().to(device=x.device, dtype=torch.long)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=_rng_devices(x.device)))
        for module in _modules(model, logits_fn):
            stack.enter_context(_frozen(module))
            stack.enter_context(eval_mode(module))
        stack.enter_context(torch.enable_grad())
        net = _LogitsModule(logits_fn, model, x.device).eval()
        with torch.no_grad():
            clean = net(x)
        n_way = clean.shape[-1] if n_way is None else n_way
        if clean.ndim != 2 or tuple(clean.shape) != (x.shape[0], n_way):
            raise ValueError(f"logits_fn returned shape {tuple(clean.shape)}, expected [{x.shape[0]}, {n_way}]")
        if y.numel() and (bool(y.min() < 0) or bool(y.max() >= n_way)):
            raise ValueError(f"labels must be in 0..{n_way - 1}, got range [{int(y.min())}, {int(y.max())}]")
        robust = clean.argmax(-1) == y
        adversarial = x.clone()
        per_attack: dict[str, torch.Tensor] = {}
        for name in names:
            idx = robust.nonzero().flatten()
            survived = torch.zeros_like(robust)
            if idx.numel() and eps > 0:
                atk = make(ta, name, net, n_way)
                atk.set_device(x.device)
                t0 = time.perf_counter()
                x_sub = x[idx]
                adv = atk(x_sub, y[idx]).detach().to(x.dtype)
                violation = (adv - x_sub).abs().amax().item() if adv.numel() else 0.0
                if violation > eps + 1e-6 or (adv.numel() and (adv.min() < 0 or adv.max() > 1)):
                    logger.warning("autoattack: %s returned images outside the ε-ball or [0, 1] (max |δ| %.4g, "
                                   "eps %.4g); projected", name, violation, eps)
                adv = _project(adv, x_sub, eps)
                with torch.no_grad():
                    still = net(adv).argmax(-1) == y[idx]
                survived[idx] = still
                adversarial[idx[~still]] = adv[~still]
                logger.debug("autoattack: %s on %d queries broke %d in %.2fs", name, idx.numel(),
                             int((~still).sum()), time.perf_counter() - t0)
            elif idx.numel():
                survived = robust.clone()  # eps = 0: nothing can flip a query
            robust = survived
            per_attack[name] = survived.clone()
    logger.debug("autoattack (%s) eps=%.4g: clean %d/%d, robust %d/%d in %.2fs", "+".join(names), eps,
                int((clean.argmax(-1) == y).sum()), y.numel(), int(robust.sum()), y.numel(),
                time.perf_counter() - start)
    return AutoAttackResult(robust=robust, per_attack=per_attack, adversarial=adversarial.detach())


def autoattack(
    logits_fn: LogitsFn,
    images: torch.Tensor,
    labels: torch.Tensor,
    n_way: int,
    eps: float,
    cfg: AutoAttackConfig,
    seed: int,
    model: nn.Module | None = None,
) -> AutoAttackResult:
    """Run the AutoAttack ensemble ``cfg.version`` (ℓ∞) on one task's queries.

    Args:
        logits_fn: the task's classifier, images ``[Q, 3, H, W]`` in [0, 1] → logits ``[Q, n_way]``,
            differentiable w.r.t. the images (e.g. :class:`amt.methods.ProtoNet` on clean-support prototypes).
        images: clean query images ``[Q, 3, H, W]``, float, in [0, 1].
        labels: ``[Q]`` int labels in ``0..n_way-1``.
        n_way: classes of the task (>= 4); the targeted attacks use its ``n_way - 1`` other classes.
        eps: ℓ∞ radius, pixel units (e.g. 4/255).
        cfg: ``version`` ("apgd" | "standard"; "none" is refused), ``steps`` (APGD-CE, APGD-T, FAB-T),
            ``restarts`` (APGD-CE), ``square_queries`` (Square).
        seed: seed of every attack (torchattacks seeds the global RNG with it, inside ``fork_rng``).
        model: the module inside ``logits_fn`` (eval mode during the attack; modes, weights and gradients
            left as they were). None: nothing to switch; the device is the images'.

    Returns:
        :class:`AutoAttackResult` (``robust``, ``per_attack`` in the order run, ``adversarial``).

    Raises:
        ConfigError: torchattacks is not installed (``pip install 'amt[autoattack]'``).
        ValueError: ``cfg.version`` is "none" or unknown, ``n_way < 4``, or bad shapes/labels/eps.
    """
    if cfg.version not in VERSIONS:
        raise ValueError(f"autoattack.version must be one of {sorted(VERSIONS)} to run AutoAttack, got "
                         f"{cfg.version!r} (\"none\" means: do not call autoattack)")
    if isinstance(n_way, bool) or not isinstance(n_way, int) or n_way < MIN_WAY:
        raise ValueError(f"AutoAttack's targeted DLR loss (APGD-T) needs n_way >= {MIN_WAY}, got {n_way!r}")
    if cfg.steps < 1 or cfg.restarts < 1 or cfg.square_queries < 1:
        raise ValueError(f"autoattack.steps, restarts and square_queries must be >= 1, got {cfg.steps}, "
                         f"{cfg.restarts}, {cfg.square_queries}")

    def make(ta, name: str, net: nn.Module, n: int):
        return _build(ta, name, net, eps, n, cfg.steps, cfg.restarts, cfg.square_queries, seed)

    return _run(logits_fn, images, labels, n_way, eps, seed, model, VERSIONS[cfg.version], make)


def square(
    logits_fn: LogitsFn,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    queries: int,
    seed: int,
    model: nn.Module | None = None,
) -> torch.Tensor:
    """Robustness under the black-box Square attack alone (ℓ∞), for the gradient-masking check.

    Square (Andriushchenko et al., ECCV 2020) only queries ``logits_fn`` (no gradients), with the margin
    loss, p_init 0.8 and one restart of ``queries`` queries; unlike the ensemble's Square, its p schedule is
    rescaled to ``queries`` (so a short budget still goes through the whole schedule).

    Args:
        logits_fn, images, labels, seed, model: as in :func:`autoattack` (the classes are the logits' width).
        eps: ℓ∞ radius, pixel units.
        queries: model queries per attacked image (>= 1).

    Returns:
        ``[Q]`` bool: correct on the clean input and after Square.
    """
    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        raise ValueError(f"queries must be an int >= 1, got {queries!r}")

    def make(ta, name: str, net: nn.Module, n: int):
        return _build(ta, name, net, eps, n, 1, 1, queries, seed, rescale=True)

    return _run(logits_fn, images, labels, None, eps, seed, model, ("square",), make).robust
