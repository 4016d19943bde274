"""PNG figures of a results file: accuracy against ε, per corruption, singular-value spectra, merge coefficients.

matplotlib is imported only inside the figure functions (the Agg canvas, no pyplot state). Accuracies in %.
"""

from __future__ import annotations

import math
from pathlib import Path

from amt.results import condition_of, domains_of, mean_std, select, tuned
from amt.rundir import atomic_write

FIGURES = ("accuracy_vs_eps.png", "corruptions.png", "spectra.png", "merge_coefficients.png")


def _figure(n_rows: int, n_cols: int, width: float = 4.5, height: float = 3.2):
    """A matplotlib Figure on an Agg canvas (no pyplot, no global state) and its axes grid [n_rows][n_cols]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n_cols, height * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(n_rows, n_cols, squeeze=False)


def _legend(fig, title: str) -> None:
    """One legend for the whole figure (each label once, from all panels) below the panels, under ``title``."""
    entries = {label: h for ax in fig.axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.suptitle(title)
    fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncols=min(len(entries), 5),
               fontsize="small")


def _domain_avg(rows: list[dict], in_domain: bool, domains: dict[str, bool]) -> float:
    """Mean over domains (of one kind) of each domain's mean row accuracy (%); NaN when none."""
    by_domain: dict[str, list[float]] = {}
    for r in rows:
        if domains[r["domain"]] == in_domain:
            by_domain.setdefault(r["domain"], []).append(r["mean"])
    means = [sum(v) / len(v) for v in by_domain.values()]
    return sum(means) / len(means) if means else float("nan")


def _eps_figure(results: dict):
    """Accuracy (%) against ε, clean as ε = 0: one panel per (norm, shot) × (ID, OOD), one line per method."""
    adv = [r for r in results["results"] if condition_of(r) == "adversarial"
           and r["attack"].get("role", "headline") in ("headline", "sweep", "l2")]
    if not adv:
        return None
    clean, domains = select(results, "clean"), domains_of(results["results"])
    norms, shots = dict.fromkeys(r["attack"]["norm"] for r in adv), sorted({r["n_shot"] for r in adv})
    panels = [(n, s) for n in norms for s in shots]
    kinds = [k for k in (True, False) if k in {domains[r["domain"]] for r in adv}]
    fig, axes = _figure(len(panels), len(kinds))
    for (norm, shot), row in zip(panels, axes):
        scale = 255 if norm == "linf" else 1
        for kind, ax in zip(kinds, row):
            for method in dict.fromkeys(r["method"] for r in adv):
                points = {0.0: [r for r in clean if r["method"] == method and r["n_shot"] == shot]}
                for r in adv:
                    if (r["method"], r["n_shot"], r["attack"]["norm"]) == (method, shot, norm):
                        points.setdefault(round(r["attack"]["eps"] * scale, 6), []).append(r)
                xs = sorted(x for x, rs in points.items() if rs)
                ax.plot(xs, [_domain_avg(points[x], kind, domains) for x in xs], marker="o", label=method)
            ax.set(title=f"{norm} PGD, {results['protocol']['n_way']}w{shot}s, {'ID' if kind else 'OOD'} avg",
                   xlabel="ε (×1/255, pixels in [0, 1])" if norm == "linf" else "ε (ℓ2, pixels in [0, 1])",
                   ylabel="accuracy (%)")
    _legend(fig, "Accuracy under PGD against ε (ε = 0: clean), mean over domains")
    return fig


