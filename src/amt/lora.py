"""LoRA pools at the model level: injection, adapter management, merging, state dicts, residual fingerprints.

:func:`inject_lora` replaces the targeted ``nn.Linear`` modules of a model by
:class:`~amt.lora_layer.LoRALinear` layers (the layer, its SVD init and exact merge are described in
:mod:`amt.lora_layer`); the functions here apply one operation to every LoRA layer of a model, checking
the adapter names first. The pool and its merging rule are those of docs/method.md ("Model", "Test-time
merging").

Typical use::

    names = inject_lora(model, names=("member0", "member1"), rank=8)   # member0 active
    mark_trainable(model, "member1")
    with active_adapter(model, "member1"):
        loss = ...                                                     # trains member1 only
    with merged(model, {"member0": 0.4, "member1": 0.6}):
        feats = model(images)                                          # W_res + Σ w ΔW

The pool-management functions (activate, mark trainable, merge, state dicts) work on every pool layer of a
model (:func:`pool_layers`): LoRA layers, and the FiLM/Adapter pools of :mod:`amt.peft_modules` (``train.mode``
"film"/"adapter"), which follow the same protocol.

A trained member is stored as :func:`adapter_state_dict` (its factors only); it is meaningful only on the
same frozen residuals W_res, which :func:`residual_fingerprint` summarises and
:func:`check_residual_fingerprint` verifies when a pool is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from amt.config import LORA_TARGETS
from amt.lora_layer import INIT_MODES, LoRALinear
from amt.peft_modules import MemberPool

logger = logging.getLogger(__name__)

DEFAULT_SPLITS = {"attn.qkv": 3}  # target suffix → number of independently adapted row blocks

__all__ = [
    "DEFAULT_SPLITS",
    "LoadResult",
    "active_adapter",
    "adapter_names",
    "adapter_parameters",
    "adapter_state_dict",
    "add_adapter",
    "check_residual_fingerprint",
    "inject_lora",
    "load_adapter_state_dict",
    "lora_layers",
    "mark_trainable",
    "merge_adapters",
    "merged",
    "pool_layers",
    "remove_adapter",
    "residual_fingerprint",
    "set_active_adapter",
    "unmerge_adapters",
]


def _matches(name: str, target: str) -> bool:
    """Exact dotted-suffix match: ``blocks.0.attn.proj`` matches ``attn.proj``; ``patch_embed.proj`` does not."""
    return name == target or name.endswith("." + target)


def inject_lora(
    model: nn.Module,
    targets: Sequence[str] = LORA_TARGETS,
    names: Sequence[str] = ("member0",),
    rank: int = 8,
    scaling: float = 1.0,
    init: str = "svd",
    generator: torch.Generator | None = None,
    splits_for: Mapping[str, int] | None = None,
) -> list[str]:
    """Replace, in place, every ``nn.Linear`` whose qualified name ends with a target by a :class:`LoRALinear`.

    Matching is on the full dotted suffix (``"attn.proj"`` hits ``blocks.3.attn.proj`` but not
    ``patch_embed.proj``); a matching module that is not an ``nn.Linear`` is skipped with a warning.
    ``splits_for`` maps a target to its number of row blocks (default :data:`DEFAULT_SPLITS`: ``attn.qkv`` → 3).
    Every name in ``names`` becomes an adapter (for ``"standard"`` init, A is drawn member by member, layer by
    layer, from ``generator``), and ``names[0]`` is made active so that an SVD-initialised model computes the
    same function as before. Load pre-trained backbone weights *before* injecting (the weight becomes W_res).

    Returns the qualified names of the replaced modules, in ``named_modules`` order.
    """
    if not names:
        raise ValueError("inject_lora needs at least one adapter name (e.g. names=('member0',))")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be unique, got {list(names)}")
    if init not in INIT_MODES:
        raise ValueError(f"unknown LoRA init {init!r}; choose one of {INIT_MODES}")
    splits_for = dict(DEFAULT_SPLITS if splits_for is None else splits_for)
    found: list[tuple[str, nn.Linear, int]] = []
    for qualname, module in model.named_modules():
        hit = [t for t in targets if _matches(qualname, t)]
        if not hit:
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(
                f"{qualname} already carries LoRA adapters; add pool members with add_adapter(model, name) instead"
            )
        if not isinstance(module, nn.Linear):
            logger.warning("LoRA target %s matches %s but is a %s, not nn.Linear: skipped", hit, qualname,
                           type(module).__name__)
            continue
        splits = max(splits_for.get(t, 1) for t in hit)
        out_features, in_features = module.weight.shape
        if out_features % splits or rank > min(in_features, out_features // splits):
            raise ValueError(
                f"rank={rank} is too large for {qualname} (Linear out={out_features}, in={in_features}, "
                f"splits={splits}): need rank <= min(in, out/splits) = {min(in_features, out_features // splits)}"
            )
        found.append((qualname, module, splits))
    if not found:
        some = [n for n, _ in model.named_modules() if n][:12]
        raise ValueError(
            f"no nn.Linear in {type(model).__name__} has a name ending with one of the LoRA targets {list(targets)}; "
            f"module names look like {some}"
        )
    layers = []
    for qualname, module, splits in found:
        layer = LoRALinear(module, rank=rank, scaling=scaling, splits=splits)
        parent_name, _, child = qualname.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers.append(layer)
    for name in names:
        for layer in layers:
            layer.add_adapter(name, init=init, generator=generator)
    for layer in layers:
        layer.set_active_adapter(names[0])
    replaced = [q for q, _, _ in found]
    logger.info("LoRA (%s init, rank %d, scaling %g) on %d layers, adapters %s", init, rank, scaling,
                len(replaced), list(names))
    return replaced


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name → :class:`LoRALinear`, in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def pool_layers(model: nn.Module) -> dict[str, LoRALinear | MemberPool]:
    """Qualified name → pool layer (a :class:`LoRALinear` or a FiLM/Adapter :class:`MemberPool`), in
    ``named_modules`` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, MemberPool))}


