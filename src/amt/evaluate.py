"""Few-shot evaluation: clean, adversarial and corrupted query accuracy per domain and shot, mean and 95% CI.

The evaluated methods (:class:`amt.methods.Method`) adapt to each task's support set; attacks target the
final per-task model, on the queries only, with a clean support set. Methods with hyper-parameters are first
tuned per domain and shot on validation tasks that never coincide with the test tasks. Every method sees
exactly the same tasks, random starts and corrupted images: the task stream depends only on the seed, the
domain and the shot count, and per-task randomness on the task index — so methods can be compared task by task.

Conditions per task t (all on the same tasks, the first ones of the stream): clean (t < n_tasks), the
headline attack (t < adv_tasks), the ε sweep and ℓ2 attacks (t < sweep_tasks), every corruption ×
severity (t < corruption_tasks). Corrupted images are computed once per task and shared by every method.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from amt.attacks import adversarial_queries
from amt.config import AttackConfig, ConfigError, DomainConfig, EvalConfig
from amt.data.base import ImageDataset
from amt.data.episodes import Episode, FixedSampler, load_episode
from amt.distributed import gather_by_index, is_main, shard
from amt.methods import LogitsFn, Method, accuracy
from amt.rundir import RESULTS_FILE, write_json, write_text

log = logging.getLogger(__name__)


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
    """Every condition of the protocol, in reporting order. The ε sweep and ℓ2 attacks reuse the headline
    attack's settings with their own radius and step ``ratio · ε`` (``sweep_step_ratio``, ``l2_step_ratio``)."""
    out = [Condition("clean", cfg.n_tasks)]
    if cfg.adversarial:
        out.append(Condition("adversarial", min(cfg.adv_tasks, cfg.n_tasks), attack, headline=True))
        for eps in cfg.eps_sweep:
            if not math.isclose(eps, attack.eps) or attack.norm != "linf":
                sweep = dataclasses.replace(attack, norm="linf", eps=eps, step_size=cfg.sweep_step_ratio * eps)
                out.append(Condition("adversarial", min(cfg.sweep_tasks, cfg.n_tasks), sweep))
        for eps in cfg.l2_eps:
            l2 = dataclasses.replace(attack, norm="l2", eps=eps, step_size=cfg.l2_step_ratio * eps)
            out.append(Condition("adversarial", min(cfg.sweep_tasks, cfg.n_tasks), l2))
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


def task_generator(base: int, t: int, salt: int) -> torch.Generator:
    """A fresh generator for one use (``salt``) of task ``t`` of the stream seeded ``base``."""
    return torch.Generator().manual_seed((base * 1_000_003 + t * 7919 + salt) & 0x7FFFFFFFFFFF)


def corrupted_queries(episode: Episode, conds: Sequence[Condition], t: int,
                      base_seed: int) -> dict[tuple, torch.Tensor]:
    """The corrupted query images of task ``t`` for every corruption condition it takes part in."""
    from amt.corruptions import corrupt

    out = {}
    for i, c in enumerate(conds):
        if c.kind == "corruption" and t < c.n_tasks:
            generator = task_generator(base_seed, t, 100 + i)
            out[c.key()] = corrupt(episode.query_images, c.corruption, c.severity, generator)
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
                out[c.key()] = accuracy(logits_fn(q), y)
        elif c.kind == "adversarial":
            x_adv = adversarial_queries(c.attack, logits_fn, q, labels=y, generator=task_generator(base_seed, t, i))
            with torch.no_grad():
                out[c.key()] = accuracy(logits_fn(x_adv), y)
        else:
            with torch.no_grad():
                out[c.key()] = accuracy(logits_fn(corrupted[c.key()]), y)
    return out


# ----------------------------------------------------------------------------------------------
# Tuning on validation tasks
# ----------------------------------------------------------------------------------------------


