"""Reading a results file (``results.json`` of ``amt evaluate``): validation, and selecting its rows.

Pure Python (no torch): tables (:mod:`amt.report`) and figures (:mod:`amt.figures`) are rendered from the file alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

CONDITIONS = ("clean", "adversarial", "autoattack", "corruption")


ROW_KEYS = ("method", "domain", "in_domain", "n_shot", "mean", "ci95")


MISSING = "—"


def load_results(path: str | Path) -> dict:
    """Read a results file; ValueError naming the file and the key when a required key is missing."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("protocol", "results"):
        if not isinstance(results, dict) or key not in results:
            raise ValueError(f"{path}: missing top-level key {key!r}; is this a results.json from `amt evaluate`?")
    for i, row in enumerate(results["results"]):
        extra = {"adversarial": ("attack",), "corruption": ("corruption",)}.get(condition_of(row), ())
        for key in (*ROW_KEYS, *extra):
            if key not in row:
                raise ValueError(f"{path}: results[{i}] lacks key {key!r}")
    if "n_way" not in results["protocol"]:
        raise ValueError(f"{path}: missing key 'protocol.n_way'")
    return results


def condition_of(row: dict) -> str:
    """A row's condition: "clean" (also when the key is missing), "adversarial" or "corruption"."""
    return row.get("condition", "clean")


def mean_std(values) -> tuple[float, float]:
    """Mean and population standard deviation (same unit as the values); NaN for none."""
    xs = [float(v) for v in values]
    if not xs:
        return float("nan"), float("nan")
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))


def select(results: dict, cond: str, n_shot: int | None = None) -> list[dict]:
    """Rows of one condition (adversarial: the headline attack only), of one shot unless ``n_shot`` is None."""
    rows = [r for r in results["results"] if condition_of(r) == cond and n_shot in (None, r["n_shot"])]
    return [r for r in rows if r["attack"].get("headline")] if cond == "adversarial" else rows


def domains_of(rows) -> dict[str, bool]:
    """Domain → in-domain flag, in order of first appearance."""
    return {r["domain"]: r["in_domain"] for r in rows}


def tuned(results: dict) -> list[tuple[str, str, str, dict]]:
    """(method, domain, shot, info) of every tuning record (``results["tuning"][method][domain][shot]``)."""
    return [(m, d, shot, info) for m, per_domain in (results.get("tuning") or {}).items()
            for d, per_shot in per_domain.items() for shot, info in sorted(per_shot.items(), key=lambda kv: int(kv[0]))]
