"""The conditions a per-task model is measured under, and how each is measured on one task.

A :class:`Condition` says how the queries are presented — clean, attacked (PGD with the worst case over
iterates and restarts; AutoAttack; the black-box Square check), corrupted — and on which tasks (the first
``n_tasks`` of the stream) and for which methods. :func:`measure` returns, for one task, the percentage of
queries classified correctly (for ``"gradient"``: the percentage of queries whose input gradient is non-zero).

Worst case (RobustBench's rule): under an attack, a query counts as robust only if the model classifies it
correctly at *every* point the attack evaluated — the random start and every iterate of every restart, and
the final images — not only at the last iterate of one run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from amt.attacks import robust_under_pgd
from amt.config import AttackConfig, AutoAttackConfig, EvalConfig, MaskingConfig
from amt.data.episodes import Episode
from amt.methods import LogitsFn, accuracy

log = logging.getLogger(__name__)

KINDS = ("clean", "adversarial", "autoattack", "corruption", "gradient")


@dataclass(frozen=True)
class Condition:
    """One way of presenting the queries of the first ``n_tasks`` tasks to the methods in ``methods``."""

    kind: str  # one of KINDS
    n_tasks: int  # evaluated on tasks t < n_tasks
    role: str = ""  # adversarial: "headline" | "sweep" | "l2" | "large_eps" | "many_steps" | "square"
    attack: AttackConfig | None = None  # adversarial; autoattack: its radius (ℓ∞ eps)
    autoattack: AutoAttackConfig | None = None
    corruption: str | None = None
    severity: int = 0
    methods: tuple[str, ...] = ()  # methods measured; () = every method
    queries: int = 0  # the Square check: queries of the black-box attack
    shots: tuple[int, ...] = ()  # shot settings it is measured in; () = every shot cell, "vwvs" included

    def key(self) -> tuple:
        """Identity of the condition inside one evaluation (JSON-safe parts)."""
        a = self.attack
        attack = (a.norm, round(a.eps, 10), a.steps, a.restarts) if a is not None else None
        return (self.kind, self.role, attack, self.queries, self.corruption, self.severity)

    def applies_to(self, method: str, t: int) -> bool:
        return t < self.n_tasks and (not self.methods or method in self.methods)

    def in_shot(self, n_shot: int | str) -> bool:
        """Whether it is measured in shot cell ``n_shot`` (the variable-way cell "vwvs" only when ``shots`` is ())."""
        return not self.shots or n_shot in self.shots

    def describe(self) -> dict:
        """The condition's fields of a results row."""
        row: dict = {"condition": self.kind}
        if self.kind in ("adversarial", "autoattack"):
            a = self.attack
            row["attack"] = {"name": self.attack_name(), "role": self.role, "norm": a.norm, "eps": a.eps,
                             "step_size": a.step_size, "steps": a.steps, "restarts": a.restarts,
                             "objective": a.objective, "headline": self.role == "headline"}
            if self.kind == "autoattack":
                row["attack"].update(steps=self.autoattack.steps, restarts=self.autoattack.restarts,
                                     step_size=None, objective=None)
            if self.role == "square":
                row["attack"].update(steps=None, restarts=1, step_size=None, objective="margin",
                                     queries=self.queries)
        if self.kind == "corruption":
            row["corruption"] = {"name": self.corruption, "severity": self.severity}
        return row

    def attack_name(self) -> str:
        if self.kind == "autoattack":
            return f"autoattack-{self.autoattack.version}"
        return "square" if self.role == "square" else "pgd"


