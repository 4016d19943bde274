"""Meta-tuning: one pool member (AMT, Algorithm 1) or a clean baseline, with resumable checkpoints.

Per episode (``training_step``), for the member being trained with attack ``a`` (docs/method.md, "Meta-tuning"):

1. one forward of ``[support; query]`` at the current weights w (with graph): prototypes and clean
   query logits, reused by every attack step (detached) and by the APSV gradient;
2. APQ: PGD on the query images only, objective KL(p_clean ‖ p_adv) (``amt.attacks``);
3. APSV: ascend the loss at w on the member's LoRA factors (``amt.perturb``), in place, restored in
   ``finally``; no model copy;
4. loss at the perturbed weights, L = CE(clean queries) + λ_adv·KL(p_clean ‖ p_adv) (:func:`meta_loss`), backward;
5. restore the weights, then step SGD on the restored weights (SAM/AWP order).

Switches are parameters of the same code path: ``TrainConfig.apq`` (off: clean meta-tuning),
``TrainConfig.apsv`` (APSV), ``TrainConfig.mode`` ("lora", "full" = PMF, or the "film"/"adapter" modules of
:mod:`amt.peft_modules`), ``TrainConfig.augment`` (RandConv/ALT queries in the attacked queries' place,
:mod:`amt.query_augment`; or StyleAdv's own loss, :mod:`amt.styleadv`), the LoRA init (``LoRAConfig.init``),
and the pool strategy (``PoolConfig.strategy``).

The model stays in eval mode throughout (the backbones here have no dropout, drop-path or batch
statistics, so train and eval modes compute the same function; PMF does the same).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from amt import distributed
from amt.attacks import adversarial_queries
from amt.config import AttackConfig, ConfigError, HeadConfig, PerturbConfig, PoolConfig, TrainConfig, to_dict
from amt.data.base import ImageDataset
from amt.data.episodes import Episode, FixedSampler, load_episode
from amt.head import cosine_logits, prototypes
from amt.lora import adapter_parameters, mark_trainable, set_active_adapter
from amt.perturb import adversarial_weights
from amt.query_augment import QueryAugment, query_augment
from amt.rundir import (
    METRICS_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    append_metrics,
    load_member_tensors,
    load_state,
    member_tensors,
    save_state,
    save_weights,
    truncate_metrics,
)
from amt.styleadv import styleadv_loss
from amt.validation import validate, validation_tasks

log = logging.getLogger(__name__)


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


def member_attack(pool: PoolConfig, index: int, generator: torch.Generator) -> AttackConfig:
    """The attack of one episode of pool member ``index`` (0-based) under ``pool.strategy``.

    "separate": ε = eps[index]; "uniform": ε = mean(eps) for everyone; "random": ε drawn uniformly
    from ``eps`` every episode (from ``generator``). The step is ``step_ratio · ε``.
    """
    if pool.strategy == "separate":
        eps = pool.eps[index]
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
    """KL(p_clean ‖ p_adv) = Σ_c p_clean,c · (log p_clean,c − log p_adv,c), mean over queries; gradients flow
    into both (TRADES, the authors' code). Logits ``[Q, N]`` → scalar."""
    return F.kl_div(F.log_softmax(adv_logits, -1), F.log_softmax(clean_logits, -1),
                    reduction="batchmean", log_target=True)


def meta_loss(clean_logits: torch.Tensor, adv_logits: torch.Tensor | None, labels: torch.Tensor,
              lambda_adv: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The meta-tuning loss L = CE(clean queries) + λ_adv · KL(p_clean ‖ p_adv) (docs/method.md, step 4).

    Args:
        clean_logits: ``[Q, N]`` logits of the clean queries; adv_logits: of the attacked queries, or None
            (clean meta-tuning: L = CE).
    Returns ``(L, CE, KL)``; KL is a zero scalar without adversarial logits.
    """
    ce = F.cross_entropy(clean_logits, labels)
    if adv_logits is None:
        return ce, ce, torch.zeros((), device=ce.device)
    kl = kl_clean_adv(clean_logits, adv_logits)
    return ce + lambda_adv * kl, ce, kl


@dataclass
class StepResult:
    loss: float
    ce: float
    kl: float  # KL(p_clean ‖ p_adv); StyleAdv: the CE of the style-attacked episode
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
    adv = cosine_logits(feats[n_s + n_q :], protos, scale) if adv_queries is not None else None
    return meta_loss(clean, adv, episode.query_labels, lambda_adv)


def training_step(
    model: nn.Module, episode: Episode, scale: torch.Tensor, apsv_params: list[nn.Parameter] | None,
    attack: AttackConfig | None, perturb: PerturbConfig, lambda_adv: float, generator: torch.Generator | None = None,
    augment: QueryAugment | None = None,
) -> tuple[torch.Tensor, StepResult]:
    """Forward/backward of one episode; leaves the gradients in ``.grad`` (the caller steps the optimiser).

    Args:
        model: images [B, 3, H, W] in [0, 1] → features [B, D], with the trained member active.
        scale: the head's logit scale (a parameter when trained).
        apsv_params: tensors APSV perturbs (the member's LoRA factors), or None with APSV off.
        attack: this episode's query attack, or None for clean meta-tuning (APQ off). Only the queries are
            attacked; the support images are used as given.
        augment: with APQ off, an augmentation (:mod:`amt.query_augment`) whose queries replace the attacked ones.
    Returns the loss at the (perturbed) weights and a summary.
    """
    n_s = len(episode.support_images)
    feats = model(torch.cat([episode.support_images, episode.query_images]))
    protos = prototypes(feats[:n_s], episode.support_labels, episode.n_way)
    clean = cosine_logits(feats[n_s:], protos, scale)
    acc = 100.0 * float((clean.argmax(-1) == episode.query_labels).float().mean())
    adv_queries, adv = None, None
    if attack is not None or augment is not None:
        fixed_protos, fixed_scale = protos.detach(), scale.detach()
        logits_fn = lambda x: cosine_logits(model(x), fixed_protos, fixed_scale)  # noqa: E731
        adv_queries = (augment(logits_fn, episode.query_images, clean.detach(), generator) if attack is None else
                       adversarial_queries(attack, logits_fn, episode.query_images, clean_logits=clean.detach(),
                                           generator=generator, model=model))
        adv = cosine_logits(model(adv_queries), protos, scale)
    loss, ce, kl = meta_loss(clean, adv, episode.query_labels, lambda_adv)  # at w, on the graph already built
    if apsv_params is not None:
        with adversarial_weights(apsv_params, loss, perturb):  # APSV: ascend from the loss at w, restore after
            loss, ce, kl = _episode_loss(model, episode, adv_queries, scale, lambda_adv)
            _check_finite(loss)
            loss.backward()
    else:
        _check_finite(loss)
        loss.backward()
    loss = loss.detach()
    return loss, StepResult(float(loss), float(ce.detach()), float(kl.detach()), acc)


def _check_finite(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(f"loss is {loss.item()}; the last good checkpoint is kept. Lower train.lr or "
                            "perturb.eta, or check the data")


# ----------------------------------------------------------------------------------------------
# One member, resumable
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberSpec:
    """What to train: a LoRA member (``name`` of an injected adapter) or the full backbone (name=None)."""

    index: int  # 0-based position in the pool (seeds; ε under "separate")
    name: str | None  # adapter name; None in "full" mode
    out_dir: Path


@dataclass(frozen=True)
class MetaTuning:
    """The sub-configurations one member is meta-tuned with."""

    train: TrainConfig
    pool: PoolConfig
    perturb: PerturbConfig
    head: HeadConfig


def train_member(
    model: nn.Module,
    spec: MemberSpec,
    train_set: ImageDataset,
    val_set: ImageDataset,
    settings: MetaTuning,
    resume: bool = False,
    stop_after: int | None = None,
    on_episode: Callable[[int, StepResult], None] | None = None,
) -> dict:
    """Meta-tune one member; write ``weights.safetensors`` (kept weights), ``state.pt``, ``metrics.jsonl``.

    Args:
        model: the backbone (with the LoRA pool injected in "lora" mode); trained in place.
        train_set: source-domain training classes (with training transforms); val_set: validation classes.
        resume: continue from ``state.pt`` exactly (same RNG streams and episodes); without it an existing
            state is an error, so nothing already written is overwritten.
        stop_after: stop (after checkpointing) once this many episodes are done — for time-sliced jobs.
        on_episode: called with (episodes done, step summary) after every optimiser step (first process only).
    Returns a summary dict (episodes, finished, best and kept validation accuracy, final metrics, scale, seconds).
    """
    run = _MemberRun(model, spec, train_set, val_set, settings)
    run.start(resume)
    end = run.total if stop_after is None else min(run.total, stop_after)
    bar = tqdm(range(run.episode, end), initial=run.episode, total=run.total, desc=spec.out_dir.name,
               dynamic_ncols=True, disable=not run.main)
    try:
        for episode in bar:
            result, lr = run.step(episode)
            if run.main:
                if on_episode is not None:
                    on_episode(episode + 1, result)
                run.record(episode + 1, result, lr)
                bar.set_postfix(loss=f"{result.loss:.3f}", acc=f"{result.acc:.0f}", lr=f"{lr:.1e}",
                                eps_s=f"{run.speed(episode + 1):.1f}")
                if (episode + 1) % settings.train.checkpoint_every == 0 or episode + 1 == end:
                    run.checkpoint(episode + 1)
    except KeyboardInterrupt:
        if run.main and run.recorded == run.episode > 0:  # the weights are those of the last logged episode
            run.checkpoint(run.episode)
            log.warning("%s: interrupted; checkpoint written at episode %d (continue with --resume)",
                        spec.out_dir.name, run.episode)
        raise
    finally:
        bar.close()
    return run.finish(end)


class _MemberRun:
    """The state of one member's training run: model, optimiser, episode stream, progress, files."""

    def __init__(self, model: nn.Module, spec: MemberSpec, train_set: ImageDataset, val_set: ImageDataset,
                 settings: MetaTuning) -> None:
        cfg = settings.train
        self.world, self.rank = distributed.world()
        self.main = self.rank == 0
        _check_settings(cfg, self.world)
        self.model, self.spec, self.settings, self.train_set, self.val_set = model, spec, settings, train_set, val_set
        self.total = cfg.epochs * cfg.episodes_per_epoch
        self.params, self.apsv_params = _trainable(model, spec, cfg)
        self.device = next(model.parameters()).device  # training runs where the model is
        self.scale = nn.Parameter(torch.tensor(float(settings.head.scale), device=self.device),
                                  requires_grad=cfg.train_scale)
        self.opt = torch.optim.SGD(self.params + ([self.scale] if cfg.train_scale else []), lr=cfg.lr,
                                   momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.seed = cfg.seed + spec.index
        self.episode_gen = torch.Generator().manual_seed(self.seed)
        self.sampler = FixedSampler(train_set.indices_by_class(), cfg.n_way, cfg.n_shot, cfg.n_query,
                                    self.episode_gen, train_set.name + " (train)")
        self.val_tasks = validation_tasks(val_set, cfg, cfg.seed + 7919)
        self.setup = _setup(settings, spec)
        self.augment = query_augment(cfg)
        self.episode, self.best, self.final, self.kept = 0, {"val_acc": -1.0, "episode": -1}, None, None
        self.recorded = 0  # the last episode whose metrics line is written
        self.earlier_seconds = 0.0  # training seconds of the processes this run resumed from
        out = spec.out_dir
        self.state_path, self.weights_path, self.metrics_path = out / STATE_FILE, out / WEIGHTS_FILE, out / METRICS_FILE

    def start(self, resume: bool) -> None:
        """Create the member folder, or resume from its state; an existing state without ``resume`` is an error."""
        out = self.spec.out_dir
        out.mkdir(parents=True, exist_ok=True)
        if self.state_path.exists() and not resume:
            raise ConfigError(f"{out} already holds a training state; pass --resume to continue it, or choose "
                              "another output directory (nothing was overwritten)")
        if resume and self.state_path.exists():
            state = load_state(self.state_path)
            _check_same_setup(state.get("setup", {}), self.setup, out)
            self.restore(state)
            if self.main:
                truncate_metrics(self.metrics_path, self.episode)
            log.info("%s: resumed at episode %d of %d", out.name, self.episode, self.total)
        elif self.main and self.metrics_path.exists():
            self.metrics_path.unlink()
        self.model.eval()
        self.started_at, self.first_episode = time.perf_counter(), self.episode

    def step(self, episode: int) -> tuple[StepResult, float]:
        """One optimiser step over ``episodes_per_step`` episodes (this process's share); (mean summary, lr)."""
        cfg = self.settings.train
        lr = lr_at(episode, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        # every rank draws every episode of the step (indices only) and trains on its share of them
        indices = [self.sampler.sample() for _ in range(cfg.episodes_per_step)]
        self.opt.zero_grad(set_to_none=True)
        results = []
        for j in range(self.rank, cfg.episodes_per_step, self.world):
            episode_seed = _episode_seed(self.seed, episode, j)
            torch.manual_seed(episode_seed)  # the training transforms draw from the global generator
            batch = load_episode(self.train_set, indices[j]).to(self.device)
            gen = torch.Generator().manual_seed(episode_seed + 1)  # attack noise (and ε under "random")
            if cfg.augment == "styleadv":  # its own loss (amt.styleadv); the style CE goes in the KL column
                loss, ce, style_ce, acc = styleadv_loss(self.model, batch, self.scale, cfg.styleadv, gen)
                _check_finite(loss)
                loss.backward()
                results.append(StepResult(float(loss.detach()), ce, style_ce, acc))
                continue
            attack = member_attack(self.settings.pool, self.spec.index, gen) if cfg.apq else None
            results.append(training_step(self.model, batch, self.scale, self.apsv_params, attack,
                                         self.settings.perturb, cfg.lambda_adv, gen, self.augment)[1])
        _average_gradients(self.params + [self.scale], cfg.episodes_per_step, self.world)
        self.opt.step()
        self.episode = episode + 1
        mean = StepResult(*(sum(getattr(r, f.name) for r in results) / len(results)
                            for f in dataclasses.fields(StepResult)))
        self.final = dataclasses.asdict(mean)
        return mean, lr

    def record(self, done: int, result: StepResult, lr: float) -> None:
        """Log the episode; validate on schedule and write the kept weights ("best" or "last")."""
        cfg = self.settings.train
        record = {"episode": done, "lr": lr, **dataclasses.asdict(result)}
        if done % cfg.val_every == 0 or done == self.total:
            record["val_acc"] = validate(self.model, self.val_set, self.val_tasks)
            if record["val_acc"] > self.best["val_acc"]:
                self.best = {"val_acc": record["val_acc"], "episode": done}
            if self.best["episode"] == done if cfg.keep == "best" else done == self.total:
                self.keep(done, record["val_acc"])
        append_metrics(self.metrics_path, record)
        self.recorded = done

    def keep(self, done: int, val_acc: float | None) -> None:
        metadata = {"episode": str(done)} | ({} if val_acc is None else {"val_acc": f"{val_acc:.4f}"})
        save_weights(self.weights_path, member_tensors(self.model, self.spec.name, self.scale), metadata)
        self.kept = {"val_acc": val_acc, "episode": done}

    def checkpoint(self, done: int) -> None:
        """Write everything a resume needs. Attack noise and training transforms are seeded per episode
        (:func:`_episode_seed`), so the episode sampler is the only random stream to save."""
        save_state(self.state_path, {
            "episode": done, "best": self.best, "final": self.final, "kept": self.kept, "setup": self.setup,
            "seconds": self.seconds(),
            "weights": member_tensors(self.model, self.spec.name, self.scale),
            "optimizer": self.opt.state_dict(), "episode_rng": self.episode_gen.get_state()})

    def restore(self, state: dict) -> None:
        scale = load_member_tensors(self.model, self.spec.name, state["weights"], self.state_path)
        with torch.no_grad():
            self.scale.fill_(scale)
        self.opt.load_state_dict(state["optimizer"])
        self.episode_gen.set_state(state["episode_rng"])
        self.episode, self.best = int(state["episode"]), dict(state["best"])
        self.recorded = self.episode
        self.final, self.kept = state.get("final"), state.get("kept")
        self.earlier_seconds = float(state.get("seconds", 0.0))

    def speed(self, done: int) -> float:
        """Episodes per second since this process started."""
        return (done - self.first_episode) / max(1e-9, time.perf_counter() - self.started_at)

    def finish(self, end: int) -> dict:
        """Keep the final weights if no validation ran (tiny runs); return the summary."""
        finished = end >= self.total
        if self.main and finished and not self.weights_path.exists():
            self.keep(end, None)
        return {"episodes": end, "finished": finished, "best": self.best, "kept": self.kept,
                "final": self.final, "scale": float(self.scale.detach()),
                "seconds": self.seconds()}

    def seconds(self) -> float:
        """Training seconds of this member so far: earlier processes (resumed from) and this one."""
        return self.earlier_seconds + time.perf_counter() - self.started_at


def check_settings(settings: MetaTuning, world: int = 1) -> None:
    """Refuse settings that cannot train, before anything is written (``ConfigError`` naming the value)."""
    _check_settings(settings.train, world)
    bad = [e for e in settings.pool.eps if not 0 <= e <= 1] if settings.train.apq else []
    if bad:
        raise ConfigError(f"pool.eps holds {bad}: attack radii are pixel units in [0, 1], e.g. 0.0157 for 4/255")
    size = settings.pool.size
    if size < 0 or (size and settings.pool.strategy == "separate" and size != len(settings.pool.eps)):
        raise ConfigError(f"pool.size={settings.pool.size}: with strategy 'separate' each member has its own ε (size 0 "
                          "or len(pool.eps)); 'uniform'/'random' take any size >= 1")
    if settings.train.apq and not settings.pool.step_ratio > 0:
        raise ConfigError(f"pool.step_ratio={settings.pool.step_ratio} must be > 0 (the attack step is ratio · ε)")
    if not settings.train.lr > 0 or settings.train.epochs * settings.train.episodes_per_epoch < 1:
        raise ConfigError(f"train.lr={settings.train.lr} must be > 0 and train.epochs × train.episodes_per_epoch "
                          f"({settings.train.epochs} × {settings.train.episodes_per_epoch}) at least 1")


def _check_settings(cfg: TrainConfig, world: int) -> None:
    if cfg.episodes_per_step < 1 or cfg.episodes_per_step % world:
        raise ConfigError(f"train.episodes_per_step={cfg.episodes_per_step} must be a positive multiple of the "
                          f"number of processes ({world})")
    if cfg.mode != "lora" and cfg.apsv:
        raise ConfigError(f"APSV perturbs LoRA factors: set train.apsv=false with train.mode={cfg.mode!r}")
    if cfg.augment != "none" and cfg.apq:
        raise ConfigError(f"train.augment={cfg.augment!r} replaces the query attack: set train.apq=false")
    if cfg.augment == "styleadv" and cfg.apsv:
        raise ConfigError("train.augment='styleadv' has its own loss, without APSV: set train.apsv=false")


def _trainable(model: nn.Module, spec: MemberSpec,
               cfg: TrainConfig) -> tuple[list[nn.Parameter], list[nn.Parameter] | None]:
    """(all trained params, the params APSV perturbs or None) for ``spec``; sets requires_grad accordingly."""
    if cfg.mode != "full":  # a LoRA, FiLM or Adapter member (amt.lora handles every adapter pool layer)
        if spec.name is None:
            raise ConfigError(f"train.mode={cfg.mode!r} needs a member name")
        params = mark_trainable(model, [spec.name])
        set_active_adapter(model, spec.name)
        return params, adapter_parameters(model, spec.name) if cfg.apsv else None
    for p in model.parameters():
        p.requires_grad_(True)
    return list(model.parameters()), None


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


def _setup(settings: MetaTuning, spec: MemberSpec) -> dict:
    """What a resumed run must share with the run it continues (everything but the checkpoint cadence)."""
    flat = {}
    for section in ("train", "pool", "perturb", "head"):
        for key, v in to_dict(getattr(settings, section)).items():
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


def member_record(spec: MemberSpec, pool: PoolConfig, cfg: TrainConfig, summary: dict) -> dict:
    """The pool manifest's entry of one member."""
    attack = member_attack(pool, spec.index, torch.Generator().manual_seed(0)) if cfg.apq else None
    return {"index": spec.index, "name": spec.name, "dir": spec.out_dir.name,
            "attack": to_dict(attack) if attack is not None and pool.strategy != "random" else
            ({"strategy": "random", "eps": list(pool.eps)} if attack is not None else None),
            "seed": cfg.seed + spec.index, **summary}
