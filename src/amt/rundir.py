"""The run directory: file names, atomic writes, a member's weights and training state, the pool manifest,
and loading a trained pool onto a backbone.

Layout written by ``amt train --out RUN`` (``amt evaluate``/``amt demo`` add results beside it)::

    RUN/config.yaml                the resolved configuration
    RUN/pool.json                  manifest: backbone fingerprint, W_res fingerprint, configuration, members
    RUN/member{i}/weights.safetensors   the member's kept weights (LoRA factors or full backbone) + its logit scale
    RUN/member{i}/state.pt         resumable training state (torch.save; read with weights_only=True)
    RUN/member{i}/metrics.jsonl    one JSON line per episode
    RUN/member{i}/member.json      the member's manifest entry (members may be trained by separate processes)
    RUN/results.json, results.md   evaluation results (``amt evaluate``); results.partial.json if interrupted

Every file is written through :func:`atomic_write` (temporary sibling, then ``os.replace``), so a run that
fails or is killed never leaves a half-written file in place of a good one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amt.config import ConfigError, to_yaml

if TYPE_CHECKING:  # torch is imported lazily: amt.report writes through this module without importing torch
    import torch
    from torch import nn

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "pool.json"
RESULTS_FILE = "results.json"
PARTIAL_RESULTS_FILE = "results.partial.json"  # what an interrupted evaluation finished (never replaces results.json)
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
MEMBER_RECORD_FILE = "member.json"


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path`` (``os.replace``), on an
    exception it is deleted and ``path`` is left as it was.

    Example: ``with atomic_write(p) as tmp: torch.save(obj, tmp)``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of ``path`` to fill; on success it replaces ``path`` (a folder
    already there is deleted first), on an exception it is deleted and ``path`` is left as it was."""
    import shutil

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