def _layers_or_raise(model: nn.Module) -> dict[str, LoRALinear | MemberPool]:
    layers = pool_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (nor FiLM/Adapter pools); call "
                         "inject_lora(model, ...) first")
    return layers


def _check_adapter(layers: Mapping[str, LoRALinear | MemberPool], name: str) -> None:
    missing = [q for q, layer in layers.items() if name not in layer.adapter_names]
    if missing:
        known = next(iter(layers.values())).adapter_names
        raise KeyError(f"adapter {name!r} is missing from {len(missing)} LoRA layer(s) (e.g. {missing[:3]}); "
                       f"adapters are {known}")


def adapter_names(model: nn.Module) -> list[str]:
    """Adapter names of the first LoRA layer (every layer holds the same pool)."""
    return next(iter(_layers_or_raise(model).values())).adapter_names


def add_adapter(model: nn.Module, name: str, init: str = "svd", generator: torch.Generator | None = None) -> None:
    """Add adapter ``name`` to every LoRA layer (see :meth:`LoRALinear.add_adapter`)."""
    for layer in _layers_or_raise(model).values():
        layer.add_adapter(name, init=init, generator=generator)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name`` from every LoRA layer."""
    layers = _layers_or_raise(model)
    _check_adapter(layers, name)
    for layer in layers.values():
        layer.remove_adapter(name)


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter of every LoRA layer (``None``: residual weights only)."""
    layers = _layers_or_raise(model)
    if name is not None:
        _check_adapter(layers, name)
    for layer in layers.values():
        layer.set_active_adapter(name)