def _corruption_figure(results: dict):
    """Per (ID/OOD, shot): accuracy (%) per corruption (bars, mean over severities) and against severity."""
    rows = [r for r in results["results"] if condition_of(r) == "corruption"]
    if not rows:
        return None
    domains = domains_of(results["results"])
    panels = [(k, s) for k in (False, True) if k in {domains[r["domain"]] for r in rows}
              for s in sorted({r["n_shot"] for r in rows})]
    names = list(dict.fromkeys(r["corruption"]["name"] for r in rows))
    severities = sorted({r["corruption"]["severity"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    fig, axes = _figure(len(panels), 2, width=max(5.0, 0.45 * len(names) * len(methods) ** 0.5))
    for (kind, shot), (bars, lines) in zip(panels, axes):
        label = f"{results['protocol']['n_way']}w{shot}s, {'ID' if kind else 'OOD'}"
        for k, method in enumerate(methods):
            mine = [r for r in rows if r["method"] == method and r["n_shot"] == shot]
            bars.bar([i - 0.4 + (k + 0.5) * width for i in range(len(names))],
                     [_domain_avg([r for r in mine if r["corruption"]["name"] == n], kind, domains) for n in names],
                     width, label=method)
            lines.plot(severities, [_domain_avg([r for r in mine if r["corruption"]["severity"] == s], kind, domains)
                                    for s in severities], marker="o", label=method)
        bars.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize="small")
        bars.set(title=f"{label}: per corruption", ylabel="accuracy (%), mean over severities")
        lines.set(title=f"{label}: against severity", xlabel="severity", ylabel="accuracy (%), mean over corruptions")
        lines.set_xticks(severities)
    _legend(fig, "Accuracy on corrupted queries, mean over domains")
    return fig


def _spectra_figure(results: dict):
    """Singular values (log scale) against their index, one panel per layer, one line per label (paper Fig. 2/3)."""
    spectra = results.get("spectra") or {}
    layers = list(dict.fromkeys(layer for per in spectra.values() for layer in per))
    if not layers:
        return None
    n_cols = min(3, len(layers))
    fig, axes = _figure(math.ceil(len(layers) / n_cols), n_cols)
    flat = [ax for row in axes for ax in row]
    for layer, ax in zip(layers, flat):
        for label, per in spectra.items():
            if layer in per:
                ax.plot(range(1, len(per[layer]) + 1), per[layer], label=label)
        ax.set_yscale("log")
        ax.set(title=layer, xlabel="singular value index (descending)", ylabel="singular value")
    for ax in flat[len(layers):]:
        ax.set_visible(False)
    _legend(fig, "Singular values of weight matrices")
    return fig


def _merge_figure(results: dict):
    """Per merged method and domain: mean merge coefficient per member (bars per shot, error bars: std over tasks)."""
    panels: dict[tuple[str, str], dict[str, dict]] = {}
    for method, domain, shot, info in tuned(results):
        if info.get("coefficients"):
            panels.setdefault((method, domain), {})[shot] = info
    if not panels:
        return None
    n_cols = min(3, len(panels))
    fig, axes = _figure(math.ceil(len(panels) / n_cols), n_cols)
    flat = [ax for row in axes for ax in row]
    for ((method, domain), per_shot), ax in zip(panels.items(), flat):
        shots = list(per_shot)
        n_members = max(len(c) for info in per_shot.values() for c in info["coefficients"])
        members = (per_shot[shots[0]].get("members") or [])[:n_members] or [f"member{i}" for i in range(n_members)]
        width = 0.8 / len(shots)
        for k, shot in enumerate(shots):
            means, stds = zip(*(mean_std(col) for col in zip(*per_shot[shot]["coefficients"])))
            ax.bar([i - 0.4 + (k + 0.5) * width for i in range(len(means))], means, width, yerr=stds, capsize=3,
                   label=f"{results['protocol']['n_way']}w{shot}s")
        ax.set_xticks(range(len(members)), members, rotation=30, ha="right", fontsize="small")
        ax.set(title=f"{method}: {domain}", xlabel="pool member", ylabel="merge coefficient")
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    _legend(fig, "Merge coefficient per pool member (bars: mean, error bars: std over test tasks)")
    return fig


def _save(fig, path: Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically and free it."""
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        fig.clear()
    return path


def figures(results: dict, out_dir: str | Path) -> list[Path]:
    """Write the PNG figures whose data is present (see FIGURES) into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    draw = (_eps_figure, _corruption_figure, _spectra_figure, _merge_figure)
    written = []
    for name, make in zip(FIGURES, draw):
        fig = make(results)
        if fig is not None:
            written.append(_save(fig, out_dir / name))
    return written
