"""PNG figures of a results file: accuracy against ε, per corruption, per-layer change of the top singular values
from the pre-trained weights (paper Figs. 2–3), merge coefficients.

matplotlib is imported only inside the figure functions (the Agg canvas, no pyplot state). Accuracies in %.
"""

from __future__ import annotations

import math
from pathlib import Path

from amt.results import cell_label, condition_of, domains_of, mean_std, select, shots_of, spectral_change, tuned
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
    norms, shots = dict.fromkeys(r["attack"]["norm"] for r in adv), shots_of(adv)
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
            ax.set(title=f"{norm} PGD, {cell_label(results['protocol']['n_way'], shot)}, {'ID' if kind else 'OOD'} avg",
                   xlabel="ε (×1/255, pixels in [0, 1])" if norm == "linf" else "ε (ℓ2, pixels in [0, 1])",
                   ylabel="accuracy (%)")
    _legend(fig, "Accuracy under PGD against ε (ε = 0: clean), mean over domains")
    return fig


def _corruption_figure(results: dict):
    """Per (ID/OOD, shot): accuracy (%) per corruption (bars, mean over severities) and, when several severities
    were evaluated, against severity (mean over corruptions)."""
    rows = [r for r in results["results"] if condition_of(r) == "corruption"]
    if not rows:
        return None
    domains = domains_of(results["results"])
    panels = [(k, s) for k in (False, True) if k in {domains[r["domain"]] for r in rows}
              for s in shots_of(rows)]
    names = list(dict.fromkeys(r["corruption"]["name"] for r in rows))
    severities = sorted({r["corruption"]["severity"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    against = len(severities) > 1  # one severity: a single point per line says nothing against severity
    fig, axes = _figure(len(panels), 1 + against, width=max(5.0, 0.45 * len(names) * len(methods) ** 0.5))
    for (kind, shot), (bars, *lines) in zip(panels, axes):
        label = f"{cell_label(results['protocol']['n_way'], shot)}, {'ID' if kind else 'OOD'}"
        for k, method in enumerate(methods):
            mine = [r for r in rows if r["method"] == method and r["n_shot"] == shot]
            bars.bar([i - 0.4 + (k + 0.5) * width for i in range(len(names))],
                     [_domain_avg([r for r in mine if r["corruption"]["name"] == n], kind, domains) for n in names],
                     width, label=method)
            for ax in lines:
                ax.plot(severities, [_domain_avg([r for r in mine if r["corruption"]["severity"] == s], kind, domains)
                                     for s in severities], marker="o", label=method)
        bars.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize="small")
        bars.set(title=f"{label}: per corruption",
                 ylabel="accuracy (%)" + (", mean over severities" if against else ""))
        for ax in lines:
            ax.set(title=f"{label}: against severity", xlabel="severity", ylabel="accuracy (%), mean over corruptions")
            ax.set_xticks(severities)
    at = "" if against else f" (severity {severities[0]})"
    _legend(fig, f"Accuracy on corrupted queries{at}, mean over domains")
    return fig


def _spectra_figure(results: dict):
    """Per layer kind (mlp.fc1, mlp.fc2, attn.proj): the mean change of the top-k singular values from the
    pre-trained weights, (1/k) Σ_j (σ_j(W) − σ_j(W₀)), against the block index, one line per method (paper
    Figs. 2–3; a pool at its uniform merge, :mod:`amt.spectra`). Results without per-layer spectra draw nothing."""
    spectra = {m: per for m, per in (results.get("spectra") or {}).items()
               if isinstance(per, dict) and per.get("layers")}
    kinds = sorted({layer["kind"] for per in spectra.values() for layer in per["layers"].values()},
                   key=lambda k: (not k.startswith("mlp."), k))  # the FFN (Fig. 2), then attention (Fig. 3)
    if not kinds:
        return None
    fig, axes = _figure(1, len(kinds))
    for kind, ax in zip(kinds, axes[0]):
        for method, per in spectra.items():
            points = sorted((layer["block"], spectral_change(layer)) for layer in per["layers"].values()
                            if layer["kind"] == kind)
            ax.plot([b + 1 for b, _ in points], [c for _, c in points], marker="o", label=method)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set(title=kind, xlabel="block (1 = first)", ylabel="mean Δσ of the top singular values")
        ax.xaxis.get_major_locator().set_params(integer=True)
    tops = sorted({per["top"] for per in spectra.values()})
    _legend(fig, f"Change of the top {'/'.join(map(str, tops))} singular values from the pre-trained weights, "
                 "(1/k) Σ_j σ_j(W) − σ_j(W₀) (pools: uniform merge)")
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
                   label=cell_label(results["protocol"]["n_way"], shot))
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