def conditions(cfg: EvalConfig, attack: AttackConfig | None, autoattack: AutoAttackConfig | None = None,
               masking: MaskingConfig | None = None, method_names: Sequence[str] = ()) -> list[Condition]:
    """Every condition of the protocol, in reporting order.

    The ε sweep and ℓ2 attacks reuse the headline attack's settings with their own radius and step
    ``ratio · ε`` (``sweep_step_ratio``, ``l2_step_ratio``). AutoAttack runs at the headline ℓ∞ radius. The
    gradient-masking checks (``masking.n_tasks > 0``) add: PGD at ``large_eps``, PGD with ``many_steps``,
    the black-box Square attack, and the input-gradient check, on the first ``masking.n_tasks`` tasks. AutoAttack
    and the masking checks run in the shot settings of their ``shots`` (every shot when empty).
    """
    out = [Condition("clean", cfg.n_tasks)]
    if attack is not None and cfg.adversarial:
        n_adv, n_sweep = min(cfg.adv_tasks, cfg.n_tasks), min(cfg.sweep_tasks, cfg.n_tasks)
        out.append(Condition("adversarial", n_adv, "headline", attack))
        for eps in cfg.eps_sweep:
            if not math.isclose(eps, attack.eps) or attack.norm != "linf":
                sweep = dataclasses.replace(attack, norm="linf", eps=eps, step_size=cfg.sweep_step_ratio * eps)
                out.append(Condition("adversarial", n_sweep, "sweep", sweep))
        for eps in cfg.l2_eps:
            l2 = dataclasses.replace(attack, norm="l2", eps=eps, step_size=cfg.l2_step_ratio * eps)
            out.append(Condition("adversarial", n_sweep, "l2", l2))
        if autoattack is not None and autoattack.version != "none" and attack.norm == "linf":
            fewest, key = ((cfg.variable.min_ways, "eval.variable.min_ways") if cfg.episodes == "variable"
                           else (cfg.n_way, "eval.n_way"))
            if fewest < 4:
                raise ValueError(f"AutoAttack's targeted attacks need n_way >= 4 ({key}={fewest}); set "
                                 "autoattack.version=none")
            named = tuple(m for m in autoattack.methods if not method_names or m in method_names)
            if autoattack.methods and len(named) < len(autoattack.methods):
                log.warning("autoattack.methods: %s are not evaluated here; AutoAttack runs on %s",
                            sorted(set(autoattack.methods) - set(named)), list(named) or "no method")
            if named or not autoattack.methods:
                out.append(Condition("autoattack", min(autoattack.n_tasks, cfg.n_tasks), "autoattack", attack,
                                     autoattack, methods=named, shots=tuple(autoattack.shots)))
        if masking is not None and masking.n_tasks > 0:
            n = min(masking.n_tasks, cfg.n_tasks)
            large = dataclasses.replace(attack, norm="linf", eps=masking.large_eps, restarts=1,  # one run suffices
                                        step_size=cfg.sweep_step_ratio * masking.large_eps)
            shots = tuple(masking.shots)
            out += [Condition("adversarial", n, "large_eps", large, shots=shots),
                    Condition("adversarial", n, "many_steps", dataclasses.replace(attack, steps=masking.many_steps),
                              shots=shots),
                    Condition("adversarial", n, "square", attack, queries=masking.square_queries, shots=shots),
                    Condition("gradient", n, shots=shots)]
    for name in corruption_names(cfg.corruptions):
        for severity in cfg.severities:
            out.append(Condition("corruption", min(cfg.corruption_tasks, cfg.n_tasks), corruption=name,
                                 severity=severity))
    return out


def corruption_names(requested: Sequence[str]) -> list[str]:
    """The corruption names of ``eval.corruptions`` (``["all"]``: the 15 ImageNet-C corruptions)."""
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
    """The corrupted query images of task ``t`` for every corruption condition it takes part in (computed
    once and shared by every method)."""
    from amt.corruptions import corrupt

    out = {}
    for i, c in enumerate(conds):
        if c.kind == "corruption" and t < c.n_tasks:
            generator = task_generator(base_seed, t, 100 + i)
            out[c.key()] = corrupt(episode.query_images, c.corruption, c.severity, generator)
    return out


# ----------------------------------------------------------------------------------------------
# Measuring one task
# ----------------------------------------------------------------------------------------------


def nonzero_input_gradients(logits_fn: LogitsFn, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[Q]`` bool: whether the cross-entropy's gradient with respect to each clean query is non-zero."""
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(logits_fn(x), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad.flatten(1).abs().amax(1).cpu() > 0


def measure(c: Condition, logits_fn: LogitsFn, episode: Episode, t: int, base_seed: int, salt: int,
            corrupted: Mapping[tuple, torch.Tensor], model: nn.Module | None = None) -> float:
    """Percentage of task ``t``'s queries that count as correct under condition ``c`` (``"gradient"``: with a
    non-zero input gradient). ``salt`` makes the condition's randomness its own; ``model`` is the backbone."""
    q, y = episode.query_images, episode.query_labels
    if c.kind == "clean":
        with torch.no_grad():
            return accuracy(logits_fn(q), y)
    if c.kind == "corruption":
        with torch.no_grad():
            return accuracy(logits_fn(corrupted[c.key()]), y)
    if c.kind == "gradient":
        return _percent(nonzero_input_gradients(logits_fn, q, y))
    seed = int(torch.randint(2**31 - 1, (), generator=task_generator(base_seed, t, salt)))
    if c.kind == "autoattack":
        from amt.autoattack import autoattack

        return _percent(autoattack(logits_fn, q, y, episode.n_way, c.attack.eps, c.autoattack, seed, model).robust)
    if c.role == "square":
        from amt.autoattack import square

        return _percent(square(logits_fn, q, y, c.attack.eps, c.queries, seed, model))
    return _percent(robust_under_pgd(c.attack, logits_fn, q, y, task_generator(base_seed, t, salt)))


def _percent(correct: torch.Tensor) -> float:
    return 100.0 * float(correct.float().mean())
