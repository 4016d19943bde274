"""Few-shot evaluation: clean, adversarial and corrupted query accuracy per domain and shot, mean and 95% CI.

The evaluated methods (:class:`amt.methods.Method`) adapt to each task's support set; attacks target the
final per-task model, on the queries only, with a clean support set. Methods with hyper-parameters are first
tuned per domain and shot on validation tasks that never coincide with the test tasks. Every method sees
exactly the same tasks, random starts and corrupted images: the task stream depends only on the seed, the
domain and the shot count, and per-task randomness on the task index — so methods can be compared task by task.

With ``eval.episodes: variable`` every domain has one cell "vwvs" instead of one per K: Meta-Dataset's
variable-way variable-shot tasks (:class:`amt.data.episodes.VariableSampler`), the same stream for every method,
each task's way, support size and queries per class recorded next to its accuracy (paper Table 18).

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

from amt.conditions import Condition, conditions, corrupted_queries, measure, task_generator
from amt.config import AttackConfig, AutoAttackConfig, ConfigError, DomainConfig, EvalConfig, MaskingConfig, to_dict
from amt.data.base import ImageDataset
from amt.data.episodes import Episode, EpisodeError, FixedSampler, Sampler, VariableSampler, load_episode
from amt.distributed import gather_by_index, is_main, shard
from amt.masking import masking_flags
from amt.methods import Method
from amt.results import VWVS, cell_label
from amt.rundir import RESULTS_FILE, write_json, write_text
from amt.stats import mean_ci95

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`evaluate`; ``results`` holds the (domain, shot) cells finished so far, marked partial."""

    def __init__(self, results: dict) -> None:
        super().__init__("interrupted")
        self.results = results


def task_seed(seed: int, domain: str, n_shot: int | str) -> int:
    """Stable seed of the task stream of one (domain, shot cell) pair (independent of Python's hash salt)."""
    return zlib.crc32(f"{seed}/{domain}/{n_shot}".encode()) & 0x7FFFFFFF


def validation_seed(seed: int, domain: str, n_shot: int | str) -> int:
    """Seed of the validation task stream: never the test stream of :func:`task_seed`."""
    return task_seed(seed + 1_000_000, domain, n_shot)


def query_budget(class_indices: Sequence[Sequence[int]], n_way: int, n_shot: int, n_query: int) -> int:
    """Queries per class: ``n_query`` when at least ``n_way`` classes have ``n_shot + n_query`` images, else the
    most that ``n_way`` classes can afford. Classes too small for the episode shape are left out by the sampler
    (and named in its warning), so a small class never lowers the queries of the others beyond that.
    """
    sizes = sorted((len(c) for c in class_indices), reverse=True)
    if len(sizes) < n_way or sizes[n_way - 1] <= n_shot:
        return n_query  # the sampler raises the explanatory error
    return min(n_query, sizes[n_way - 1] - n_shot)


def holdout_split(class_indices: Sequence[Sequence[int]], fraction: float,
                  seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Split every class's image indices into (validation, test) parts: a fixed, seeded ``fraction`` of each
    class (rounded up; none of a class with a single image) is held out for validation tasks only.

    Returns ``(validation indices by class, test indices by class)``; the two never share an index.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"eval.holdout_fraction must be in (0, 1), got {fraction}")
    val, test = [], []
    for c, idx in enumerate(class_indices):
        idx = list(idx)
        perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed * 7919 + c)).tolist()
        k = math.ceil(fraction * len(idx)) if len(idx) > 1 else 0
        val.append(sorted(idx[i] for i in perm[:k]))
        test.append(sorted(idx[i] for i in perm[k:]))
    return val, test


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSource:
    """Where a domain's tasks come from: a dataset and the image indices of each class that may be used."""

    dataset: ImageDataset
    class_indices: list[list[int]]
    description: str  # how the tasks relate to the test tasks (validation sources)

    @classmethod
    def whole(cls, dataset: ImageDataset, description: str = "test classes") -> TaskSource:
        return cls(dataset, dataset.indices_by_class(), description)


