"""The evaluated methods behind one interface: adapt to a task, tune on validation tasks.

A :class:`Method` turns a task's labelled support set into a per-task classifier (:meth:`Method.adapt`, a
context manager yielding ``(logits_fn, record)``) and, when it has hyper-parameters, chooses them on
validation tasks (:meth:`Method.tune`). ``logits_fn`` maps query images ``[Q, 3, H, W]`` in [0, 1] to logits
``[Q, N]`` under the final per-task model — after merging, trimming or fine-tuning — and is differentiable
with respect to the images, so attacks target exactly the model that classifies. Every per-task change of
the weights is undone bit-for-bit when the context exits.

The methods:

- :class:`BackboneMethod`: the cosine ProtoNet on a backbone as it is — PM (pre-trained) and PMF (a
  meta-tuned full backbone);
- :class:`PoolMethod`: a trained LoRA pool with a rule (:data:`RULES`); rule "ttm" (test-time merging,
  Algorithm 2, with trimming) is tuned per domain and shot;
- :class:`FinetunedMethod`: any single-model method followed by test-time fine-tuning on the support set —
  of every weight (PMF+FT, AMT-FT) or of ATTNSCALE's attention scales (ATTNSCALE, ATTNSCALE + AMT-FT), on
  clean or also on attacked pseudo-queries (Adv. TTF) — its learning rate tuned per domain and shot.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amt.attacks import robust_under_pgd
from amt.config import AttackConfig, AugmentConfig, FinetuneConfig, MergeConfig
from amt.data.episodes import Episode
from amt.distributed import gather_by_index, shard
from amt.finetune import TUNED, finetuned
from amt.head import cosine_logits, prototypes
from amt.lora import active_adapter
from amt.merge import (
    MemberScores,
    MergeParams,
    classifier_coefficients,
    member_scores,
    merge_coefficients,
    merge_grid,
    merged_task,
    pseudo_queries,
    short_attack,
)
from amt.rundir import LoadedPool

LogitsFn = Callable[[Tensor], Tensor]
TaskRng = Callable[[int], torch.Generator]  # task index → a fresh generator for that task's randomness

RULES = ("ttm", "uniform", "logit_avg", "min_support_ce", "single", "linear_classifier")
"""Pool rules: "ttm" (test-time merging by support scores + trimming), "uniform" (weight average of all
members), "logit_avg" (average of the members' logits: an ensemble, no merge), "min_support_ce" (the "no
TTM" ablation: the member with the lowest pseudo-query cross-entropy), "single" (a fixed member),
"linear_classifier" (FLUTE-like, the paper's Table 6: ζ = the mean output on the support set of a per-task
classifier of which member an attacked pseudo-query was attacked against; :func:`amt.merge.classifier_coefficients`)."""


@dataclass
class TaskRecord:
    """What a method did for one task (JSON-ready)."""

    coefficients: list[float] | None = None  # ζ per member (None: no merge)
    extra: dict = field(default_factory=dict)


class Method(ABC):
    """One evaluated row. Subclasses set ``model`` (the backbone the per-task model lives on; attacks that
    need a module, such as AutoAttack's, use it for the device and the eval mode)."""

    model: nn.Module | None = None

    @property
    def tunable(self) -> bool:
        """Whether :meth:`tune` chooses among several settings (it then needs validation tasks)."""
        return False

    @property
    def pool_names(self) -> tuple[str, ...]:
        """Adapter names of the LoRA pool the method merges (empty without a pool)."""
        return ()

    @abstractmethod
    def adapt(self, support_images: Tensor, support_labels: Tensor, n_way: int,
              generator: torch.Generator) -> AbstractContextManager[tuple[LogitsFn, TaskRecord]]:
        """The per-task classifier for a support set ``[S, 3, H, W]`` in [0, 1] with labels ``[S]`` in
        ``0..n_way-1``; ``generator`` drives the task's own randomness (pseudo-query augmentation)."""

    def tune(self, tasks: Sequence[Episode], rng: TaskRng) -> dict:
        """Choose the method's settings on validation ``tasks`` (one domain and shot); return what was chosen
        and the validation accuracies (JSON-ready). Methods without settings return ``{}``."""
        return {}


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy (%) of logits ``[Q, N]`` against labels ``[Q]``."""
    return 100.0 * float((logits.argmax(-1).cpu() == labels.cpu()).float().mean())


@dataclass(frozen=True)
class ProtoNet:
    """The cosine ProtoNet classifier of one task: ``x ↦ scale · cos(model(x), p_c)`` (a :data:`LogitsFn`)."""

    model: nn.Module
    protos: Tensor  # [N, D] prototypes of the support set
    scale: float  # logit scale s

    def __call__(self, x: Tensor) -> Tensor:
        return cosine_logits(self.model(x), self.protos, self.scale)


def protonet(model: nn.Module, support_images: Tensor, support_labels: Tensor, n_way: int, scale: float) -> ProtoNet:
    """Cosine ProtoNet on ``model``'s current weights, prototypes from the support set (computed without
    gradient; queries keep theirs, for attacks)."""
    with torch.no_grad():
        protos = prototypes(model(support_images), support_labels, n_way)
    return ProtoNet(model, protos, scale)


def validation_accuracies(tasks: Sequence[Episode], evaluate: Callable[[int, Episode], list[float]]) -> Tensor:
    """Mean validation accuracy per candidate setting, ``[n_candidates]`` float64.

    ``evaluate(t, task)`` returns the accuracy of every candidate on task ``t``. Under torchrun each process
    evaluates its share of the tasks (:func:`amt.distributed.shard`); the results are gathered and summed in
    task order, so any number of processes gives the same bits.
    """
    per_task = gather_by_index({t: evaluate(t, tasks[t]) for t in shard(len(tasks))})
    total = torch.zeros(len(per_task[0]), dtype=torch.float64)
    for t in range(len(tasks)):
        total += torch.tensor(per_task[t], dtype=torch.float64)
    return total / len(tasks)


def _require_tasks(tasks: Sequence[Episode], what: str, n: int) -> None:
    if not tasks:
        raise ValueError(f"choosing {what} among {n} settings needs validation tasks: set eval.val_tasks >= 1, or "
                         f"give the grid a single value")


# ----------------------------------------------------------------------------------------------
# PM / PMF
# ----------------------------------------------------------------------------------------------


class BackboneMethod(Method):
    """The cosine ProtoNet on a backbone as it is (PM; PMF with a meta-tuned backbone)."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        self.model, self.scale = model.eval().requires_grad_(False), scale

    @contextmanager
    def adapt(self, support_images: Tensor, support_labels: Tensor, n_way: int,
              generator: torch.Generator) -> Iterator[tuple[LogitsFn, TaskRecord]]:
        yield protonet(self.model, support_images, support_labels, n_way, self.scale), TaskRecord()


# ----------------------------------------------------------------------------------------------
# A LoRA pool with a rule
# ----------------------------------------------------------------------------------------------


class PoolMethod(Method):
    """A trained pool on its backbone, classified per task by one of :data:`RULES`.

    Each member keeps the logit scale it was trained with; a merged model uses the ζ-weighted mean of the
    merged members' scales (the scale only sets the temperature that attacks and fine-tuning see: cosine
    argmax does not depend on it).

    ``attack`` is the threat model the evaluation uses (its norm and ε): the robustness-aware member scores
    (``merge.adv_weight_grid`` > 0) and the robust selection objectives attack at that radius; it is needed only
    by them, and by rule "linear_classifier" for its norm (its radii are the members' training ε, ``pool.eps``).
    """

    def __init__(self, model: nn.Module, pool: LoadedPool, rule: str, merge: MergeConfig, augment: AugmentConfig,
                 member_index: int = 0, attack: AttackConfig | None = None) -> None:
        names = pool.names
        if rule not in RULES:
            raise ValueError(f"unknown pool rule {rule!r}; choose one of {RULES}")
        if not names:
            raise ValueError("a pool method needs LoRA members; a full-backbone run is a BackboneMethod")
        if rule == "single" and not 0 <= member_index < len(names):
            raise ValueError(f"rule 'single' needs 0 <= member_index < {len(names)}, got {member_index}")
        if not 0 <= merge.robust_weight <= 1:
            raise ValueError(f"merge.robust_weight must be in [0, 1], got {merge.robust_weight}")
        self.model, self.rule, self.cfg, self.augment = model.eval().requires_grad_(False), rule, merge, augment
        self.names, self.scales = list(names), torch.tensor(pool.scales, dtype=torch.float64)
        self.member_index = member_index
        self.grid = merge_grid(merge)
        self.params: MergeParams = self.grid[0]
        robust = rule == "ttm" and (any(p.adv_weight > 0 for p in self.grid) or
                                    (merge.objective != "clean" and len(self.grid) > 1))
        if robust and (attack is None or attack.eps <= 0):
            raise ValueError("merge.adv_weight_grid > 0 and merge.objective 'robust'/'balance' attack at the "
                             "evaluation's radius: give the method the attack (attack.eps > 0), or set "
                             "merge.adv_weight_grid=[0] and merge.objective=clean")
        if rule == "linear_classifier" and (attack is None or len(pool.eps) != len(names)):
            raise ValueError(f"rule 'linear_classifier' attacks with each member's training radius: the pool must "
                             f"record one eps per member (got {len(pool.eps)} for {len(names)}; clean pools have "
                             "none) and the method needs the evaluation attack for the norm")
        self.attack, self.member_eps = attack, tuple(pool.eps)

    @property
    def tunable(self) -> bool:
        return self.rule == "ttm" and len(self.grid) > 1

    @property
    def pool_names(self) -> tuple[str, ...]:
        return tuple(self.names)

    def scores(self, support_images: Tensor, support_labels: Tensor, n_way: int, generator: torch.Generator,
               adversarial: bool = False) -> MemberScores:
        """C_i, V_i and the pseudo-query CE of every member on one support set (``adversarial``: also C_i^adv and
        V_i^adv on the pseudo-queries attacked against each member)."""
        pseudo, pseudo_labels = pseudo_queries(support_images, support_labels, self.augment, generator)
        attack = short_attack(self.attack, self.cfg.score_steps) if adversarial else None
        return member_scores(self.model, self.names, [float(s) for s in self.scales], support_images,
                             support_labels, n_way, pseudo, pseudo_labels, attack, generator)

    def coefficients(self, scores: MemberScores | None, params: MergeParams) -> Tensor:
        """ζ ``[P]`` of the rule (sums to 1)."""
        p = len(self.names)
        if self.rule == "linear_classifier":
            raise ValueError("rule 'linear_classifier' computes ζ from the support set (classifier_zeta)")
        if self.rule == "ttm":
            return merge_coefficients(scores, params.lambda_, params.beta, self.cfg.top_k, params.adv_weight)
        if self.rule == "uniform":
            return torch.full((p,), 1.0 / p)
        index = int(scores.support_ce.argmin()) if self.rule == "min_support_ce" else self.member_index
        return F.one_hot(torch.tensor(index), p).float()

    def classifier_zeta(self, support_images: Tensor, support_labels: Tensor, generator: torch.Generator) -> Tensor:
        """Rule "linear_classifier": ζ ``[P]`` from :func:`amt.merge.classifier_coefficients` — member i's attack is
        the evaluation attack's norm at member i's training ε (``merge.score_steps`` steps)."""
        pseudo, pseudo_labels = pseudo_queries(support_images, support_labels, self.augment, generator)
        attacks = [short_attack(dataclasses.replace(self.attack, eps=e), self.cfg.score_steps) for e in self.member_eps]
        return classifier_coefficients(self.model, self.names, [float(s) for s in self.scales], support_images,
                                       support_labels, pseudo, pseudo_labels, attacks, self.cfg, generator)

    @contextmanager
    def adapt_with(self, support_images: Tensor, support_labels: Tensor, n_way: int, scores: MemberScores | None,
                   params: MergeParams, zeta: Tensor | None = None) -> Iterator[tuple[LogitsFn, TaskRecord]]:
        """The per-task model for given member scores and hyper-parameters (tuning reuses the scores), or for
        given coefficients ``zeta`` ``[P]``."""
        if self.rule == "logit_avg":
            fns = []
            for name, scale in zip(self.names, self.scales.tolist()):
                with active_adapter(self.model, name):
                    fns.append((name, protonet(self.model, support_images, support_labels, n_way, scale)))

            def logits_fn(x: Tensor) -> Tensor:
                outs = []
                for name, fn in fns:
                    with active_adapter(self.model, name):
                        outs.append(fn(x))
                return torch.stack(outs).mean(0)

            yield logits_fn, TaskRecord()
            return
        zeta = self.coefficients(scores, params) if zeta is None else zeta
        coeffs = {n: float(z) for n, z in zip(self.names, zeta) if float(z) != 0.0}
        scale = float((zeta.double() * self.scales).sum())
        rho, group = (params.rho, params.trim_group) if self.rule == "ttm" else (1.0, "none")
        with merged_task(self.model, coeffs, rho, group, self.cfg.trim_method):
            yield protonet(self.model, support_images, support_labels, n_way, scale), TaskRecord(zeta.tolist())

    @contextmanager
    def adapt(self, support_images: Tensor, support_labels: Tensor, n_way: int,
              generator: torch.Generator) -> Iterator[tuple[LogitsFn, TaskRecord]]:
        scores = (self.scores(support_images, support_labels, n_way, generator, self.params.adv_weight > 0)
                  if self.rule in ("ttm", "min_support_ce") else None)
        zeta = (self.classifier_zeta(support_images, support_labels, generator)
                if self.rule == "linear_classifier" else None)
        with self.adapt_with(support_images, support_labels, n_way, scores, self.params, zeta) as out:
            yield out

    def tune(self, tasks: Sequence[Episode], rng: TaskRng) -> dict:
        """Rule "ttm": choose (γ, λ, β, ρ, trimmed group) on ``tasks`` by ``merge.objective``: mean clean accuracy,
        robust accuracy under :func:`amt.merge.short_attack`, (1 − w)·clean + w·robust, or the most robust
        point within ``clean_tolerance`` of the best clean accuracy. Member scores are computed once per task; ties
        keep the earliest grid point (γ = 0 and no trimming first)."""
        info: dict = {"rule": self.rule, "members": list(self.names)}
        if self.rule != "ttm":
            return info
        if len(self.grid) == 1:
            self.params = self.grid[0]
            return info | {"chosen": self.params.as_dict()}
        _require_tasks(tasks, "the merge hyper-parameters", len(self.grid))
        adversarial = any(p.adv_weight > 0 for p in self.grid)
        objective, w = self.cfg.objective, self.cfg.robust_weight
        attack = short_attack(self.attack, self.cfg.select_steps) if objective != "clean" else None

        def grid_accuracies(t: int, e: Episode) -> list[float]:
            gen = rng(t)
            scores = self.scores(e.support_images, e.support_labels, e.n_way, gen, adversarial)
            accs = []  # clean accuracies, then (robust objectives) robust accuracies, per grid point
            for params in self.grid:
                with self.adapt_with(e.support_images, e.support_labels, e.n_way, scores, params) as (fn, _):
                    with torch.no_grad():
                        accs.append(accuracy(fn(e.query_images), e.query_labels))
                    if attack is not None:
                        robust = robust_under_pgd(attack, fn, e.query_images, e.query_labels, gen)
                        accs.append(100.0 * float(robust.float().mean()))
            return accs

        accs = validation_accuracies(tasks, grid_accuracies)
        clean, robust = (accs[0::2], accs[1::2]) if attack is not None else (accs, None)
        if objective == "clean":
            value = clean
        elif objective == "balance":
            value = (1 - w) * clean + w * robust
        elif objective == "constrained":  # the most robust point among those within the tolerance of the best clean
            value = torch.where(clean >= clean.max() - self.cfg.clean_tolerance, robust, torch.full_like(robust, -1.0))
        else:
            value = robust
        self.params = self.grid[int(torch.argmax(value))]  # first maximum
        validation = [{"params": p.as_dict(), "acc": float(clean[i]),
                       **({"robust_acc": float(robust[i]), "objective": float(value[i])} if robust is not None else {})}
                      for i, p in enumerate(self.grid)]
        trade = {"objective": objective, **({"robust_weight": w} if objective == "balance" else {}),
                 **({"clean_tolerance": self.cfg.clean_tolerance} if objective == "constrained" else {}),
                 **({"selection_attack": {"eps": attack.eps, "steps": attack.steps, "step_size": attack.step_size}}
                    if attack is not None else {})}
        return info | {"chosen": self.params.as_dict(), "selection": trade, "validation": validation}


# ----------------------------------------------------------------------------------------------
# Test-time fine-tuning on top of another method
# ----------------------------------------------------------------------------------------------


class FinetunedMethod(Method):
    """Wrap a single-model method (PM, PMF or a pool rule other than "logit_avg"): its per-task model, then
    fine-tuned on the support set (:func:`amt.finetune.finetuned`): ``tuned`` is what is trained (one of
    :data:`amt.finetune.TUNED`; its learning rates are ``cfg.lr_grid`` for "full", ``cfg.attnscale_lr_grid`` for
    "attnscale", ``cfg.lora_lr_grid`` for "lora"), ``adversarial`` switches on Adv. TTF."""

    def __init__(self, inner: BackboneMethod | PoolMethod, cfg: FinetuneConfig, augment: AugmentConfig,
                 tuned: str = "full", adversarial: bool = False) -> None:
        if isinstance(inner, PoolMethod) and inner.rule == "logit_avg":
            raise ValueError("test-time fine-tuning needs one model per task; rule 'logit_avg' has several")
        if tuned not in TUNED:
            raise ValueError(f"unknown fine-tuning target {tuned!r}; choose one of {TUNED}")
        self.inner, self.cfg, self.augment = inner, cfg, augment
        self.tuned, self.adversarial = tuned, adversarial
        self.model = inner.model
        grids = {"full": (cfg.lr_grid, cfg.lr), "attnscale": (cfg.attnscale_lr_grid, cfg.attnscale_lr),
                 "lora": (cfg.lora_lr_grid, cfg.lora_lr)}
        self.lr_grid, default = tuple(grids[tuned][0]), grids[tuned][1]
        self.lr = self.lr_grid[0] if self.lr_grid else default

    @property
    def tunable(self) -> bool:
        return self.inner.tunable or len(self.lr_grid) > 1

    @property
    def pool_names(self) -> tuple[str, ...]:
        return self.inner.pool_names

    @contextmanager
    def adapt(self, support_images: Tensor, support_labels: Tensor, n_way: int,
              generator: torch.Generator) -> Iterator[tuple[LogitsFn, TaskRecord]]:
        with self.inner.adapt(support_images, support_labels, n_way, generator) as (fn, record):
            scale = fn.scale  # a single model's ProtoNet ("logit_avg" is refused at construction)
            with finetuned(self.model, support_images, support_labels, n_way, self.cfg, self.lr, self.augment,
                           generator, scale, self.tuned, self.adversarial):
                record.extra["finetune_lr"] = self.lr
                yield protonet(self.model, support_images, support_labels, n_way, scale), record

    def tune(self, tasks: Sequence[Episode], rng: TaskRng) -> dict:
        """The inner method's settings first, then the learning rate from ``lr_grid`` (first maximum)."""
        info = self.inner.tune(tasks, rng)
        grid = list(self.lr_grid)
        if len(grid) <= 1:
            return info | {"finetune": {"chosen_lr": self.lr}}
        _require_tasks(tasks, "the fine-tuning learning rate", len(grid))

        def lr_accuracies(t: int, e: Episode) -> list[float]:
            accs = []
            for lr in grid:
                self.lr = lr
                with self.adapt(e.support_images, e.support_labels, e.n_way, rng(t)) as (fn, _):
                    with torch.no_grad():
                        accs.append(accuracy(fn(e.query_images), e.query_labels))
            return accs

        accs = validation_accuracies(tasks, lr_accuracies)
        self.lr = grid[int(torch.argmax(accs))]
        return info | {"finetune": {"chosen_lr": self.lr,
                                    "lr_validation": [{"lr": lr, "acc": float(a)} for lr, a in zip(grid, accs)]}}
