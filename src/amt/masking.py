"""Gradient-masking checks from per-task accuracies (Athalye et al. 2018; Carlini et al. 2019; RobustBench).

A defence that hides its gradient looks robust to gradient attacks without being so. Each check compares
conditions measured on the same first tasks (:class:`amt.config.MaskingConfig`); a flag set to true is a
sign of masking (or of too few tasks, within ``tolerance`` accuracy points):

- ``rises_with_eps``: ℓ∞ robust accuracy goes up as ε grows (clean at ε = 0, the sweep, the headline, the
  large radius);
- ``not_zero_at_large_eps``: robust accuracy at ``large_eps`` is not near 0;
- ``more_steps_help``: PGD with ``many_steps`` steps finds *higher* robust accuracy than the headline attack;
- ``black_box_stronger``: the black-box Square attack finds lower robust accuracy than the white-box attacks;
- ``zero_gradients``: some query has an all-zero input gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from amt.config import MaskingConfig

if TYPE_CHECKING:
    from amt.conditions import Condition


def masking_flags(per_condition: Mapping[Condition, Sequence[float]], cfg: MaskingConfig) -> dict:
    """Flags and the accuracies they compare (%, means over the first tasks every compared condition has).

    ``per_condition`` maps each condition of one method, domain and shot to its per-task values in task order.
    Returns ``{"flags": {name: bool}, "accuracy": {label: float}, "n_tasks": int, "masking": bool}``.
    """
    by_role = {c.role or c.kind: c for c in per_condition if per_condition[c]}
    linf = sorted((c.attack.eps, c) for c in per_condition if per_condition[c] and c.kind == "adversarial"
                  and c.attack.norm == "linf" and c.role in ("headline", "sweep", "large_eps"))
    compared = [c for _, c in linf] + [by_role[r] for r in ("clean", "many_steps", "square", "autoattack",
                                                           "gradient") if r in by_role]
    n = min([cfg.n_tasks] + [len(per_condition[c]) for c in compared])

    def acc(c: Condition) -> float:
        values = list(per_condition[c])[:n]
        return sum(values) / len(values)

    tol = cfg.tolerance
    series = [acc(by_role["clean"])] + [acc(c) for _, c in linf]
    white = [acc(by_role[r]) for r in ("headline", "autoattack") if r in by_role]
    flags = {
        "rises_with_eps": any(b > a + tol for a, b in zip(series, series[1:])),
        "not_zero_at_large_eps": "large_eps" in by_role and acc(by_role["large_eps"]) > tol,
        "more_steps_help": "many_steps" in by_role and "headline" in by_role
        and acc(by_role["many_steps"]) > acc(by_role["headline"]) + tol,
        "black_box_stronger": "square" in by_role and bool(white) and acc(by_role["square"]) < min(white) - tol,
        "zero_gradients": "gradient" in by_role and min(list(per_condition[by_role["gradient"]])[:n]) < 100.0,
    }
    labels = {"clean": by_role["clean"], **{f"linf {eps * 255:.3g}/255 ({c.role})": c for eps, c in linf},
              **{r: by_role[r] for r in ("many_steps", "square", "autoattack", "gradient") if r in by_role}}
    accuracy = {label: acc(c) for label, c in labels.items()}
    return {"flags": flags, "accuracy": accuracy, "n_tasks": n, "masking": any(flags.values())}