def validation_tasks(dataset: ImageDataset, n_way: int, n_shot: int, n_query: int, n_tasks: int,
                     seed: int, device: torch.device | str = "cpu") -> list[Episode]:
    """``n_tasks`` seeded episodes of ``dataset`` (the validation classes, or the test classes with the
    validation seed), loaded onto ``device``."""
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
    mine = set(shard(n_tasks))
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
                              task_generator(base_seed, t, 0)) as (logits_fn, record):
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
    Returns a JSON-ready dict: ``{"protocol", "seconds", "results": [row, ...], "tuning": {...}}`` with a row
    per (method, domain, shot, condition): ``method, domain, in_domain, n_way, n_shot, n_query, n_tasks,
    condition, [attack | corruption], mean, ci95, accuracies`` (accuracies in %), and per tunable method,
    domain and shot what its tuning chose (``tuning[method][domain][shot]``, with the per-task merge
    coefficients of the test tasks).
    """
    tunable = [name for name, m in methods.items() if m.tunable]
    if tunable and cfg.val_tasks < 1:
        raise ConfigError(f"eval.val_tasks={cfg.val_tasks}, but {tunable} choose settings on validation tasks: set "
                          "eval.val_tasks >= 1, or give their grids (merge.*_grid, finetune.lr_grid) a single value")
    if attack is None:
        cfg = dataclasses.replace(cfg, adversarial=False)
    conds = conditions(cfg, attack or AttackConfig())
    rows, tuning = [], {}
    start = time.perf_counter()
    for domain, dataset in domains:
        for shot in cfg.shots:
            tuned = _tune(methods, domain, dataset, shot, cfg, validation, device)
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
                log.info("%-12s %-18s %d-shot clean: %.2f ± %.2f", method, domain.name, shot,
                         *mean_ci95(per_cond[conds[0].key()]))
            for method, info in tuned.items():
                coeffs = [r.coefficients for r in records[method] if r.coefficients is not None]
                tuning.setdefault(method, {}).setdefault(domain.name, {})[str(shot)] = (
                    info | ({"coefficients": coeffs} if coeffs else {}))
    return {
        "protocol": {"n_way": cfg.n_way, "shots": list(cfg.shots), "n_query": cfg.n_query, "n_tasks": cfg.n_tasks,
                     "seed": cfg.seed, "adv_tasks": cfg.adv_tasks, "sweep_tasks": cfg.sweep_tasks,
                     "corruption_tasks": cfg.corruption_tasks, "val_tasks": cfg.val_tasks},
        "seconds": time.perf_counter() - start,
        "results": rows,
        "tuning": tuning,
    }


def _tune(methods: Mapping[str, Method], domain: DomainConfig, dataset: ImageDataset, shot: int, cfg: EvalConfig,
          validation: Mapping[str, tuple[ImageDataset, str]] | None, device: torch.device | str) -> dict[str, dict]:
    """Tune every tunable method for one domain and shot on its validation tasks; {method: what was chosen}."""
    tunable = {n: m for n, m in methods.items() if m.tunable}
    if not tunable:
        return {}
    val_set, how = (validation or {}).get(domain.name, (dataset, "test classes, different seed"))
    seed = validation_seed(cfg.seed, domain.name, shot)
    tasks = validation_tasks(val_set, cfg.n_way, shot, query_budget(val_set, cfg.n_way, shot, cfg.n_query),
                             cfg.val_tasks, seed, device)
    out = {}
    for name, method in tunable.items():
        out[name] = {"validation_tasks": how, **method.tune(tasks, lambda t: task_generator(seed, t, 1))}
        log.info("%s %s %d-shot: tuned %s on %d validation tasks", name, domain.name, shot,
                 {k: v for k, v in out[name].items() if k in ("chosen", "finetune")}, len(tasks))
    return out


def write_results(results: dict, out_dir: str | Path) -> Path:
    """Write ``results.json`` and the Markdown table ``results.md`` (clean rows) into ``out_dir`` atomically;
    return the JSON path."""
    from amt.report import markdown_table

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / RESULTS_FILE, results)
    write_text(out_dir / "results.md", markdown_table(results) + "\n")
    return out_dir / RESULTS_FILE
