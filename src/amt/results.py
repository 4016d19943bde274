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


VWVS = "vwvs"  # the shot cell of variable-way variable-shot tasks (``eval.episodes: variable``), in place of a K


def cell_label(n_way, n_shot) -> str:
    """A shot cell's name in tables: "5w1s" for 5-way 1-shot tasks, "vwvs" for variable-way variable-shot ones."""
    return VWVS if n_shot == VWVS else f"{n_way}w{n_shot}s"


def shot_order(n_shot) -> tuple[int, int]:
    """Sort key of shot cells: K = 1, 5, ... in order (also as text, the keys of ``tuning``), then "vwvs"."""
    return (1, 0) if n_shot == VWVS else (0, int(n_shot))


def shots_of(rows) -> list:
    """The shot cells of some rows, in :func:`shot_order`."""
    return sorted({r["n_shot"] for r in rows}, key=shot_order)


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
            for d, per_shot in per_domain.items() for shot, info in sorted(per_shot.items(),
                                                                          key=lambda kv: shot_order(kv[0]))]


def spectral_change(layer: dict) -> float:
    """Mean change of a layer's top-k singular values from the pre-trained weights, (1/k) Σ_j (σ_j(W) − σ_j(W₀)),
    in the weights' units (an entry of ``results["spectra"][method]["layers"]``, :mod:`amt.spectra`)."""
    pairs = list(zip(layer["tuned"], layer["pretrained"]))
    return sum(a - b for a, b in pairs) / len(pairs)
