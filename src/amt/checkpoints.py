"""Strict loading of local checkpoints (DINO, iBOT, DeiT, timm, safetensors); fingerprints.

:func:`load_checkpoint` puts the weights of a local file into a timm ``VisionTransformer`` built by
:func:`amt.backbone.build_vit` (nothing is ever downloaded). It understands the forms people actually
have (bare DINO/timm state dicts, DINO/iBOT training checkpoints, DeiT ``{"model": ...}`` files,
safetensors), resizes position embeddings to the model's grid, and is **strict**: a key that is missing,
unexpected or of the wrong shape is a :class:`CheckpointError`, never a silently random model. Pickles
are read with ``weights_only=True`` only.

:func:`save_backbone` writes a backbone's ViT weights as safetensors (read back by :func:`load_checkpoint`);
:func:`fingerprint` is a short hash of a state dict, recorded with pools and results to tie them to the
backbone they were computed with.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

logger = logging.getLogger(__name__)

# Wrapper prefixes removed from the *start* of checkpoint keys (repeatedly: "module.backbone.x" -> "x").
# No timm VisionTransformer key starts with one of these, so stripping never damages a real key.
STRIP_PREFIXES = ("module.", "backbone.", "encoder.")
# Training-only entries dropped when the model has no such key: classifier / DINO projection heads,
# DeiT's distillation head, iBOT's learned mask token.
DROP_PREFIXES = ("head.", "head_dist.")
DROP_KEYS = ("masked_embed",)
# Sub-dicts tried, in order, when checkpoint_key is "auto" and the file is not already a state dict.
AUTO_KEYS = ("teacher", "model", "state_dict", "student", "model_ema", "state_dict_ema")
MAX_LISTED = 12  # key names shown in an error before "... and N more"


class CheckpointError(ValueError):
    """A checkpoint file cannot be loaded into the model; the message names the keys and the fix."""


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length, then a JSON object."""
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n <= path.stat().st_size - 8


def _safe_torch_load(path: Path) -> object:
    """``torch.load(weights_only=True)`` with ``argparse.Namespace`` (DINO/iBOT/timm ``args``) allowed."""
    if hasattr(torch.serialization, "safe_globals"):
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    torch.serialization.add_safe_globals([argparse.Namespace])  # torch < 2.5
    return torch.load(path, map_location="cpu", weights_only=True)