def task_sampler(source: TaskSource, cfg: EvalConfig, cell: int | str, seed: int,
                 what: str = "") -> tuple[Sampler, int | None]:
    """The sampler of one shot cell's task stream from ``source`` (its generator seeded ``seed``) and its queries per
    class: ``cfg.n_way``-way ``cell``-shot tasks (:func:`query_budget` queries), or for the cell "vwvs"
    variable-way variable-shot tasks of ``cfg.variable`` (queries per class vary by task: None)."""
    generator = torch.Generator().manual_seed(seed)
    name = source.dataset.name + what
    if cell == VWVS:
        return VariableSampler(source.class_indices, cfg.variable, generator, name), None
    n_query = query_budget(source.class_indices, cfg.n_way, cell, cfg.n_query)
    return FixedSampler(source.class_indices, cfg.n_way, cell, n_query, generator, name,
                        source.dataset.class_names), n_query


def load_tasks(source: TaskSource, sampler: Sampler, n_tasks: int, device: torch.device | str = "cpu") -> list[Episode]:
    """The next ``n_tasks`` episodes of ``sampler`` read from ``source``, loaded onto ``device`` (validation tasks)."""
    return [load_episode(source.dataset, sampler.sample()).to(device) for _ in range(n_tasks)]


def task_shape(indices) -> dict[str, int]:
    """A task's shape: ways, support images and queries per class (:class:`amt.data.episodes.EpisodeIndices`)."""
    n_way = indices.n_way
    return {"n_way": n_way, "n_support": int(indices.support_indices.numel()),
            "n_query": int(indices.query_indices.numel()) // max(n_way, 1)}


def evaluate_domain(
    methods: Mapping[str, Method], source: TaskSource, sampler: Sampler, conds: Sequence[Condition], base_seed: int,
    desc: str = "", device: torch.device | str = "cpu",
) -> tuple[dict[str, dict[tuple, list[float]]], dict[str, list], list[dict[str, int]]]:
    """Per-task values ``{method: {condition key: [%, ...]}}``, per-task records of every method, and the shape of
    every task (:func:`task_shape`, in task order), on the task stream of ``sampler`` (seeded ``base_seed``)."""
    n_tasks = max(c.n_tasks for c in conds)
    mine = set(shard(n_tasks))
    per_task: dict[int, tuple[dict, dict]] = {}
    shapes = []
    for t in tqdm(range(n_tasks), desc=desc, leave=False, dynamic_ncols=True, disable=not is_main()):
        indices = sampler.sample()  # every rank draws every task, so the task stream is the same
        shapes.append(task_shape(indices))
        if t not in mine:
            continue
        episode = load_episode(source.dataset, indices).to(device)
        corrupted = corrupted_queries(episode, conds, t, base_seed)
        task_accs, task_records = {}, {}
        for name, method in methods.items():
            with method.adapt(episode.support_images, episode.support_labels, episode.n_way,
                              task_generator(base_seed, t, 0)) as (logits_fn, record):
                task_accs[name] = {c.key(): measure(c, logits_fn, episode, t, base_seed, i, corrupted, method.model)
                                   for i, c in enumerate(conds) if c.applies_to(name, t)}
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
    return accs, records, shapes


# ----------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------


def evaluate(
    methods: Mapping[str, Method],
    domains: Sequence[tuple[DomainConfig, ImageDataset]],
    cfg: EvalConfig,
    attack: AttackConfig | None = None,
    validation: Mapping[str, ImageDataset] | None = None,
    device: torch.device | str = "cpu",
    autoattack: AutoAttackConfig | None = None,
    masking: MaskingConfig | None = None,
) -> dict:
    """Evaluate every method on every domain and shot setting of ``cfg``.

    Args:
        attack: the headline attack (None: no adversarial conditions).
        validation: per domain name, the dataset of its validation classes. A domain without one holds out
            ``eval.holdout_fraction`` of every class's images for its validation tasks, and its test tasks
            never use them; either way no test image is ever used for tuning.
        device: where episodes are put (the methods' models must be there).
        autoattack, masking: the AutoAttack rows and the gradient-masking checks (None: not run).
    Returns a JSON-ready dict: ``{"protocol", "seconds", "results": [row, ...], "tuning": {...},
    "masking": {...}}`` with a row per (method, domain, shot, condition): ``method, domain, in_domain, n_way,
    n_shot, n_query, n_tasks, condition, [attack | corruption], mean, ci95, accuracies`` (per-task %, in task
    order: methods are compared task by task); in the variable-way cell (``n_shot`` "vwvs", ``n_way`` and
    ``n_query`` None) also ``task_n_way, task_n_support, task_n_query`` (per task, aligned with ``accuracies``:
    ways, support images, queries per class); per tunable method, domain and shot what its tuning chose
    (``tuning[method][domain][shot]``, with the per-task merge coefficients of the test tasks), and the
    masking flags (``masking[method][domain][shot]``, :func:`amt.masking.masking_flags`).
    """
    tunable = [name for name, m in methods.items() if m.tunable]
    if tunable and cfg.val_tasks < 1:
        raise ConfigError(f"eval.val_tasks={cfg.val_tasks}, but {tunable} choose settings on validation tasks: set "
                          "eval.val_tasks >= 1, or give their grids (merge.*_grid, finetune.lr_grid) a single value")
    if attack is None:
        cfg = dataclasses.replace(cfg, adversarial=False)
    conds = conditions(cfg, attack, autoattack, masking, list(methods))
    rows, tuning, flags = [], {}, {}
    shots = shot_cells(cfg)
    start = time.perf_counter()
    try:
        for domain, dataset in domains:
            test, val = _sources(domain, dataset, (validation or {}).get(domain.name), cfg)
            for shot in shots:
                tuned = _tune(methods, domain, val, shot, cfg, device) if tunable else {}
                seed = task_seed(cfg.seed, domain.name, shot)
                sampler, n_query = task_sampler(test, cfg, shot, seed)
                if n_query is not None and n_query < cfg.n_query:
                    log.warning("%s %d-shot: classes are small, using %d queries per class instead of %d",
                                domain.name, shot, n_query, cfg.n_query)
                label = cell_label(cfg.n_way, shot)
                cell_conds = [c for c in conds if c.in_shot(shot)]
                accs, records, shapes = evaluate_domain(methods, test, sampler, cell_conds, seed,
                                                        desc=f"{domain.name} {label}", device=device)
                checked = any(c.kind == "gradient" for c in cell_conds)  # the masking checks run in this shot
                cell = []  # the rows of this (domain, shot), added at once
                for method, per_cond in accs.items():
                    for c in cell_conds:
                        a = per_cond[c.key()]
                        if a:
                            mean, ci = mean_ci95(a)
                            cell.append(dict(method=method, domain=domain.name, in_domain=domain.in_domain,
                                             n_way=cfg.n_way if n_query is not None else None, n_shot=shot,
                                             n_query=n_query, n_tasks=len(a), **c.describe(), mean=mean, ci95=ci,
                                             accuracies=a, **_shape_lists(shapes[:len(a)], n_query is None)))
                    log.info("%-12s %-18s %s clean: %.2f ± %.2f", method, domain.name, label,
                             *mean_ci95(per_cond[conds[0].key()]))
                    if masking is not None and masking.n_tasks > 0 and attack is not None and checked:
                        flags.setdefault(method, {}).setdefault(domain.name, {})[str(shot)] = masking_flags(
                            {c: per_cond[c.key()] for c in cell_conds}, masking)
                rows.extend(cell)
                for method, info in tuned.items():
                    coeffs = [r.coefficients for r in records[method] if r.coefficients is not None]
                    tuning.setdefault(method, {}).setdefault(domain.name, {})[str(shot)] = (
                        info | ({"coefficients": coeffs} if coeffs else {}))
    except KeyboardInterrupt:
        done = len({(r["domain"], r["n_shot"]) for r in rows})
        raise Interrupted(_results(cfg, start, rows, tuning, flags, partial=f"interrupted after {done} of "
                                   f"{len(domains) * len(shots)} (domain, shot) cells")) from None
    return _results(cfg, start, rows, tuning, flags)


def shot_cells(cfg: EvalConfig) -> list[int | str]:
    """The shot cells evaluated per domain: every K of ``cfg.shots``, or the one cell "vwvs" of variable-way
    variable-shot tasks (``cfg.episodes == "variable"``)."""
    if cfg.episodes == "variable":
        v = cfg.variable
        if not 1 <= v.min_ways <= v.max_ways or v.max_query_per_class < 1 or v.max_support_per_class < 1:
            raise ConfigError(f"eval.variable: need 1 <= min_ways <= max_ways and positive per-class limits, got {v}")
        return [VWVS]
    return list(cfg.shots)


def _shape_lists(shapes: list[dict[str, int]], variable: bool) -> dict[str, list[int]]:
    """The per-task shapes of a variable-way cell's row, as lists in task order (fixed cells: none)."""
    return {f"task_{k}": [s[k] for s in shapes] for k in ("n_way", "n_support", "n_query")} if variable else {}


def _results(cfg: EvalConfig, start: float, rows: list, tuning: dict, flags: dict, partial: str | None = None) -> dict:
    """The JSON-ready results (``partial``: why only some cells are there)."""
    variable = {"variable": to_dict(cfg.variable)} if cfg.episodes == "variable" else {}
    return {
        **({"partial": partial} if partial else {}),
        "protocol": {"episodes": cfg.episodes, **variable,
                     "n_way": cfg.n_way, "shots": shot_cells(cfg), "n_query": cfg.n_query, "n_tasks": cfg.n_tasks,
                     "seed": cfg.seed, "adv_tasks": cfg.adv_tasks, "sweep_tasks": cfg.sweep_tasks,
                     "corruption_tasks": cfg.corruption_tasks, "val_tasks": cfg.val_tasks,
                     "holdout_fraction": cfg.holdout_fraction, "reference": cfg.reference},
        "seconds": time.perf_counter() - start,
        "results": rows,
        "tuning": tuning,
        "masking": flags,
    }


def _sources(domain: DomainConfig, dataset: ImageDataset, val_set: ImageDataset | None,
             cfg: EvalConfig) -> tuple[TaskSource, TaskSource]:
    """(test source, validation source) of a domain: its validation classes when it has them, else a held-out
    part of every test class's images (removed from the test source)."""
    if val_set is not None:
        return TaskSource.whole(dataset), TaskSource.whole(val_set, "validation classes")
    val, test = holdout_split(dataset.indices_by_class(), cfg.holdout_fraction, task_seed(cfg.seed, domain.name, 0))
    how = f"held-out images of the test classes ({cfg.holdout_fraction:g} of each class, never in a test task)"
    return TaskSource(dataset, test, "test classes"), TaskSource(dataset, val, how)


def _tune(methods: Mapping[str, Method], domain: DomainConfig, source: TaskSource, shot: int | str, cfg: EvalConfig,
          device: torch.device | str) -> dict[str, dict]:
    """Tune every tunable method for one domain and shot cell on its validation tasks (of the same kind as the test
    tasks: fixed or variable way and shot); {method: what was chosen}."""
    seed = validation_seed(cfg.seed, domain.name, shot)
    try:
        tasks = load_tasks(source, task_sampler(source, cfg, shot, seed, " (validation)")[0], cfg.val_tasks, device)
    except EpisodeError as exc:
        if source.description == "validation classes":
            raise
        raise EpisodeError(f"{exc}. {domain.name} has no validation classes, so its validation tasks come from "
                           f"{cfg.holdout_fraction:g} of each class's images: raise eval.holdout_fraction, give the "
                           "domain a splits file with a 'val' split, or evaluate fewer shots") from exc
    out = {}
    for name, method in methods.items():
        if method.tunable:
            chosen = method.tune(tasks, lambda t: task_generator(seed, t, 1))
            out[name] = {"validation_tasks": source.description, **chosen}
            log.info("%s %s %s: tuned %s on %d validation tasks", name, domain.name, cell_label(cfg.n_way, shot),
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
