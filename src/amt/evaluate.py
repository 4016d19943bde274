"""Few-shot evaluation: clean, adversarial and corrupted query accuracy per domain and shot, mean and 95% CI.

A *method* has ``adapt(support_images, support_labels, n_way, generator)``, a context manager yielding
``(logits_fn, record)``: ``logits_fn`` maps query images ``[Q, 3, H, W]`` in [0, 1] to logits ``[Q, N]``
under the final per-task model (after merging, trimming, fine-tuning), and ``record`` says what was done
(e.g. merge coefficients). Attacks target that per-task model, on the queries only, with a clean
support set. Every method sees exactly the same tasks, random starts and corrupted images: the task
stream depends only on the seed, the domain and the shot count, and per-task randomness on the task
index — so methods can be compared task by task.

Conditions per task t (all on the same tasks, the first ones of the stream): clean (t < n_tasks), the
headline attack (t < adv_tasks), the ε sweep and ℓ2 attacks (t < sweep_tasks), every corruption ×
severity (t < corruption_tasks). Corrupted images are computed once per task and shared by every method.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from amt.attacks import adversarial_queries
from amt.config import AttackConfig, DomainConfig, EvalConfig
from amt.data.datasets import ImageDataset
from amt.data.episodes import Episode, FixedSampler, load_episode
from amt.distributed import gather_by_index, is_main, world
from amt.merge import LogitsFn, merge_grid

log = logging.getLogger(__name__)


class Method(Protocol):
    tunable: bool

    def adapt(self, support_images: torch.Tensor, support_labels: torch.Tensor, n_way: int,
              generator: torch.Generator): ...


def task_seed(seed: int, domain: str, n_shot: int) -> int:
    """Stable seed of the task stream of one (domain, shot) pair (independent of Python's hash salt)."""
    return zlib.crc32(f"{seed}/{domain}/{n_shot}".encode()) & 0x7FFFFFFF


def validation_seed(seed: int, domain: str, n_shot: int) -> int:
    """Seed of the validation task stream: never the test stream of :func:`task_seed`."""
    return task_seed(seed + 1_000_000, domain, n_shot)


def mean_ci95(accuracies: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width 1.96·std/√T of per-task accuracies (same unit as input)."""
    t = torch.tensor(list(accuracies), dtype=torch.float64)
    if t.numel() == 0:
        return float("nan"), float("nan")
    std = float(t.std(unbiased=False)) if t.numel() > 1 else 0.0
    return float(t.mean()), 1.96 * std / math.sqrt(t.numel())


def query_budget(dataset: ImageDataset, n_way: int, n_shot: int, n_query: int) -> int:
    """Queries per class the domain can afford: ``n_query``, or fewer where classes are small.

    Classes with fewer than ``n_shot + 1`` images are left out (with a warning) by the sampler; the
    budget is then capped by the smallest remaining class so every class gives the same count.
    """
    sizes = sorted((len(c) for c in dataset.indices_by_class() if len(c) > n_shot), reverse=True)
    if len(sizes) < n_way:
        return n_query  # the sampler raises the explanatory error
    return max(1, min(n_query, sizes[-1] - n_shot))


# ----------------------------------------------------------------------------------------------
# Conditions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """One way of presenting the queries: clean, attacked, or corrupted."""

    kind: str  # "clean" | "adversarial" | "corruption"
    n_tasks: int  # evaluated on tasks t < n_tasks
    attack: AttackConfig | None = None
    headline: bool = False
    corruption: str | None = None
    severity: int = 0

    def key(self) -> tuple:
        if self.kind == "adversarial":
            return (self.kind, self.attack.norm, round(self.attack.eps, 10), self.headline)
        return (self.kind, self.corruption, self.severity)

    def describe(self) -> dict:
        row: dict = {"condition": self.kind}
        if self.kind == "adversarial":
            a = self.attack
            row["attack"] = {"norm": a.norm, "eps": a.eps, "step_size": a.step_size, "steps": a.steps,
                             "objective": a.objective, "headline": self.headline}
        if self.kind == "corruption":
            row["corruption"] = {"name": self.corruption, "severity": self.severity}
        return row


def conditions(cfg: EvalConfig, attack: AttackConfig) -> list[Condition]:
    """Every condition of the protocol, in reporting order."""
    out = [Condition("clean", cfg.n_tasks)]
    if cfg.adversarial:
        out.append(Condition("adversarial", min(cfg.adv_tasks, cfg.n_tasks), attack, headline=True))
        for eps in cfg.eps_sweep:
            if not math.isclose(eps, attack.eps) or attack.norm != "linf":
                sweep = dataclasses.replace(attack, norm="linf", eps=eps, step_size=eps / 10)
                out.append(Condition("adversarial", min(cfg.sweep_tasks, cfg.n_tasks), sweep))
        for eps in cfg.l2_eps:
            out.append(Condition("adversarial", min(cfg.sweep_tasks, cfg.n_tasks),
                                 dataclasses.replace(attack, norm="l2", eps=eps, step_size=eps / 4)))
    names = corruption_names(cfg.corruptions)
    for name in names:
        for severity in cfg.severities:
            out.append(Condition("corruption", min(cfg.corruption_tasks, cfg.n_tasks), corruption=name,
                                 severity=severity))
    return out


def corruption_names(requested: Sequence[str]) -> list[str]:
    if not requested:
        return []
    from amt.corruptions import CORRUPTIONS

    names = list(CORRUPTIONS) if tuple(requested) == ("all",) else list(requested)
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruption(s) {unknown}; choose from {list(CORRUPTIONS)} or ['all']")
    return names


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(-1).cpu() == labels.cpu()).float().mean())


def _task_generator(base: int, t: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((base * 1_000_003 + t * 7919 + salt) & 0x7FFFFFFFFFFF)


def corrupted_queries(episode: Episode, conds: Sequence[Condition], t: int, base_seed: int) -> dict[tuple, torch.Tensor]:
    """The corrupted query images of task ``t`` for every corruption condition it takes part in."""
    from amt.corruptions import corrupt

    out = {}
    for i, c in enumerate(conds):
        if c.kind == "corruption" and t < c.n_tasks:
            out[c.key()] = corrupt(episode.query_images, c.corruption, c.severity, _task_generator(base_seed, t, 100 + i))
    return out


def evaluate_task(
    logits_fn: LogitsFn, episode: Episode, conds: Sequence[Condition], t: int, base_seed: int,
    corrupted: Mapping[tuple, torch.Tensor],
) -> dict[tuple, float]:
    """Accuracy (%) of one adapted model on task ``t`` under every condition that includes the task."""
    out: dict[tuple, float] = {}
    q, y = episode.query_images, episode.query_labels
    for i, c in enumerate(conds):
        if t >= c.n_tasks:
            continue
        if c.kind == "clean":
            with torch.no_grad():
                out[c.key()] = _accuracy(logits_fn(q), y)
        elif c.kind == "adversarial":
            x_adv = adversarial_queries(c.attack, logits_fn, q, labels=y, generator=_task_generator(base_seed, t, i))
            with torch.no_grad():
                out[c.key()] = _accuracy(logits_fn(x_adv), y)
        else:
            with torch.no_grad():
                out[c.key()] = _accuracy(logits_fn(corrupted[c.key()]), y)
    return out


# ----------------------------------------------------------------------------------------------
# Hyper-parameter selection on validation tasks
# ----------------------------------------------------------------------------------------------


def select_merge_params(method, tasks: Sequence[Episode], base_seed: int) -> dict:
    """Choose the "amt" rule's (λ, β, ρ, trimmed layers) by mean clean accuracy on validation ``tasks``.

    Member scores are computed once per task; ties keep the earliest grid point (no trimming first).
    Sets ``method.params`` and returns ``{"chosen": ..., "validation": [{"params", "acc"}, ...]}``.
    """
    grid = merge_grid(method.cfg)
    per_task = {}
    for t in _my_tasks(len(tasks)):
        e = tasks[t]
        scores = method.scores(e.support_images, e.support_labels, e.n_way, _task_generator(base_seed, t, 1))
        per_task[t] = []
        for params in grid:
            with method.adapt_with(e.support_images, e.support_labels, e.n_way, scores, params) as (fn, _):
                with torch.no_grad():
                    per_task[t].append(_accuracy(fn(e.query_images), e.query_labels))
    accs = _task_mean(gather_by_index(per_task), len(tasks), len(grid))
    best = int(torch.argmax(accs))  # first maximum
    method.params = grid[best]
    return {"chosen": grid[best].as_dict(),
            "validation": [{"params": p.as_dict(), "acc": float(a)} for p, a in zip(grid, accs)]}


def select_finetune_lr(method, tasks: Sequence[Episode], base_seed: int) -> dict:
    """Choose the fine-tuning learning rate from ``method.cfg_ft.lr_grid`` on validation ``tasks``."""
    grid = list(method.cfg_ft.lr_grid)
    per_task = {}
    for t in _my_tasks(len(tasks)):
        e = tasks[t]
        per_task[t] = []
        for lr in grid:
            method.lr = lr
            with method.adapt(e.support_images, e.support_labels, e.n_way, _task_generator(base_seed, t, 2)) as (fn, _):
                with torch.no_grad():
                    per_task[t].append(_accuracy(fn(e.query_images), e.query_labels))
    accs = _task_mean(gather_by_index(per_task), len(tasks), len(grid))
    results = [{"lr": lr, "acc": float(a)} for lr, a in zip(grid, accs)]
    best = max(results, key=lambda r: r["acc"])
    method.lr = best["lr"]
    return {"chosen_lr": best["lr"], "lr_validation": results}


def _my_tasks(n_tasks: int) -> range:
    """The task indices this process evaluates: ``t ≡ rank (mod world)`` (every task in a single process)."""
    size, rank = world()
    return range(rank, n_tasks, size)


def _task_mean(per_task: Mapping[int, Sequence[float]], n_tasks: int, n_grid: int) -> torch.Tensor:
    """Mean over tasks (summed in task order, so any number of processes gives the same bits) per grid point."""
    accs = torch.zeros(n_grid, dtype=torch.float64)
    for t in range(n_tasks):
        accs += torch.tensor(per_task[t], dtype=torch.float64)
    return accs / max(1, n_tasks)


def validation_tasks(dataset: ImageDataset, n_way: int, n_shot: int, n_query: int, n_tasks: int,
                     seed: int, device: torch.device | str = "cpu") -> list[Episode]:
    sampler = FixedSampler(dataset.indices_by_class(), n_way, n_shot, n_query,
                           torch.Generator().manual_seed(seed), dataset.name + " (validation)")
    return [load_episode(dataset, sampler.sample()).to(device) for _ in range(n_tasks)]


# ----------------------------------------------------------------------------------------------
# The evaluation loop
# ----------------------------------------------------------------------------------------------


def evaluate_domain(
    methods: Mapping[str, Method], dataset: ImageDataset, n_way: int, n_shot: int, n_query: int,
    conds: Sequence[Condition], generator: torch.Generator, base_seed: int, desc: str = "",
    device: torch.device | str = "cpu",
) -> tuple[dict[str, dict[tuple, list[float]]], dict[str, list]]:
    """Per-task accuracies ``{method: {condition key: [acc, ...]}}`` and per-task records of every method."""
    n_tasks = max(c.n_tasks for c in conds)
    sampler = FixedSampler(dataset.indices_by_class(), n_way, n_shot, n_query, generator, dataset.name)
    mine = set(_my_tasks(n_tasks))
    per_task: dict[int, tuple[dict, dict]] = {}
    for t in tqdm(range(n_tasks), desc=desc, leave=False, dynamic_ncols=True, disable=not is_main()):
        indices = sampler.sample()  # every rank draws every task, so the task stream is the same
        if t not in mine:
            continue
        episode = load_episode(dataset, indices).to(device)
        corrupted = corrupted_queries(episode, conds, t, base_seed)
        task_accs, task_records = {}, {}
        for name, method in methods.items():
            with method.adapt(episode.support_images, episode.support_labels, episode.n_way,
                              _task_generator(base_seed, t, 0)) as (logits_fn, record):
                task_accs[name] = evaluate_task(logits_fn, episode, conds, t, base_seed, corrupted)
            task_records[name] = record
        per_task[t] = (task_accs, task_records)
    per_task = gather_by_index(per_task)
    accs: dict[str, dict[tuple, list[float]]] = {m: {c.key(): [] for c in conds} for m in methods}
    records: dict[str, list] = {m: [] for m in methods}
    for t in range(n_tasks):  # task order, whatever process evaluated the task
        task_accs, task_records = per_task[t]
        for name in methods:
            for key, acc in task_accs[name].items():
                accs[name][key].append(acc)
            records[name].append(task_records[name])
    return accs, records


def evaluate(
    methods: Mapping[str, Method],
    domains: Sequence[tuple[DomainConfig, ImageDataset]],
    cfg: EvalConfig,
    attack: AttackConfig | None = None,
    validation: Mapping[str, tuple[ImageDataset, str]] | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """Evaluate every method on every domain and shot setting of ``cfg``.

    Args:
        attack: the headline attack (None: no adversarial conditions).
        validation: per domain name, (dataset, description) of the validation tasks used to tune the
            methods that have hyper-parameters; tasks come from a different class split or, failing
            that, a different seed, so they never coincide with test tasks.
        device: where episodes are put (the methods' models must be there).
    Returns a JSON-ready dict: ``{"protocol", "seconds", "results": [row, ...], "merge": {...}}`` with a row
    per (method, domain, shot, condition): ``method, domain, in_domain, n_way, n_shot, n_query, n_tasks,
    condition, [attack | corruption], mean, ci95, accuracies`` (accuracies in %).
    """
    if attack is None:
        cfg = dataclasses.replace(cfg, adversarial=False)
    conds = conditions(cfg, attack or AttackConfig())
    rows, merge_info = [], {}
    start = time.perf_counter()
    for domain, dataset in domains:
        _tune(methods, domain, dataset, cfg, validation, merge_info, device)
        for shot in cfg.shots:
            n_query = query_budget(dataset, cfg.n_way, shot, cfg.n_query)
            if n_query < cfg.n_query:
                log.warning("%s %d-shot: classes are small, using %d queries per class instead of %d",
                            domain.name, shot, n_query, cfg.n_query)
            seed = task_seed(cfg.seed, domain.name, shot)
            accs, records = evaluate_domain(methods, dataset, cfg.n_way, shot, n_query, conds,
                                            torch.Generator().manual_seed(seed), seed,
                                            desc=f"{domain.name} {cfg.n_way}w{shot}s", device=device)
            for method, per_cond in accs.items():
                for c in conds:
                    a = per_cond[c.key()]
                    mean, ci = mean_ci95(a)
                    rows.append(dict(method=method, domain=domain.name, in_domain=domain.in_domain, n_way=cfg.n_way,
                                     n_shot=shot, n_query=n_query, n_tasks=len(a), **c.describe(), mean=mean,
                                     ci95=ci, accuracies=a))
                clean = per_cond[conds[0].key()]
                log.info("%-12s %-18s %d-shot clean: %.2f ± %.2f", method, domain.name, shot, *mean_ci95(clean))
                coeffs = [r.coefficients for r in records[method] if r.coefficients is not None]
                if coeffs and method in merge_info and domain.name in merge_info[method]:
                    merge_info[method][domain.name].setdefault("coefficients", {})[str(shot)] = coeffs
    return {
        "protocol": {"n_way": cfg.n_way, "shots": list(cfg.shots), "n_query": cfg.n_query, "n_tasks": cfg.n_tasks,
                     "seed": cfg.seed, "adv_tasks": cfg.adv_tasks, "sweep_tasks": cfg.sweep_tasks,
                     "corruption_tasks": cfg.corruption_tasks, "val_tasks": cfg.val_tasks},
        "seconds": time.perf_counter() - start,
        "results": rows,
        "merge": merge_info,
    }


def _tune(methods, domain, dataset, cfg: EvalConfig, validation, merge_info: dict, device="cpu") -> None:
    """Per domain: choose the hyper-parameters of tunable methods on validation tasks of every shot setting."""
    tunable = {n: m for n, m in methods.items() if getattr(m, "tunable", False) or hasattr(m, "cfg_ft")}
    if not tunable:
        return
    val_set, how = (validation or {}).get(domain.name, (dataset, "test classes, different seed"))
    seed = validation_seed(cfg.seed, domain.name, 0)
    tasks = [e for shot in cfg.shots for e in validation_tasks(
        val_set, cfg.n_way, shot, query_budget(val_set, cfg.n_way, shot, cfg.n_query), cfg.val_tasks,
        validation_seed(cfg.seed, domain.name, shot), device)]
    for name, method in tunable.items():
        info = merge_info.setdefault(name, {}).setdefault(domain.name, {"rule": getattr(method, "rule", None),
                                                                         "validation_tasks": how})
        inner = getattr(method, "inner", method)
        if getattr(inner, "tunable", False):
            info.update(select_merge_params(inner, tasks, seed))
            info["members"] = list(inner.names)
            log.info("%s %s: merge params %s (validation %.2f%% on %d tasks)", name, domain.name, info["chosen"],
                     max(v["acc"] for v in info["validation"]), len(tasks))
        if hasattr(method, "cfg_ft"):
            info["finetune"] = select_finetune_lr(method, tasks, seed)
            log.info("%s %s: fine-tuning lr %g", name, domain.name, info["finetune"]["chosen_lr"])


def write_results(results: dict, out_dir: str | Path) -> Path:
    """Write ``results.json`` and the Markdown table ``results.md`` into ``out_dir``; return the JSON path."""
    from amt.report import markdown_table

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)
    (out_dir / "results.md").write_text(markdown_table(results) + "\n")  # the clean rows
    return path
