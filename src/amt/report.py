"""Reports rendered from results files: Markdown/CSV tables shaped like the AMT paper's, and PNG figures.

Imports no torch, and matplotlib only inside the figure functions (the Agg canvas, no pyplot state), so a
report is re-made from ``results.json`` alone without re-running anything. Accuracies are in %; ε is in pixel
units of [0, 1] images (ℓ∞ ε is shown ×255).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from amt.rundir import atomic_write

CONDITIONS = ("clean", "adversarial", "corruption")
FIGURES = ("accuracy_vs_eps.png", "corruptions.png", "spectra.png", "merge_coefficients.png")
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


def _mean_std(values) -> tuple[float, float]:
    """Mean and population standard deviation (same unit as the values); NaN for none."""
    xs = [float(v) for v in values]
    if not xs:
        return float("nan"), float("nan")
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))


def mean_ci95(values) -> tuple[float, float]:
    """Mean and 95% CI half-width 1.96·σ/√T (population σ) of T per-task accuracies (%), as amt.evaluate's."""
    values = list(values)
    mean, std = _mean_std(values)
    return mean, 1.96 * std / math.sqrt(len(values)) if values else float("nan")


def markdown_table(results: dict) -> str:
    """Markdown table of the clean rows: one row per (method, shot), one column per domain plus averages.

    Cells are ``mean ± ci95`` in %. "ID avg" averages the in-domain columns, "OOD avg" the others.
    """
    rows = [r for r in results["results"] if condition_of(r) == "clean"]
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    in_domain = {r["domain"]: r["in_domain"] for r in rows}
    keys = list(dict.fromkeys((r["method"], r["n_shot"]) for r in rows))
    cell = {(r["method"], r["n_shot"], r["domain"]): r for r in rows}
    header = ["method", "shot", *[f"{d}{' (ID)' if in_domain[d] else ''}" for d in domains], "ID avg", "OOD avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, shot in keys:
        vals, row = {}, [method, f"{results['protocol']['n_way']}w{shot}s"]
        for d in domains:
            r = cell.get((method, shot, d))
            row.append(f"{r['mean']:.2f} ± {r['ci95']:.2f}" if r else "—")
            if r:
                vals[d] = r["mean"]
        for flag in (True, False):
            sel = [v for d, v in vals.items() if in_domain[d] == flag]
            row.append(f"{sum(sel) / len(sel):.2f}" if sel else "—")
        lines.append("| " + " | ".join(row) + " |")
    full = results["protocol"]["n_query"]
    notes = sorted({(r["domain"], r["n_shot"], r["n_query"]) for r in rows if r["n_query"] < full})
    for d, s, q in notes:
        lines.append(f"\n{d} {s}-shot: {q} queries per class (classes too small for {results['protocol']['n_query']}).")
    lines.append(f"\n{rows[0]['n_tasks'] if rows else 0} tasks per cell; ± is the 95% confidence interval.")
    return "\n".join(lines)


def training_table(manifest: dict) -> str:
    """Markdown table of a trained pool (``pool.json``): one row per member with its attack and end points."""
    lines = ["| member | attack ε (×255) | episodes | best val acc (episode) | kept: val acc (episode) | final loss "
             "| final CE | final KL | scale | seconds |", "|" + "---|" * 10]
    for m in manifest["members"]:
        attack = m.get("attack")
        if attack is None:
            eps = "clean"
        elif "strategy" in attack:
            eps = "random of " + ", ".join(f"{e * 255:.3g}" for e in attack["eps"])
        else:
            eps = f"{attack['eps'] * 255:.3g}"
        final = m.get("final") or {}
        best = m.get("best", {})
        kept = m.get("kept") or {}
        kept_acc = "—" if kept.get("val_acc") is None else f"{kept['val_acc']:.2f}"
        lines.append(
            f"| {m['name'] or 'backbone'} | {eps} | {m['episodes']}{'' if m.get('finished') else ' (unfinished)'} "
            f"| {best.get('val_acc', float('nan')):.2f} ({best.get('episode', '—')}) "
            f"| {kept_acc} ({kept.get('episode', '—')}) "
            f"| {final.get('loss', float('nan')):.3f} | {final.get('ce', float('nan')):.3f} "
            f"| {final.get('kl', float('nan')):.4f} | {m.get('scale', float('nan')):.2f} | {m.get('seconds', 0):.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- cells and averages


def _select(results: dict, cond: str, n_shot: int | None = None) -> list[dict]:
    """Rows of one condition (adversarial: the headline attack only), of one shot unless ``n_shot`` is None."""
    rows = [r for r in results["results"] if condition_of(r) == cond and n_shot in (None, r["n_shot"])]
    return [r for r in rows if r["attack"].get("headline")] if cond == "adversarial" else rows


def _per_task_mean(rows: list[dict]) -> list[float]:
    """Task t's accuracy (%) averaged over rows (corruption names × severities) of one method and domain."""
    lengths = {len(r["accuracies"]) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"corruption rows of {rows[0]['method']}/{rows[0]['domain']} have different task counts "
                         f"{sorted(lengths)}; per-task averaging needs the same tasks for every corruption")
    return [sum(accs) / len(rows) for accs in zip(*(r["accuracies"] for r in rows))]


def _cells(results: dict, cond: str, n_shot: int) -> dict[tuple[str, str], tuple[float, float]]:
    """(method, domain) → (mean, ci95) in %. A corruption cell averages each task over all corruption names and
    severities present, then takes the mean and CI over tasks."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in _select(results, cond, n_shot):
        groups.setdefault((r["method"], r["domain"]), []).append(r)
    if cond == "corruption":
        return {k: mean_ci95(_per_task_mean(rs)) for k, rs in groups.items()}
    return {k: (rs[0]["mean"], rs[0]["ci95"]) for k, rs in groups.items()}


def _domains(rows) -> dict[str, bool]:
    """Domain → in-domain flag, in order of first appearance."""
    return {r["domain"]: r["in_domain"] for r in rows}


def _avg(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _averages(cells: dict, method: str, domains: dict[str, bool]) -> list[float | None]:
    """[ID avg, OOD avg, all avg] of a method's cell means (%), None where no domain of that kind has a cell."""
    means = {d: cells[(method, d)][0] for d in domains if (method, d) in cells}
    return [_avg(v for d, v in means.items() if domains[d]), _avg(v for d, v in means.items() if not domains[d]),
            _avg(means.values())]


# ---------------------------------------------------------------- rendering


def _md_cell(c) -> str:
    if c is None:
        return MISSING
    if isinstance(c, tuple):
        return f"{c[0]:.2f} ± {c[1]:.2f}"
    return f"{c:.2f}" if isinstance(c, float) else str(c)


def _csv_cells(c, paired: bool) -> list[str]:
    values = [""] * (1 + paired) if c is None else list(c) if isinstance(c, tuple) else [c] + [""] * paired
    return [repr(float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v) for v in values]


def _render(header: list[str], rows: list[list], fmt: str, notes: list[str] = ()) -> str:
    """Markdown (``fmt="md"``, with notes below) or CSV (``fmt="csv"``; a ``mean ± ci95`` column becomes two)."""
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
        return "\n".join(lines + [f"\n{n}" for n in notes])
    if fmt != "csv":
        raise ValueError(f"fmt must be 'md' or 'csv', got {fmt!r}")
    paired = [any(isinstance(row[i], tuple) for row in rows) for i in range(len(header))]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([h for name, p in zip(header, paired) for h in ([f"{name} mean", f"{name} ci95"] if p else [name])])
    writer.writerows([v for c, p in zip(row, paired) for v in _csv_cells(c, p)] for row in rows)
    return out.getvalue()


def _attack_label(attack: dict) -> str:
    eps = f"{attack['eps'] * 255:.3g}/255" if attack["norm"] == "linf" else f"{attack['eps']:.3g}"
    return f"{attack['norm']} ε = {eps}, {attack.get('steps', '?')} steps"


def _corruption_label(rows: list[dict]) -> str:
    names = {r["corruption"]["name"] for r in rows}
    severities = sorted({r["corruption"]["severity"] for r in rows})
    return f"mean over {len(names)} corruptions × severities {severities}; CI over per-task means"


def _notes(rows: list[dict], cond: str) -> list[str]:
    tasks = sorted({r.get("n_tasks", len(r.get("accuracies", []))) for r in rows})
    notes = [f"{'/'.join(map(str, tasks))} tasks per cell; ± is the 95% confidence interval; accuracy in %."]
    if cond == "adversarial" and rows:
        notes.insert(0, "Attack: PGD " + _attack_label(rows[0]["attack"]) + ".")
    if cond == "corruption" and rows:
        notes.insert(0, "Corruptions: " + _corruption_label(rows) + ".")
    return notes


def condition_table(results: dict, condition: str, n_shot: int, fmt: str = "md") -> str:
    """Paper-style table of one condition ("clean", "adversarial" = headline attack, "corruption") and shot.

    Rows are methods (first appearance), columns the domains (in-domain ones marked "(ID)") and the ID / OOD /
    all averages of the domain means. Cells are ``mean ± ci95`` in % (CSV: separate mean and ci95 columns).
    """
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    rows = _select(results, condition, n_shot)
    cells, domains = _cells(results, condition, n_shot), _domains(rows)
    methods = list(dict.fromkeys(m for m, _ in cells))
    header = ["method", *[f"{d} (ID)" if flag else d for d, flag in domains.items()], "ID avg", "OOD avg", "all avg"]
    table = [[m, *[cells.get((m, d)) for d in domains], *_averages(cells, m, domains)] for m in methods]
    return _render(header, table, fmt, _notes(rows, condition))


def main_table(results: dict, fmt: str = "md") -> str:
    """Summary: one row per (method, shot) like "5w1s", columns Clean / PGD / Corr × ID / OOD: averages (%) over
    the domains of each kind of the per-condition cells; "—" where absent."""
    n_way = results["protocol"]["n_way"]
    keys = sorted(dict.fromkeys((r["method"], r["n_shot"]) for r in results["results"]), key=lambda k: k[1])
    cells = {(c, s): _cells(results, c, s) for c in CONDITIONS for s in {s for _, s in keys}}
    domains = _domains(results["results"])
    header = ["method", "shot", "Clean ID", "Clean OOD", "PGD ID", "PGD OOD", "Corr ID", "Corr OOD"]
    table = [[m, f"{n_way}w{s}s", *[v for c in CONDITIONS for v in _averages(cells[(c, s)], m, domains)[:2]]]
             for m, s in keys]
    notes = ["Accuracy (%) averaged over in-domain (ID) and out-of-domain (OOD) domains."]
    if adv := _select(results, "adversarial"):
        notes.append("PGD: " + _attack_label(adv[0]["attack"]) + ".")
    if corr := _select(results, "corruption"):
        notes.append("Corr: " + _corruption_label(corr) + ".")
    return _render(header, table, fmt, notes)


def _tuned(results: dict) -> list[tuple[str, str, str, dict]]:
    """(method, domain, shot, info) of every tuning record (``results["tuning"][method][domain][shot]``)."""
    return [(m, d, shot, info) for m, per_domain in (results.get("tuning") or {}).items()
            for d, per_shot in per_domain.items() for shot, info in sorted(per_shot.items(), key=lambda kv: int(kv[0]))]


def merge_table(results: dict, fmt: str = "md") -> str:
    """Settings chosen on validation tasks per tuned method, domain and shot (merge hyper-parameters, fine-tuning
    learning rate), with the chosen setting's validation accuracy (%)."""
    header = ["method", "domain", "shot", "rule", "chosen", "validation acc", "validation tasks"]
    table = []
    for method, domain, shot, info in _tuned(results):
        chosen = dict(info.get("chosen") or {})
        acc = [v["acc"] for v in info.get("validation", []) if v.get("params") == chosen]
        ft = info.get("finetune") or {}
        if "chosen_lr" in ft:
            chosen["finetune_lr"] = ft["chosen_lr"]
            acc = acc or [v["acc"] for v in ft.get("lr_validation", []) if v.get("lr") == ft["chosen_lr"]]
        table.append([method, domain, shot, info.get("rule") or MISSING,
                      ", ".join(f"{k}={v}" for k, v in chosen.items()) or MISSING,
                      float(acc[0]) if acc else None, info.get("validation_tasks", MISSING)])
    return _render(header, table, fmt)


# ---------------------------------------------------------------- figures


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
    avg = _avg(sum(v) / len(v) for v in by_domain.values())
    return float("nan") if avg is None else avg


def _eps_figure(results: dict):
    """Accuracy (%) against ε, clean as ε = 0: one panel per (norm, shot) × (ID, OOD), one line per method."""
    adv = [r for r in results["results"] if condition_of(r) == "adversarial"]
    if not adv:
        return None
    clean, domains = _select(results, "clean"), _domains(results["results"])
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
    domains = _domains(results["results"])
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
    for method, domain, shot, info in _tuned(results):
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
            means, stds = zip(*(_mean_std(col) for col in zip(*per_shot[shot]["coefficients"])))
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


# ---------------------------------------------------------------- whole report


def _tables(results: dict) -> dict[str, str]:
    """CSV file name → CSV text, and "report.md" → Markdown, for every condition and shot present."""
    p = results["protocol"]
    files = {"main.csv": main_table(results, "csv")}
    md = [f"# Results\n\nProtocol: {p['n_way']}-way, {p.get('n_query', '?')} queries per class, "
          f"{p.get('n_tasks', '?')} tasks, seed {p.get('seed', '?')}.\n", "## Summary\n", main_table(results), ""]
    for cond in CONDITIONS:
        for shot in sorted({r["n_shot"] for r in _select(results, cond)}):
            name = f"{cond}_{shot}shot.csv"
            files[name] = condition_table(results, cond, shot, "csv")
            md += [f"## {cond.capitalize()}, {p['n_way']}-way {shot}-shot ([CSV]({name}))\n",
                   condition_table(results, cond, shot), ""]
    if results.get("tuning"):
        md += ["## Settings chosen on validation tasks (per domain and shot)\n", merge_table(results), ""]
    files["report.md"] = "\n".join(md)
    return files


def render_report(results_path: str | Path, out_dir: str | Path) -> str:
    """Render ``report.md``, ``main.csv``, ``<condition>_<shot>shot.csv`` and the figures of a results file into
    ``out_dir``; return the main table's Markdown. Everything is rendered into a staging folder first and then
    moved with os.replace, so a failed render leaves an earlier report intact; stale figures/CSVs are removed."""
    results = load_results(results_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        texts = _tables(results)
        pngs = [p.name for p in figures(results, stage)]
        if pngs:
            texts["report.md"] += "\n## Figures\n\n" + "\n\n".join(f"![{n[:-4]}]({n})" for n in pngs) + "\n"
        for name, text in texts.items():
            (stage / name).write_text(text if text.endswith("\n") else text + "\n")
        stale = {*FIGURES, *(p.name for c in CONDITIONS for p in out_dir.glob(f"{c}_*shot.csv"))} - {*texts, *pngs}
        for name in [*texts, *pngs]:
            os.replace(stage / name, out_dir / name)
        for name in stale:
            (out_dir / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return main_table(results)