@contextmanager
def active_adapter(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """Temporarily activate ``name`` in every LoRA layer; each layer's previous choice is restored in ``finally``."""
    layers = _layers_or_raise(model)
    previous = {q: layer.active_adapter for q, layer in layers.items()}
    try:
        set_active_adapter(model, name)
        yield model
    finally:
        for q, layer in layers.items():
            layer.active_adapter = previous[q]


def merge_adapters(model: nn.Module, weights: Mapping[str, float | Tensor]) -> None:
    """weight ← W_res + Σ wᵢ ΔWᵢ in every LoRA layer (Algorithm 2: W' = W_res + Σ ζᵢ BᵢAᵢ).

    All names are checked before anything changes; if a layer fails, layers already merged are restored.
    """
    layers = _layers_or_raise(model)
    for name in weights:
        _check_adapter(layers, name)
    already = [q for q, layer in layers.items() if layer.merged]
    if already:
        raise RuntimeError(f"LoRA layers {already[:3]} are already merged; call unmerge_adapters(model) first")
    done: list[LoRALinear | MemberPool] = []
    try:
        for layer in layers.values():
            layer.merge(weights)
            done.append(layer)
    except BaseException:
        for layer in done:
            layer.unmerge()
        raise


def unmerge_adapters(model: nn.Module) -> None:
    """Restore W_res bit-for-bit in every merged LoRA layer; raises if none is merged."""
    merged_layers = [layer for layer in _layers_or_raise(model).values() if layer.merged]
    if not merged_layers:
        raise RuntimeError("unmerge_adapters: no LoRA layer is merged")
    for layer in merged_layers:
        layer.unmerge()


@contextmanager
def merged(model: nn.Module, weights: Mapping[str, float | Tensor]) -> Iterator[nn.Module]:
    """Context manager: :func:`merge_adapters` on entry, exact restoration of W_res in ``finally``."""
    merge_adapters(model, weights)
    try:
        yield model
    finally:
        for layer in pool_layers(model).values():
            if layer.merged:
                layer.unmerge()


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Every ``lora_A[name]``, ``lora_B[name]`` of the model (a FiLM/Adapter member's tensors), layer by layer."""
    layers = _layers_or_raise(model)
    _check_adapter(layers, name)
    return [p for layer in layers.values() for p in layer.adapter_parameters(name)]


def mark_trainable(model: nn.Module, names: str | Iterable[str]) -> list[nn.Parameter]:
    """Set ``requires_grad`` True on the A/B of the adapters ``names`` and False on every other model parameter.

    Returns the trainable parameters (e.g. for the optimiser). ``names=()`` freezes the whole model.
    """
    names = [names] if isinstance(names, str) else list(names)
    layers = _layers_or_raise(model)
    for name in names:
        _check_adapter(layers, name)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for name in names for p in adapter_parameters(model, name)]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Detached copies of one member's factors, keys ``"<layer>.lora_A"`` ``[splits·rank, in]`` and
    ``"<layer>.lora_B"`` ``[out, rank]`` (no adapter name in the key: loadable into any member); for a FiLM or
    Adapter pool ``"<host>.peft.<tensor>"`` (``scale``/``shift``; ``down``, ``down_bias``, ``up``, ``up_bias``)."""
    layers = _layers_or_raise(model)
    _check_adapter(layers, name)
    return {f"{q}.{key}": t.detach().clone() for q, layer in layers.items()
            for key, t in layer.adapter_tensors(name).items()}


class LoadResult(NamedTuple):
    """Keys that :func:`load_adapter_state_dict` did not find (missing) or did not use (unexpected)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


@torch.no_grad()
def load_adapter_state_dict(
    model: nn.Module, name: str, state: Mapping[str, Tensor], strict: bool = True
) -> LoadResult:
    """Copy factors saved by :func:`adapter_state_dict` into adapter ``name`` (which must exist).

    Shape mismatches always raise; with ``strict`` missing or unexpected keys raise too, nothing is copied
    before every check passes. Values are cast to the layer's device and dtype.
    """
    layers = _layers_or_raise(model)
    _check_adapter(layers, name)
    targets = {f"{q}.{key}": t for q, layer in layers.items() for key, t in layer.adapter_tensors(name).items()}
    missing = [k for k in targets if k not in state]
    unexpected = [k for k in state if k not in targets]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(targets[k].shape)}"
        for k, v in state.items()
        if k in targets and tuple(v.shape) != tuple(targets[k].shape)
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch for {mismatched}")
    if strict and missing:
        problems.append(f"missing keys {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if problems:
        raise ValueError(
            f"cannot load adapter {name!r}: " + "; ".join(problems)
            + " (was it saved from a model with the same targets, rank and splits?)"
        )
    for k, v in state.items():
        if k in targets:
            targets[k].copy_(v)
    return LoadResult(missing, unexpected)


# ====================================================================== residual fingerprint
def _probes(out_features: int, in_features: int) -> tuple[Tensor, Tensor]:
    """Fixed unit vectors u ``[out]``, v ``[in]`` (float64) drawn from a CPU generator seeded by the shape.

    Entries are uniform in [-1, 1) before normalisation: the CPU Mersenne twister and the uniform map are
    the same on every machine, so u and v are too.
    """
    g = torch.Generator().manual_seed(out_features * 1_000_003 + in_features)
    u = torch.rand(out_features, generator=g, dtype=torch.float64) * 2 - 1
    v = torch.rand(in_features, generator=g, dtype=torch.float64) * 2 - 1
    return u / u.norm(), v / v.norm()


@torch.no_grad()
def residual_fingerprint(model: nn.Module) -> dict[str, list[float]]:
    """Compact summary of every LoRA layer's frozen residual weight W_res ``[out, in]``, JSON-ready.

    Returns ``{layer name: [‖W_res‖_F, uᵀ W_res v]}`` computed in float64, with u, v the fixed unit vectors of
    :func:`_probes` (seeded from the layer's shape). W_res is recomputed by SVD whenever a pool is rebuilt, so
    it can differ by float rounding (~1e-7 relative) between machines and libraries: compare fingerprints with
    :func:`check_residual_fingerprint` (a relative tolerance), not bit for bit. Raises ``RuntimeError`` while
    adapters are merged (the weight then is not W_res).
    """
    layers = _layers_or_raise(model)
    merged_now = [q for q, layer in layers.items() if layer.merged]
    if merged_now:
        raise RuntimeError(f"LoRA layers {merged_now[:3]} are merged; call unmerge_adapters(model) before "
                           "residual_fingerprint (it summarises the unmerged residual W_res)")
    out: dict[str, list[float]] = {}
    for q, layer in layers.items():
        w = layer.weight.detach().to(device="cpu", dtype=torch.float64)
        u, v = _probes(*w.shape)
        out[q] = [float(torch.linalg.matrix_norm(w)), float(u @ w @ v)]
    return out


def check_residual_fingerprint(model: nn.Module, saved: Mapping[str, Sequence[float]], where: str,
                               rtol: float = 1e-4) -> None:
    """Raise ``ValueError`` unless ``model``'s W_res match ``saved`` (from :func:`residual_fingerprint`).

    Both entries of a layer are compared relative to the saved Frobenius norm: the relative difference is
    max(|Δ‖W‖_F|, |Δ uᵀWv|) / ‖W_saved‖_F (dimensionless; |uᵀWv| ≤ ‖W‖_F), and it must be ≤ ``rtol``. The error
    names ``where`` (e.g. the pool file), the first mismatching layer and its relative difference; the layer
    names must be the same, in any order. Sensitivity: another checkpoint or other LoRA settings change W_res
    as a whole and fail by orders of magnitude; moving a single element by ε·‖W‖_F changes the summary by only
    about ε·|w_ij|/‖W‖_F + ε²/2, so small local edits of large layers can pass.
    """
    current = residual_fingerprint(model)
    fix = ("the pool was trained on other frozen weights W_res: the same backbone checkpoint and LoRA settings "
           "(targets, rank, scaling, init) are needed, and SVD init can differ across machines/libraries — "
           "retrain the pool here, or load it with the backbone checkpoint and LoRA settings it was trained with")
    missing = [q for q in saved if q not in current]
    extra = [q for q in current if q not in saved]
    if missing or extra:
        raise ValueError(f"{where}: the LoRA layers differ from the model's (in the pool only: {missing[:4]}, in "
                         f"the model only: {extra[:4]}); {fix}")
    for q, (norm, proj) in current.items():
        ref = saved[q]
        if len(ref) != 2:
            raise ValueError(f"{where}: residual fingerprint of {q!r} is {list(ref)!r}, expected [norm, projection]")
        ref_norm, ref_proj = float(ref[0]), float(ref[1])
        scale = max(abs(ref_norm), 1e-30)
        rel = max(abs(norm - ref_norm), abs(proj - ref_proj)) / scale
        if not rel <= rtol:  # also catches NaN
            raise ValueError(f"{where}: LoRA layer {q!r} has a frozen residual weight W_res that differs from the "
                             f"pool's by {rel:.3g} relative to its norm (tolerance {rtol:g}); {fix}")