def _first_line(e: Exception) -> str:
    """The informative part of a (possibly long, multi-line) loader error."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text, flags=re.DOTALL)
    if m and m.group(1).strip():
        text = m.group(1)
    text = " ".join(text.split())
    return text[:300] or type(e).__name__


def read_checkpoint(path: str | Path) -> dict:
    """Read a local ``.safetensors`` or PyTorch pickle file without executing code from it.

    Returns the top-level object (a dict). Raises ``FileNotFoundError`` for a missing file and
    :class:`CheckpointError` for an empty, unreadable or unsafe file (a pickle referencing a class
    other than tensors, containers and ``argparse.Namespace`` is refused, never loaded unsafely).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist; check backbone.checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty (0 bytes); re-download or re-save it")
    if _looks_like_safetensors(path):
        try:
            obj: object = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    else:
        try:
            obj = _safe_torch_load(path)
        except pickle.UnpicklingError as e:
            match = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
            if match:
                raise CheckpointError(
                    f"{path} contains the pickled object {match.group(1)!r}, which amt refuses to unpickle (that "
                    f"could run code from the file). Re-save just the weights in an environment you trust, e.g. "
                    f"safetensors.torch.save_file(model.state_dict(), 'weights.safetensors'), and point "
                    f"backbone.checkpoint at that file"
                ) from e
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint readable with weights_only=True ({_first_line(e)}); re-save "
                f"the weights with safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')"
            ) from e
        except Exception as e:
            raise CheckpointError(
                f"{path} is not a PyTorch (.pth/.pt) or safetensors checkpoint ({type(e).__name__}: {_first_line(e)})"
            ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}; expected a dict (a state dict or a checkpoint)")
    if not obj:
        raise CheckpointError(f"{path} holds an empty dict: no weights to load")
    return obj


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def select_state_dict(obj: Mapping, key: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """Pick the weights inside a checkpoint; returns ``(state_dict, the key used)``.

    ``key``: ``"none"`` = the top level is the state dict; ``"auto"`` = the top level if it holds only
    tensors, else the first of :data:`AUTO_KEYS` present (DINO/iBOT ``teacher`` first); any other value
    names a top-level entry (``"teacher"``, ``"student"``, ``"model"``, ``"state_dict"``, ...).
    """
    top = sorted(map(str, obj))
    if key == "none":
        chosen, sd = "none", obj
    elif key == "auto":
        if _is_state_dict(obj):
            chosen, sd = "none", obj
        else:
            found = [k for k in AUTO_KEYS if isinstance(obj.get(k), Mapping) and _is_state_dict(obj[k])]
            if not found:
                raise CheckpointError(
                    f"checkpoint_key 'auto' found no state dict: the top level holds {_listing(top)} and none of "
                    f"{list(AUTO_KEYS)} is a dict of tensors; set backbone.checkpoint_key to the entry holding "
                    f"the weights"
                )
            chosen, sd = found[0], obj[found[0]]
    else:
        if key not in obj:
            raise CheckpointError(
                f"checkpoint_key {key!r} is not in the checkpoint; its top-level entries are {_listing(top)} "
                f"(use one of them, 'auto' or 'none')"
            )
        chosen, sd = key, obj[key]
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"checkpoint entry {key!r} is a {type(sd).__name__}, not a dict of weights")
    bad = [f"{k} ({type(v).__name__})" for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        subs = [k for k in top if isinstance(obj.get(k), Mapping)]
        raise CheckpointError(
            f"checkpoint_key {chosen!r} selects entries that are not tensors: {_listing(bad)}; this looks like a "
            f"training checkpoint, so set backbone.checkpoint_key to one of its sub-dicts {subs}"
        )
    return dict(sd), chosen


# ----------------------------------------------------------------------------------------------
# Mapping and strict loading
# ----------------------------------------------------------------------------------------------


def _listing(names: list[str]) -> str:
    """``[a, b, c] ... and N more``: a bounded list for error messages."""
    shown = ", ".join(names[:MAX_LISTED])
    more = f" ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return f"[{shown}]{more}"


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in STRIP_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def remap_state_dict(sd: Mapping[str, torch.Tensor], model_keys: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip wrapper prefixes from key starts and drop training-only heads the model lacks.

    Returns ``(mapped state dict, dropped original keys)``. Two keys mapping to one name is an error.
    """
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    dropped: list[str] = []
    for k, v in sd.items():
        name = _strip_prefixes(k)
        if name not in model_keys and (name.startswith(DROP_PREFIXES) or name in DROP_KEYS):
            dropped.append(k)
            continue
        if name in out:
            raise CheckpointError(
                f"checkpoint keys {origin[name]!r} and {k!r} both map to {name!r} after removing prefixes "
                f"{list(STRIP_PREFIXES)}; the file mixes two models, so set backbone.checkpoint_key to pick one"
            )
        out[name], origin[name] = v, k
    return out, dropped


def _resize_pos_embed(sd: dict[str, torch.Tensor], vit: VisionTransformer) -> tuple[int, int] | None:
    """Resample ``sd['pos_embed']`` (bicubic, prefix tokens kept) to the model's token grid, in place.

    Returns (old, new) grid sides when resized, else None. Embedding-dim mismatches are left for the
    shape check to report.
    """
    if "pos_embed" not in sd or vit.pos_embed is None:
        return None
    src, dst = sd["pos_embed"], vit.pos_embed
    if src.ndim != 3 or src.shape[-1] != dst.shape[-1] or src.shape[1] == dst.shape[1]:
        return None
    n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    side = math.isqrt(max(src.shape[1] - n_prefix, 0))
    if side * side != src.shape[1] - n_prefix or side == 0:
        raise CheckpointError(
            f"checkpoint pos_embed has {src.shape[1]} tokens, which is not {n_prefix} prefix token(s) plus a square "
            f"grid; the checkpoint's class/register tokens differ from arch's, so check backbone.arch"
        )
    grid = tuple(vit.patch_embed.grid_size)
    sd["pos_embed"] = resample_abs_pos_embed(
        src, new_size=list(grid), old_size=[side, side], num_prefix_tokens=n_prefix
    )
    logger.info("resized pos_embed from a %dx%d to a %dx%d token grid", side, side, grid[0], grid[1])
    return side, grid[0]


def _describe(shapes: Mapping[str, torch.Size]) -> str:
    """Depth / width / patch of a ViT state dict, for hints."""
    depth = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    dim = shapes["blocks.0.norm1.weight"][0] if "blocks.0.norm1.weight" in shapes else "?"
    patch = shapes.get("patch_embed.proj.weight")
    patch_s = f", patch {patch[-1]}" if patch is not None and len(patch) == 4 else ""
    return f"depth {depth}, embed_dim {dim}{patch_s}"


def _hint(sd: Mapping[str, torch.Tensor], vit: VisionTransformer, missing: list[str], chosen: str) -> str:
    have = {k: v.shape for k, v in sd.items()}
    want = {k: v.shape for k, v in vit.state_dict().items()}
    if len(missing) == len(want):
        return (
            f"no key matched: the selected weights (checkpoint_key {chosen!r}) are not a ViT backbone; "
            f"choose another backbone.checkpoint_key (teacher, student, model, state_dict, none) or another file"
        )
    extra = ""
    if "dist_token" in sd and "dist_token" not in want:
        extra = (
            " The checkpoint is a distilled DeiT (dist_token): use a distilled arch such as "
            "deit_small_distilled_patch16_224."
        )
    return (
        f"checkpoint looks like a ViT with {_describe(have)}; the model has {_describe(want)}: "
        f"set backbone.arch to the checkpoint's architecture (or fix backbone.checkpoint_key).{extra}"
    )


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What :func:`load_checkpoint` did (for logs and result files)."""

    path: str  # file read
    key: str  # sub-dict used ("none" = top level)
    n_tensors: int  # tensors loaded into the model
    dropped: tuple[str, ...]  # checkpoint keys discarded (heads, mask token)
    pos_embed_resized: tuple[int, int] | None  # (old, new) token-grid side, None if unchanged


def load_checkpoint(vit: VisionTransformer, path: str | Path, key: str = "auto") -> LoadedCheckpoint:
    """Load a local checkpoint into ``vit`` strictly; see the module docstring for supported forms.

    Raises ``FileNotFoundError`` if ``path`` is missing and :class:`CheckpointError` if the file is
    empty/unsafe/unsupported or if, after prefix stripping and head dropping, any model key is
    missing, any checkpoint key is unexpected, or any shape differs (position embeddings excepted:
    they are resampled to the model's grid).
    """
    obj = read_checkpoint(path)
    try:
        raw, chosen = select_state_dict(obj, key)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    want = vit.state_dict()
    sd, dropped = remap_state_dict(raw, set(want))
    missing = [k for k in want if k not in sd]  # model order: cls_token, pos_embed, patch_embed, blocks...
    unexpected = [k for k in sd if k not in want]
    if missing or unexpected:
        parts = [f"missing {len(missing)} key(s) {_listing(missing)}"] if missing else []
        parts += [f"unexpected {len(unexpected)} key(s) {_listing(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{path} (checkpoint_key {chosen!r}) does not fit the model: {'; '.join(parts)}. "
                              f"{_hint(sd, vit, missing, chosen)}")
    resized = _resize_pos_embed(sd, vit)
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
             for k, v in want.items() if sd[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{path} (checkpoint_key {chosen!r}) has {len(wrong)} shape mismatch(es): "
                              f"{_listing(wrong)}. {_hint(sd, vit, [], chosen)}")
    vit.load_state_dict(sd, strict=True)
    logger.info("loaded %d tensors from %s (checkpoint_key %r, dropped %d: %s)",
                len(sd), path, chosen, len(dropped), _listing(dropped) if dropped else "none")
    return LoadedCheckpoint(str(path), chosen, len(sd), tuple(dropped), resized)


# ----------------------------------------------------------------------------------------------
# Saving and identity
# ----------------------------------------------------------------------------------------------


def _vit_of(module: nn.Module) -> nn.Module:
    """The ViT of an :class:`amt.backbone.Backbone` (its ``vit`` submodule), or ``module`` itself."""
    vit = getattr(module, "vit", None)
    return vit if isinstance(vit, nn.Module) else module


def save_backbone(module: nn.Module, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write the ViT weights (not mean/std) of an :class:`amt.backbone.Backbone` or ViT as safetensors.

    Keys are timm's bare names, so :func:`load_checkpoint` reads the file back with ``key="auto"``.
    The header metadata holds ``fingerprint`` (of the ViT) plus any ``metadata`` strings given.
    """
    vit = _vit_of(module)
    state = {k: v.detach().to("cpu").contiguous() for k, v in vit.state_dict().items()}
    meta = {"format": "pt", "fingerprint": fingerprint(state), **{str(k): str(v) for k, v in (metadata or {}).items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(path), metadata=meta)
    logger.info("saved backbone weights (%d tensors) to %s", len(state), path)


def fingerprint(module: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Short stable hash of a module's state dict (or of a state dict): 16 hex characters.

    sha256 over the entries in sorted-name order, each contributing its name, dtype, shape and raw
    bytes; changing any single element changes the fingerprint. Note an :class:`amt.backbone.Backbone` and
    its ``.vit`` differ (the Backbone adds the ``vit.`` prefix and the mean/std buffers).
    """
    state = module.state_dict() if isinstance(module, nn.Module) else module
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