LOCK_FILE = ".amt.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def run_lock(run: str | Path, what: str) -> Iterator[None]:
    """Hold ``run/.amt.lock`` for the duration: a second writer of the same run directory fails at once with a
    ``ConfigError`` naming the holder (process id, host, start time, what it does). A lock left by a dead process
    on this host is taken over (with a warning). Only the first process of a torchrun job locks."""
    import socket
    import time

    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "what": what}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                log.warning("%s: taking over the lock of process %s, which is no longer running", run, holder["pid"])
                path.unlink(missing_ok=True)
                continue
            raise ConfigError(f"{run} is in use by process {holder.get('pid', '?')} on {holder.get('host', '?')} "
                              f"(started {holder.get('started', '?')}: {holder.get('what', '?')}); wait for it to "
                              f"finish, or use another --out. If no such process runs, delete {path}") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    else:  # pragma: no cover - two takeovers raced
        raise ConfigError(f"{run}: could not take the lock {path}; retry")
    try:
        yield
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
        except (OSError, json.JSONDecodeError):
            pass


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` if needed and make sure files can be written there (``ConfigError`` otherwise), so a run
    fails before its work rather than after it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".amt-write-check.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write into {folder} ({exc.strerror or exc}); choose a writable --out") from None


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=1))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a resolved configuration (a config dataclass) as YAML, atomically."""
    write_text(path, to_yaml(cfg))


# ----------------------------------------------------------------------------------------------
# One member: weights, training state, metrics
# ----------------------------------------------------------------------------------------------


def member_dir(run: Path, index: int) -> Path:
    """Folder of pool member ``index`` (0-based) in run directory ``run``."""
    return run / f"member{index}"


def member_tensors(model: nn.Module, name: str | None, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """A member's trained tensors as a flat CPU dict: ``lora.<layer>...`` (adapter ``name``) or
    ``backbone.<key>`` (the full backbone, ``name=None``), plus ``head.scale`` (shape ``[1]``)."""
    from amt.lora import adapter_state_dict

    if name is not None:
        out = {f"lora.{k}": v.detach().cpu().clone() for k, v in adapter_state_dict(model, name).items()}
    else:
        out = {f"backbone.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    out["head.scale"] = scale.detach().cpu().clone().reshape(1)
    return out


def load_member_tensors(model: nn.Module, name: str | None, tensors: dict[str, torch.Tensor],
                        where: str | Path = "member weights") -> float:
    """Load tensors of :func:`member_tensors` into ``model`` strictly (adapter ``name`` or the full backbone);
    return the member's trained logit scale. Non-finite values are refused (``ConfigError`` naming ``where``)."""
    import torch

    from amt.lora import load_adapter_state_dict

    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(f"{where}: tensors {bad[:4]} hold NaN or infinite values; a member trained with a "
                          "diverging loss cannot be used: retrain it (amt train ... --member I) with a lower lr")

    if name is not None:
        load_adapter_state_dict(model, name, {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
    else:
        model.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")}, strict=True)
    return float(tensors["head.scale"].reshape(()))


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a member's tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_weights(model: nn.Module, name: str | None, path: str | Path) -> float:
    """Load a member's ``weights.safetensors`` into ``model``; return its trained logit scale. A missing,
    truncated or damaged file is a ``ConfigError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot be read as safetensors ({exc}); the file is missing, incomplete or "
                          "damaged: restore it, or train the member again into a new --out") from exc
    return load_member_tensors(model, name, tensors, path)


def save_state(path: Path, state: dict) -> None:
    """Write a resumable training state (tensors, numbers, strings only), atomically."""
    import torch

    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict:
    """Read a training state without executing pickled code (``weights_only=True``). A state holding anything
    but tensors and plain values, or a truncated file, is a ``ConfigError`` naming the file — never a hint to
    load it unsafely."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(f"{path}: refused: it holds objects other than tensors and plain values, which amt never "
                          "loads (they could run code). Delete it and train the member again; a state written by "
                          "amt train holds none") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot be read ({type(exc).__name__}); the file is incomplete or damaged: "
                          "delete it to train the member from the start, or restore it") from None


def append_metrics(path: Path, record: dict) -> None:
    """Append one JSON line to a member's metrics log."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, episode: int) -> None:
    """Drop metric lines written after the checkpoint being resumed (they will be written again)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["episode"] <= episode]
    write_text(path, "".join(ln + "\n" for ln in lines))


# ----------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------


def read_json(path: Path, what: str) -> Any:
    """A JSON file amt wrote; an unreadable or damaged one is a ``ConfigError`` naming it and ``what`` it is."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: the {what} cannot be read ({exc}); the file is incomplete or damaged: restore "
                          "it, or re-create it (amt train --out RUN --resume writes the manifest again)") from None


def write_manifest(run: Path, header: dict) -> dict:
    """(Re)write ``pool.json`` from ``header`` and every member's ``member.json`` (members may be trained by
    separate processes; each writes only its own record, and the manifest is assembled from all of them)."""
    members = [read_json(p, "member record") for p in sorted(run.glob(f"member*/{MEMBER_RECORD_FILE}"))]
    manifest = {**header, "members": sorted(members, key=lambda m: m["index"])}
    write_json(run / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(run: Path) -> dict:
    """``run/pool.json``; a missing file is a :class:`ConfigError` saying how to make it."""
    path = run / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: train the pool first (amt train --out {run})")
    manifest = read_json(path, "pool manifest")
    if not isinstance(manifest, dict) or not {"backbone_fingerprint", "mode", "config", "members"} <= set(manifest):
        raise ConfigError(f"{path}: not a pool manifest written by amt train (keys backbone_fingerprint, mode, "
                          "config, members); re-create it with amt train --out RUN --resume")
    return manifest


def check_fingerprint(manifest: dict, fingerprint: str, where: Path) -> None:
    """A pool only goes onto the backbone it was trained from."""
    if manifest["backbone_fingerprint"] != fingerprint:
        raise ConfigError(
            f"{where} was trained from backbone {manifest['backbone_fingerprint']} but the configured backbone is "
            f"{fingerprint}; use the same backbone.arch/checkpoint as the pool, or train a new pool")


def member_names(n_eps: int, apq: bool, size: int = 0) -> list[str]:
    """Adapter names of a pool: one member per attack radius with APQ on (``size`` members when given: the
    "uniform"/"random" strategies, e.g. one module drawing ε from the pool); a single member for clean
    meta-tuning (without attacks the members would differ only in their seed)."""
    if n_eps < 1:
        raise ConfigError("pool.eps is empty: list at least one attack radius")
    return [f"member{i}" for i in range((size or n_eps) if apq else 1)]


# ----------------------------------------------------------------------------------------------
# Loading a pool
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedPool:
    """A trained run put onto a backbone by :func:`load_pool`."""

    names: tuple[str, ...]  # adapter names in pool order; () for a full-backbone run (PMF)
    scales: tuple[float, ...]  # each member's trained logit scale (one entry for a full-backbone run)
    # each member's training attack radius ε_i, pixel units (strategy "separate": pool.eps[i]; "uniform" and "random":
    # the mean of pool.eps); () when unknown (clean meta-tuning, full-backbone runs)
    eps: tuple[float, ...] = ()


def load_pool(model: nn.Module, run: str | Path, fingerprint: str) -> LoadedPool:
    """Put the trained run in ``run`` (``amt train --out``) onto ``model``.

    Checks, each failing with a message naming the problem and the fix: the backbone fingerprint; that every
    member the run's configuration lists is there and finished; and (LoRA pools) that the frozen residual
    weights W_res recomputed here by the SVD initialisation match the ones the pool was trained on. Then
    injects the adapters with the run's own LoRA settings and loads every member's weights strictly. A
    full-backbone run (PMF) replaces the backbone's weights instead.
    """
    from amt.lora import check_residual_fingerprint, inject_lora

    run = Path(run)
    manifest = read_manifest(run)
    check_fingerprint(manifest, fingerprint, run)
    cfg = manifest["config"]
    members = sorted(manifest["members"], key=lambda m: m["index"])
    expected = (member_names(len(cfg["pool"]["eps"]), cfg["train"]["apq"], cfg["pool"].get("size", 0))
                if manifest["mode"] != "full" else [None])
    missing = [n or "member0" for n in expected if n not in {m["name"] for m in members}]
    unfinished = [m["name"] or m["dir"] for m in members if not m.get("finished")]
    if missing or unfinished:
        raise ConfigError(f"{run}: member(s) {missing + unfinished} of the {len(expected)} in its configuration are "
                          f"missing or unfinished; train them with `amt train --out {run} --resume` "
                          f"(same --config/--set as the run)")
    vit = getattr(model, "vit", model)
    if manifest["mode"] == "full":  # PMF: a meta-tuned backbone, no adapters
        scale = load_weights(model, None, run / members[0]["dir"] / WEIGHTS_FILE)
        log.info("loaded the meta-tuned backbone of %s", run)
        return LoadedPool((), (scale,))
    names = [m["name"] for m in members]
    if manifest["mode"] in ("film", "adapter"):  # FiLM / Adapter pools (amt.peft_modules): identity-initialised
        from amt.config import PEFTConfig, from_dict
        from amt.peft_modules import inject_peft

        inject_peft(vit, manifest["mode"], names, from_dict(PEFTConfig, cfg.get("peft", {})))
    else:
        lora = cfg["lora"]
        inject_lora(vit, tuple(lora["targets"]), names, lora["rank"], lora["scaling"], lora["init"])
        if "residual_fingerprint" not in manifest:
            log.warning("%s was written before pools recorded their W_res fingerprint: cannot check that the frozen "
                        "weights match; retrain the pool to get the check", run)
        else:
            try:
                check_residual_fingerprint(vit, manifest["residual_fingerprint"], str(run))
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
    scales = tuple(load_weights(model, name, run / name / WEIGHTS_FILE) for name in names)
    log.info("loaded pool %s: %s (logit scales %s)", run, names, ", ".join(f"{s:.2f}" for s in scales))
    return LoadedPool(tuple(names), scales, _member_eps(cfg, len(names)))


def _member_eps(cfg: dict, n_members: int) -> tuple[float, ...]:
    """Each member's training radius from a pool's recorded config (:attr:`LoadedPool.eps`): none for clean
    meta-tuning; ``pool.eps[i]`` under "separate"; the mean of ``pool.eps`` under "uniform" and "random"."""
    if not cfg["train"]["apq"]:
        return ()
    eps = [float(e) for e in cfg["pool"]["eps"]]
    if cfg["pool"].get("strategy", "separate") == "separate":
        return tuple(eps)
    return (sum(eps) / len(eps),) * n_members


# ----------------------------------------------------------------------------------------------
# A pool shipped with the package
# ----------------------------------------------------------------------------------------------

EXPORT_FILE = "export.json"  # sha256 of every file of an exported pool, and where it came from
_EXPORTED = (MANIFEST_FILE, CONFIG_FILE, f"member*/{WEIGHTS_FILE}", f"member*/{MEMBER_RECORD_FILE}",
             f"member*/{METRICS_FILE}")  # what a pool needs to load and to be read; no training state


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_pool(run: str | Path, dest: str | Path, command: str = "") -> dict:
    """Copy the finished pool in ``run`` to ``dest`` without its training state (``state.pt``), and record the
    sha256 of every copied file in ``dest/export.json``. ``dest`` must not exist or hold only an earlier export."""
    import shutil

    run, dest = Path(run), Path(dest)
    manifest = read_manifest(run)
    unfinished = [m["name"] for m in manifest["members"] if not m.get("finished")]
    if unfinished:
        raise ConfigError(f"{run}: member(s) {unfinished} are unfinished; finish them (amt train --resume) first")
    if dest.exists() and not (dest / EXPORT_FILE).is_file():
        raise ConfigError(f"{dest} exists and is not an exported pool; choose a new folder")
    files = sorted({p.relative_to(run) for pattern in _EXPORTED for p in run.glob(pattern)})
    with atomic_dir(dest) as tmp:
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run / rel, tmp / rel)
        record = {"source": str(run), "command": command, "files": {str(rel): _sha256(tmp / rel) for rel in files}}
        write_json(tmp / EXPORT_FILE, record)
    log.info("exported %s to %s (%d files)", run, dest, len(files))
    return record


def check_export(dest: str | Path) -> None:
    """Raise :class:`ConfigError` unless every file listed in ``dest/export.json`` is there with its sha256."""
    dest = Path(dest)
    record = read_json(dest / EXPORT_FILE, "pool export record")
    bad = [rel for rel, digest in record["files"].items()
           if not (dest / rel).is_file() or _sha256(dest / rel) != digest]
    if bad:
        raise ConfigError(f"{dest}: {bad} are missing or differ from the exported pool ({EXPORT_FILE}); reinstall "
                          "the package or re-export the pool (make pool)")
