"""Meta-tuning: one pool member (AMT, Algorithm 1) or a clean baseline, with resumable checkpoints.

Per episode (``training_step``), for the member being trained with attack ``a`` (METHOD.md):

1. one forward of ``[support; query]`` at the current weights w (with graph): prototypes and clean
   query logits, reused by every attack step (detached) and by the APSV gradient;
2. APQ: PGD on the query images only, objective KL(p_clean ‖ p_adv) (``amt.attacks``);
3. APSV: ascend the loss at w on the member's LoRA factors (``amt.perturb``), in place, restored in
   ``finally``; no model copy;
4. loss at the perturbed weights, L = CE(clean queries) + λ_adv·KL(p_clean ‖ p_adv), backward;
5. restore the weights, then step SGD on the restored weights (SAM/AWP order).

Switches are parameters of the same code path: ``TrainConfig.apq`` (off: clean meta-tuning),
``PerturbConfig.enabled`` (APSV), ``TrainConfig.mode`` ("lora" or "full" = PMF), the LoRA init
(``LoRAConfig.init``), and the pool strategy (``PoolConfig.strategy``).

The model stays in eval mode throughout (the backbones here have no dropout, drop-path or batch
statistics, so train and eval modes compute the same function; PMF does the same).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from amt import distributed
from amt.attacks import adversarial_queries
from amt.config import AttackConfig, ConfigError, HeadConfig, PerturbConfig, PoolConfig, TrainConfig, to_dict
from amt.data.datasets import ImageDataset
from amt.data.episodes import Episode, EpisodeIndices, FixedSampler, load_episode
from amt.head import cosine_logits, prototypes
from amt.lora import adapter_parameters, adapter_state_dict, load_adapter_state_dict, mark_trainable, set_active_adapter
from amt.perturb import adversarial_weights

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"  # resumable training state of one member (torch.save; read with weights_only=True)
WEIGHTS_FILE = "weights.safetensors"  # the member's best weights (LoRA factors or full backbone) + scale
METRICS_FILE = "metrics.jsonl"


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, inconsistent resume); the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------------
# Schedule and attack choice
# ----------------------------------------------------------------------------------------------


def lr_at(episode: int, cfg: TrainConfig) -> float:
    """Learning rate of ``episode`` (0-based): linear warm-up, then cosine decay to ``min_lr``."""
    total = cfg.epochs * cfg.episodes_per_epoch
    warm = int(round(cfg.warmup_epochs * cfg.episodes_per_epoch))
    if episode < warm:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * episode / warm
    t = (episode - warm) / max(1, total - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def member_attack(pool: PoolConfig, member: int, generator: torch.Generator) -> AttackConfig:
    """The attack of one episode of pool member ``member`` under ``pool.strategy``.

    "separate": ε = eps[member]; "uniform": ε = mean(eps) for everyone; "random": ε drawn uniformly
    from ``eps`` every episode (from ``generator``). The step is ``step_ratio · ε``.
    """
    if pool.strategy == "separate":
        eps = pool.eps[member]
    elif pool.strategy == "uniform":
        eps = sum(pool.eps) / len(pool.eps)
    elif pool.strategy == "random":
        eps = pool.eps[int(torch.randint(len(pool.eps), (), generator=generator))]
    else:
        raise ConfigError(f"pool.strategy must be 'separate', 'uniform' or 'random', got {pool.strategy!r}")
    return dataclasses.replace(pool.attack, eps=eps, step_size=pool.step_ratio * eps)


# ----------------------------------------------------------------------------------------------
# One episode
# ----------------------------------------------------------------------------------------------


def kl_clean_adv(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean ‖ p_adv), batch mean over queries; gradients flow into both (TRADES, the authors' code)."""
    return F.kl_div(F.log_softmax(adv_logits, -1), F.log_softmax(clean_logits, -1),
                    reduction="batchmean", log_target=True)


@dataclass
class StepResult:
    loss: float
    ce: float
    kl: float
    acc: float  # clean query accuracy of this episode before the update, %


def _episode_loss(
    model: nn.Module, episode: Episode, adv_queries: torch.Tensor | None, scale: torch.Tensor, lambda_adv: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kl) with one forward of [support; query; adversarial query] at the current weights."""
    parts = [episode.support_images, episode.query_images] + ([adv_queries] if adv_queries is not None else [])
    feats = model(torch.cat(parts))
    n_s, n_q = len(episode.support_images), len(episode.query_images)
    protos = prototypes(feats[:n_s], episode.support_labels, episode.n_way)
    clean = cosine_logits(feats[n_s : n_s + n_q], protos, scale)
    ce = F.cross_entropy(clean, episode.query_labels)
    if adv_queries is None:
        return ce, ce, torch.zeros(())
    kl = kl_clean_adv(clean, cosine_logits(feats[n_s + n_q :], protos, scale))
    return ce + lambda_adv * kl, ce, kl


def training_step(
    model: nn.Module,
    episode: Episode,
    scale: torch.Tensor,
    apsv_params: list[nn.Parameter],
    attack: AttackConfig | None,
    perturb: PerturbConfig,
    lambda_adv: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, StepResult]:
    """Forward/backward of one episode; leaves the gradients in ``.grad`` (the caller steps the optimiser).

    Args:
        model: images [B, 3, H, W] in [0, 1] → features [B, D], with the trained member active.
        scale: the head's logit scale (a parameter when trained).
        apsv_params: tensors APSV perturbs (the member's LoRA factors); ignored when APSV is off.
        attack: this episode's query attack, or None for clean meta-tuning (APQ off).
    Returns the loss at the (perturbed) weights and a summary.
    """
    n_s = len(episode.support_images)
    feats = model(torch.cat([episode.support_images, episode.query_images]))
    protos = prototypes(feats[:n_s], episode.support_labels, episode.n_way)
    clean = cosine_logits(feats[n_s:], protos, scale)
    acc = 100.0 * float((clean.argmax(-1) == episode.query_labels).float().mean())
    adv_queries = None
    if attack is not None:
        fixed_protos, fixed_scale = protos.detach(), scale.detach()
        adv_queries = adversarial_queries(
            attack, lambda x: cosine_logits(model(x), fixed_protos, fixed_scale), episode.query_images,
            clean_logits=clean.detach(), generator=generator, model=model,
        )
    if perturb.enabled:
        # APSV gradient at w from the loss on the graph already built (plus the adversarial branch).
        if adv_queries is None:
            loss_w = F.cross_entropy(clean, episode.query_labels)
        else:
            adv = cosine_logits(model(adv_queries), protos, scale)
            loss_w = F.cross_entropy(clean, episode.query_labels) + lambda_adv * kl_clean_adv(clean, adv)
        with adversarial_weights(apsv_params, loss_w, perturb):
            loss, ce, kl = _episode_loss(model, episode, adv_queries, scale, lambda_adv)
            _check_finite(loss)
            loss.backward()
    else:
        if adv_queries is None:
            ce = F.cross_entropy(clean, episode.query_labels)
            loss, kl = ce, torch.zeros(())
        else:
            adv = cosine_logits(model(adv_queries), protos, scale)
            ce = F.cross_entropy(clean, episode.query_labels)
            kl = kl_clean_adv(clean, adv)
            loss = ce + lambda_adv * kl
        _check_finite(loss)
        loss.backward()
    loss = loss.detach()
    return loss, StepResult(float(loss), float(ce.detach()), float(kl.detach()), acc)


def _check_finite(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(f"loss is {loss.item()}; the last good checkpoint is kept. Lower train.lr or "
                            "perturb.eta, or check the data")


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def validation_tasks(dataset: ImageDataset, cfg: TrainConfig, seed: int) -> list[EpisodeIndices]:
    """Fixed, seeded validation episodes (same for every validation and every member)."""
    sampler = FixedSampler(dataset.indices_by_class(), cfg.n_way, cfg.n_shot, cfg.n_query,
                           torch.Generator().manual_seed(seed), dataset.name + " (validation)")
    return [sampler.sample() for _ in range(cfg.val_tasks)]


@torch.no_grad()
def validate(model: nn.Module, dataset: ImageDataset, tasks: list[EpisodeIndices]) -> float:
    """Mean clean query accuracy (%) of the ProtoNet on ``tasks`` with the current weights."""
    accs = []
    device = next(model.parameters()).device
    for idx in tasks:
        e = load_episode(dataset, idx).to(device)
        n_s = len(e.support_images)
        feats = model(torch.cat([e.support_images, e.query_images]))
        logits = cosine_logits(feats[n_s:], prototypes(feats[:n_s], e.support_labels, e.n_way))
        accs.append(float((logits.argmax(-1) == e.query_labels).float().mean()))
    return 100.0 * sum(accs) / max(1, len(accs))


# ----------------------------------------------------------------------------------------------
# One member, resumable
# ----------------------------------------------------------------------------------------------


@dataclass
class MemberSpec:
    """What to train: a LoRA member (``name`` of an injected adapter) or the full backbone (name=None)."""

    index: int  # position in the pool (seeds, ε under "separate")
    name: str | None  # adapter name; None in "full" mode
    out_dir: Path


def _trainable(model: nn.Module, spec: MemberSpec, cfg: TrainConfig) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(all trained params, the params APSV perturbs) for ``spec``; sets requires_grad accordingly."""
    if cfg.mode == "lora":
        if spec.name is None:
            raise ConfigError("train.mode='lora' needs a LoRA member name")
        params = mark_trainable(model, [spec.name])
        set_active_adapter(model, spec.name)
        return params, adapter_parameters(model, spec.name)
    if cfg.mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return [p for p in model.parameters()], []
    raise ConfigError(f"train.mode must be 'lora' or 'full', got {cfg.mode!r}")


def _weights(model: nn.Module, spec: MemberSpec, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """The member's trained tensors as a flat dict (LoRA factors or the full backbone) plus the scale."""
    if spec.name is not None:
        out = {f"lora.{k}": v.detach().cpu().clone() for k, v in adapter_state_dict(model, spec.name).items()}
    else:
        out = {f"backbone.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    out["head.scale"] = scale.detach().cpu().clone().reshape(1)
    return out


def load_member_weights(model: nn.Module, name: str | None, path: str | Path) -> torch.Tensor:
    """Load a member's weights file into ``model`` (adapter ``name``, or the full backbone); return its scale."""
    state = load_file(str(path))
    if name is not None:
        load_adapter_state_dict(model, name, {k[5:]: v for k, v in state.items() if k.startswith("lora.")})
    else:
        model.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")}, strict=True)
    return state["head.scale"].reshape(())


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def train_member(
    model: nn.Module,
    spec: MemberSpec,
    train_set: ImageDataset,
    val_set: ImageDataset,
    cfg: TrainConfig,
    pool: PoolConfig,
    perturb: PerturbConfig,
    head: HeadConfig,
    resume: bool = False,
    stop_after: int | None = None,
    on_episode: Callable[[int, StepResult], None] | None = None,
) -> dict:
    """Meta-tune one member; write ``weights.safetensors`` (best on validation), ``state.pt``, ``metrics.jsonl``.

    Args:
        model: the backbone (with the LoRA pool injected in "lora" mode); trained in place.
        train_set: source-domain training classes (with training transforms); val_set: validation classes.
        resume: continue from ``state.pt`` exactly (same RNG streams and episodes); without it an existing
            state is an error, so nothing already written is overwritten.
        stop_after: stop (after checkpointing) once this many episodes are done — for time-sliced jobs.
    Returns a summary dict (episodes, best validation accuracy, final metrics, seconds).
    """
    world, rank = distributed.world()
    main_rank = rank == 0
    if cfg.episodes_per_step < 1 or cfg.episodes_per_step % world:
        raise ConfigError(f"train.episodes_per_step={cfg.episodes_per_step} must be a positive multiple of the "
                          f"number of processes ({world})")
    if cfg.keep not in ("best", "last"):
        raise ConfigError(f"train.keep must be 'best' or 'last', got {cfg.keep!r}")
    if cfg.mode == "full" and perturb.enabled:
        raise ConfigError("APSV perturbs LoRA factors: set perturb.enabled=false with train.mode='full' (PMF)")
    out = spec.out_dir
    out.mkdir(parents=True, exist_ok=True)
    state_path, weights_path, metrics_path = out / STATE_FILE, out / WEIGHTS_FILE, out / METRICS_FILE
    if state_path.exists() and not resume:
        raise ConfigError(f"{out} already holds a training state; pass --resume to continue it, or choose "
                          "another output directory (nothing was overwritten)")
    total = cfg.epochs * cfg.episodes_per_epoch
    params, apsv_params = _trainable(model, spec, cfg)
    device = next(model.parameters()).device  # training runs where the model is
    scale = nn.Parameter(torch.tensor(float(head.scale), device=device), requires_grad=cfg.train_scale)
    opt = torch.optim.SGD(params + ([scale] if cfg.train_scale else []), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    seed = cfg.seed + spec.index
    episode_gen = torch.Generator().manual_seed(seed)
    sampler = FixedSampler(train_set.indices_by_class(), cfg.n_way, cfg.n_shot, cfg.n_query, episode_gen,
                           train_set.name + " (train)")
    tasks = validation_tasks(val_set, cfg, cfg.seed + 7919)
    start_episode, best, final, kept = 0, {"val_acc": -1.0, "episode": -1}, None, None
    setup = _setup(cfg, pool, perturb, head, spec)
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        _check_same_setup(state.get("setup", {}), setup, out)
        _restore(model, spec, scale, opt, state, episode_gen)
        start_episode, best, final, kept = int(state["episode"]), dict(state["best"]), state.get("final"), state.get("kept")
        if main_rank:
            _truncate_metrics(metrics_path, start_episode)
        log.info("%s: resumed at episode %d of %d", out.name, start_episode, total)
    elif main_rank and metrics_path.exists():
        metrics_path.unlink()
    model.eval()
    begin = time.perf_counter()
    last: StepResult | None = None
    end = total if stop_after is None else min(total, stop_after)
    bar = tqdm(range(start_episode, end), initial=start_episode, total=total, desc=out.name, dynamic_ncols=True,
               disable=not main_rank)
    for episode_idx in bar:
        lr = lr_at(episode_idx, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        # every rank draws every episode of the step (indices only) and trains on its share of them
        indices = [sampler.sample() for _ in range(cfg.episodes_per_step)]
        opt.zero_grad(set_to_none=True)
        results = []
        for j in range(rank, cfg.episodes_per_step, world):
            episode_seed = _episode_seed(seed, episode_idx, j)
            torch.manual_seed(episode_seed)  # the training transforms draw from the global generator
            episode = load_episode(train_set, indices[j]).to(device)
            gen = torch.Generator().manual_seed(episode_seed + 1)  # attack noise (and ε under "random")
            attack = member_attack(pool, spec.index, gen) if cfg.apq else None
            results.append(training_step(model, episode, scale, apsv_params, attack, perturb, cfg.lambda_adv, gen)[1])
        _average_gradients(params + [scale], cfg.episodes_per_step, world)
        opt.step()
        last = StepResult(*(sum(getattr(r, f.name) for r in results) / len(results)
                            for f in dataclasses.fields(StepResult)))
        done, final = episode_idx + 1, dataclasses.asdict(last)
        if not main_rank:
            continue
        if on_episode is not None:
            on_episode(done, last)
        bar.set_postfix(loss=f"{last.loss:.3f}", acc=f"{last.acc:.0f}", lr=f"{lr:.1e}",
                        eps_s=f"{(done - start_episode) / (time.perf_counter() - begin):.1f}")
        record = {"episode": done, "lr": lr, **dataclasses.asdict(last)}
        if done % cfg.val_every == 0 or done == total:
            record["val_acc"] = validate(model, val_set, tasks)
            if record["val_acc"] > best["val_acc"]:
                best = {"val_acc": record["val_acc"], "episode": done}
            if best["episode"] == done if cfg.keep == "best" else done == total:
                _atomic_safetensors(_weights(model, spec, scale), weights_path,
                                    {"episode": str(done), "val_acc": f"{record['val_acc']:.4f}"})
                kept = {"val_acc": record["val_acc"], "episode": done}
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if done % cfg.checkpoint_every == 0 or done == end:
            _atomic_save(_state(model, spec, scale, opt, done, best, final, kept, episode_gen, setup), state_path)
    bar.close()
    finished = end >= total
    if main_rank and finished and not weights_path.exists():  # no validation ran (tiny runs): keep the final weights
        _atomic_safetensors(_weights(model, spec, scale), weights_path, {"episode": str(end)})
        kept = {"val_acc": None, "episode": end}
    return {"episodes": end, "finished": finished, "best": best, "kept": kept,
            "final": final, "scale": float(scale.detach()),
            "seconds": time.perf_counter() - begin}


def _episode_seed(seed: int, step: int, j: int) -> int:
    """Seed of episode ``j`` of optimiser step ``step``: the same on every rank and in a single process."""
    return (seed * 1_000_003 + step * 1009 + j) & 0x7FFFFFFF


def _average_gradients(params: list[torch.Tensor], episodes: int, world: int) -> None:
    """Sum the gradients over ranks (all-reduce) and divide by the episodes of the step: every rank then holds
    the mean gradient of all the step's episodes, exactly what one process computing them all holds."""
    for p in params:
        if p.grad is None:
            continue
        if world > 1:
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
        p.grad.div_(episodes)


def _setup(cfg: TrainConfig, pool: PoolConfig, perturb: PerturbConfig, head: HeadConfig, spec: MemberSpec) -> dict:
    """What a resumed run must share with the run it continues (everything but the checkpoint cadence)."""
    flat = {}
    for section, value in (("train", cfg), ("pool", pool), ("perturb", perturb), ("head", head)):
        for key, v in to_dict(value).items():
            if (section, key) != ("train", "checkpoint_every"):
                flat[f"{section}.{key}"] = json.dumps(v)
    flat["member"] = json.dumps([spec.index, spec.name])
    return flat


def _check_same_setup(saved: dict, current: dict, where: Path) -> None:
    diff = [f"{k}: {saved.get(k)} -> {current.get(k)}" for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)]
    if diff:
        raise ConfigError(f"{where} was trained with another configuration ({'; '.join(diff[:6])}); resume with the "
                          "same settings, or train into another output directory")


def _state(model, spec, scale, opt, episode, best, final, kept, episode_gen, setup) -> dict:
    """Everything a resume needs; attack noise and training transforms are seeded per episode
    (:func:`_episode_seed`), so the episode sampler is the only random stream to save."""
    return {"episode": episode, "best": best, "final": final, "kept": kept, "setup": setup, "weights": _weights(model, spec, scale),
            "optimizer": opt.state_dict(), "episode_rng": episode_gen.get_state()}


def _restore(model, spec, scale, opt, state, episode_gen) -> None:
    weights = state["weights"]
    if spec.name is not None:
        load_adapter_state_dict(model, spec.name, {k[5:]: v for k, v in weights.items() if k.startswith("lora.")})
    else:
        model.load_state_dict({k[9:]: v for k, v in weights.items() if k.startswith("backbone.")}, strict=True)
    with torch.no_grad():
        scale.copy_(weights["head.scale"].reshape(()))
    opt.load_state_dict(state["optimizer"])
    episode_gen.set_state(state["episode_rng"])


def _truncate_metrics(path: Path, episode: int) -> None:
    """Drop metric lines written after the checkpoint being resumed (they will be written again)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["episode"] <= episode]
    path.write_text("".join(ln + "\n" for ln in lines))


def member_record(spec: MemberSpec, pool: PoolConfig, cfg: TrainConfig, summary: dict) -> dict:
    """The pool manifest's entry of one member."""
    attack = member_attack(pool, spec.index, torch.Generator().manual_seed(0)) if cfg.apq else None
    return {"index": spec.index, "name": spec.name, "dir": spec.out_dir.name,
            "attack": to_dict(attack) if attack is not None and pool.strategy != "random" else
            ({"strategy": "random", "eps": list(pool.eps)} if attack is not None else None),
            "seed": cfg.seed + spec.index, **summary}


# ----------------------------------------------------------------------------------------------
# The pool
# ----------------------------------------------------------------------------------------------

MANIFEST_FILE = "pool.json"


def member_names(pool: PoolConfig, cfg: TrainConfig) -> list[str]:
    """Adapter names of the pool: one member per ε with APQ on; a single member for clean meta-tuning
    (without attacks the members would differ only in their seed)."""
    if not pool.eps:
        raise ConfigError("pool.eps is empty: list at least one attack radius")
    return [f"member{i}" for i in range(len(pool.eps) if cfg.apq else 1)]


MEMBER_RECORD_FILE = "member.json"


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write_manifest(out_dir: Path, header: dict) -> dict:
    """(Re)write ``pool.json`` from ``header`` and every member's ``member.json`` (members may be trained by
    separate processes; each writes only its own record, and the manifest is assembled from all of them)."""
    members = [json.loads(p.read_text()) for p in sorted(out_dir.glob(f"member*/{MEMBER_RECORD_FILE}"))]
    manifest = {**header, "members": sorted(members, key=lambda m: m["index"])}
    _write_json(manifest, out_dir / MANIFEST_FILE)
    return manifest


def check_fingerprint(manifest: dict, fingerprint: str, where: Path) -> None:
    """A pool only goes onto the backbone it was trained from."""
    if manifest["backbone_fingerprint"] != fingerprint:
        raise ConfigError(
            f"{where} was trained from backbone {manifest['backbone_fingerprint']} but the configured backbone is "
            f"{fingerprint}; use the same backbone.arch/checkpoint as the pool, or train a new pool")


def load_pool(model: nn.Module, pool_dir: str | Path, fingerprint: str) -> list[str]:
    """Put the trained pool of ``pool_dir`` (``amt train --out``) onto ``model``; return the member names
    (none for a full-backbone run such as PMF, whose weights replace the backbone's).

    Checks the backbone fingerprint, injects the adapters with the pool's own LoRA settings and loads every
    member's ``weights.safetensors`` strictly. An unfinished or missing member is an error.
    """
    from amt.lora import inject_lora

    pool_dir = Path(pool_dir)
    path = pool_dir / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: train the pool first (amt train --out {pool_dir})")
    manifest = json.loads(path.read_text())
    check_fingerprint(manifest, fingerprint, pool_dir)
    members = manifest["members"]
    unfinished = [m["name"] or m["dir"] for m in members if not m.get("finished")]
    if not members or unfinished:
        raise ConfigError(f"{pool_dir}: members {unfinished or 'none'} are not finished; resume with "
                          f"`amt train --out {pool_dir} --resume`")
    if manifest["mode"] == "full":  # PMF: a meta-tuned backbone, no adapters
        load_member_weights(model, None, pool_dir / members[0]["dir"] / WEIGHTS_FILE)
        log.info("loaded the meta-tuned backbone of %s", pool_dir)
        return []
    lora = manifest["config"]["lora"]
    names = [m["name"] for m in sorted(members, key=lambda m: m["index"])]
    inject_lora(model.vit if hasattr(model, "vit") else model, tuple(lora["targets"]), names, lora["rank"],
                lora["scaling"], lora["init"])
    for name in names:
        load_member_weights(model, name, pool_dir / name / WEIGHTS_FILE)
    log.info("loaded pool %s: %s", pool_dir, names)
    return names
