"""Reports rendered from results files: Markdown/CSV tables shaped like the AMT paper's, with paired differences
to a reference method, and the PNG figures of :mod:`amt.figures`.

Imports no torch, so a report is re-made from ``results.json`` alone without re-running anything. Accuracies
are in %; ε is in pixel units of [0, 1] images (ℓ∞ ε is shown ×255).
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import tempfile
from pathlib import Path

from amt.figures import FIGURES, figures
from amt.results import (
    CONDITIONS,
    MISSING,
    VWVS,
    cell_label,
    condition_of,
    domains_of,
    load_results,
    select,
    shot_order,
    shots_of,
    tuned,
)
from amt.stats import Estimate, combine, mean_ci95, paired_difference

SHORT = {"clean": "Clean", "adversarial": "PGD", "autoattack": "AA", "corruption": "Corr"}


def markdown_table(results: dict) -> str:
    """Markdown table of the clean rows: one row per (method, shot), one column per domain plus averages.

    Cells are ``mean ± ci95`` in %. "ID avg" averages the in-domain columns, "OOD avg" the others.
    """
    rows = [r for r in results["results"] if condition_of(r) == "clean"]
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    in_domain = {r["domain"]: r["in_domain"] for r in rows}
    keys = sorted(dict.fromkeys((r["method"], r["n_shot"]) for r in rows), key=lambda k: shot_order(k[1]))
    cell = {(r["method"], r["n_shot"], r["domain"]): r for r in rows}
    header = ["method", "shot", *[f"{d}{' (ID)' if in_domain[d] else ''}" for d in domains], "ID avg", "OOD avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, shot in keys:
        vals, row = {}, [method, cell_label(results["protocol"]["n_way"], shot)]
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
    notes = sorted({(r["domain"], r["n_shot"], r["n_query"]) for r in rows
                    if isinstance(r.get("n_query"), int) and r["n_query"] < full})
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


def _per_task_mean(rows: list[dict]) -> list[float]:
    """Task t's accuracy (%) averaged over rows (corruption names × severities) of one method and domain."""
    lengths = {len(r["accuracies"]) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"corruption rows of {rows[0]['method']}/{rows[0]['domain']} have different task counts "
                         f"{sorted(lengths)}; per-task averaging needs the same tasks for every corruption")
    return [sum(accs) / len(rows) for accs in zip(*(r["accuracies"] for r in rows))]


def _per_task(results: dict, cond: str, n_shot: int) -> dict[tuple[str, str], list[float]]:
    """(method, domain) → per-task accuracies (%) of one condition and shot; a corruption cell averages each task
    over all corruption names and severities present."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in select(results, cond, n_shot):
        groups.setdefault((r["method"], r["domain"]), []).append(r)
    return {k: _per_task_mean(rs) if cond == "corruption" else list(rs[0]["accuracies"]) for k, rs in groups.items()}


def _cells(results: dict, cond: str, n_shot: int) -> dict[tuple[str, str], tuple[float, float]]:
    """(method, domain) → (mean, ci95) in %. A corruption cell averages each task over all corruption names and
    severities present, then takes the mean and CI over tasks."""
    if cond == "corruption":
        return {k: mean_ci95(v) for k, v in _per_task(results, cond, n_shot).items()}
    return {(r["method"], r["domain"]): (r["mean"], r["ci95"]) for r in select(results, cond, n_shot)}


def reference_of(results: dict) -> str | None:
    """The method paired differences are taken against (``protocol.reference``), if it was evaluated."""
    ref = results["protocol"].get("reference")
    return ref if ref in {r["method"] for r in results["results"]} else None


def _differences(results: dict, cond: str, n_shot: int, reference: str) -> dict[tuple[str, str], Estimate]:
    """(method, domain) → paired difference method − reference over the tasks both were measured on."""
    per_task = _per_task(results, cond, n_shot)
    out = {}
    for (method, domain), values in per_task.items():
        ref = per_task.get((reference, domain))
        if method != reference and ref is not None:
            n = min(len(values), len(ref))
            out[(method, domain)] = paired_difference(values[:n], ref[:n])
    return out


def _combined(diffs: dict[tuple[str, str], Estimate], method: str, domains: dict[str, bool]) -> list[Estimate | None]:
    """[ID, OOD, all] averages of a method's per-domain differences, with combined CIs (None where absent)."""
    out = []
    for keep in (lambda d: domains[d], lambda d: not domains[d], lambda d: True):
        ests = [diffs[(method, d)] for d in domains if keep(d) and (method, d) in diffs]
        out.append(combine(ests) if ests else None)
    return out


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
    if isinstance(c, Estimate):  # a paired difference: mean [95% CI], * where the CI excludes 0
        if c.n < 2 or math.isnan(c.half):  # a single task somewhere: no interval
            return f"{c.mean:+.2f}"
        return f"{c.mean:+.2f} [{c.low:+.2f}, {c.high:+.2f}]{'*' if c.excludes_zero else ''}"
    if isinstance(c, tuple):
        return f"{c[0]:.2f} ± {c[1]:.2f}"
    return f"{c:.2f}" if isinstance(c, float) else str(c)


def _csv_cells(c, paired: bool) -> list[str]:
    c = (c.mean, c.half) if isinstance(c, Estimate) else c
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
    paired = [any(isinstance(row[i], (tuple, Estimate)) for row in rows) for i in range(len(header))]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([h for name, p in zip(header, paired) for h in ([f"{name} mean", f"{name} ci95"] if p else [name])])
    writer.writerows([v for c, p in zip(row, paired) for v in _csv_cells(c, p)] for row in rows)
    return out.getvalue()


def _attack_label(attack: dict) -> str:
    eps = f"{attack['eps'] * 255:.3g}/255" if attack["norm"] == "linf" else f"{attack['eps']:.3g}"
    name = attack.get("name", "pgd")
    if name.startswith("autoattack"):
        return f"{name} ({attack['norm']} ε = {eps}, {attack.get('steps', '?')} steps per attack)"
    restarts = attack.get("restarts", 1)
    worst = f" × {restarts} restarts" if restarts > 1 else ""
    return f"{attack['norm']} ε = {eps}, {attack.get('steps', '?')} steps{worst}, worst case over iterates"


def _corruption_label(rows: list[dict]) -> str:
    names = {r["corruption"]["name"] for r in rows}
    severities = sorted({r["corruption"]["severity"] for r in rows})
    return f"mean over {len(names)} corruptions × severities {severities}; CI over per-task means"


def _span(values: list[int]) -> str:
    """``min–max (mean m)`` of some counts."""
    return f"{min(values)}–{max(values)} (mean {sum(values) / len(values):.1f})" if values else MISSING


def _task_shapes(rows: list[dict]) -> dict[str, dict[str, list[int]]]:
    """Domain → the per-task shapes (``task_n_way``, ``task_n_support``, ``task_n_query``) of its variable-way tasks,
    from the row with the most tasks (every method sees the same tasks)."""
    out: dict[str, dict[str, list[int]]] = {}
    for r in rows:
        if "task_n_way" in r and len(r["task_n_way"]) > len(out.get(r["domain"], {}).get("task_n_way", [])):
            out[r["domain"]] = {k: list(r[k]) for k in ("task_n_way", "task_n_support", "task_n_query")}
    return out


def shape_table(results: dict, fmt: str = "md") -> str:
    """Per domain, the shapes of its variable-way variable-shot tasks (the "vwvs" cell): ways, support images,
    mean shots per class and queries per class, each as min–max (mean) over the tasks."""
    header = ["domain", "tasks", "ways", "support images", "shots per class (task mean)", "queries per class"]
    table = []
    for domain, sh in _task_shapes(select(results, "clean", VWVS)).items():
        shots = [s / w for s, w in zip(sh["task_n_support"], sh["task_n_way"])]
        table.append([domain, len(sh["task_n_way"]), _span(sh["task_n_way"]), _span(sh["task_n_support"]),
                      f"{min(shots):.1f}–{max(shots):.1f} (mean {sum(shots) / len(shots):.1f})",
                      _span(sh["task_n_query"])])
    return _render(header, table, fmt)


def _notes(rows: list[dict], cond: str) -> list[str]:
    tasks = sorted({r.get("n_tasks", len(r.get("accuracies", []))) for r in rows})
    notes = [f"{'/'.join(map(str, tasks))} tasks per cell; ± is the 95% confidence interval; accuracy in %. "
             "Δ rows: paired difference to the reference over the same tasks, [95% CI], * where it excludes 0; "
             "averages combine the per-domain variances."]
    if cond == "adversarial" and rows:
        notes.insert(0, "Attack: PGD " + _attack_label(rows[0]["attack"]) + ".")
    if cond == "autoattack" and rows:
        notes.insert(0, "Attack: " + _attack_label(rows[0]["attack"]) + ".")
    if cond == "corruption" and rows:
        notes.insert(0, "Corruptions: " + _corruption_label(rows) + ".")
    if shapes := _task_shapes(rows):
        ways = [w for sh in shapes.values() for w in sh["task_n_way"]]
        support = [s for sh in shapes.values() for s in sh["task_n_support"]]
        notes.insert(0, f"Variable-way variable-shot tasks: {_span(ways)} ways, {_span(support)} support images "
                     "per task (per domain: the task shapes table).")
    return notes


def condition_table(results: dict, condition: str, n_shot: int, fmt: str = "md") -> str:
    """Paper-style table of one condition ("clean", "adversarial" = headline attack, "corruption") and shot.

    Rows are methods (first appearance), columns the domains (in-domain ones marked "(ID)") and the ID / OOD /
    all averages of the domain means. Cells are ``mean ± ci95`` in % (CSV: separate mean and ci95 columns).
    """
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    rows = select(results, condition, n_shot)
    cells, domains = _cells(results, condition, n_shot), domains_of(rows)
    methods = list(dict.fromkeys(m for m, _ in cells))
    header = ["method", *[f"{d} (ID)" if flag else d for d, flag in domains.items()], "ID avg", "OOD avg", "all avg"]
    table = [[m, *[cells.get((m, d)) for d in domains], *_averages(cells, m, domains)] for m in methods]
    if ref := reference_of(results):
        diffs = _differences(results, condition, n_shot, ref)
        table += [[f"Δ {m} − {ref}", *[diffs.get((m, d)) for d in domains], *_combined(diffs, m, domains)]
                  for m in methods if m != ref and any(k[0] == m for k in diffs)]
    return _render(header, table, fmt, _notes(rows, condition))


def main_table(results: dict, fmt: str = "md") -> str:
    """Summary: one row per (method, shot) like "5w1s", columns Clean / PGD / Corr × ID / OOD: averages (%) over
    the domains of each kind of the per-condition cells; "—" where absent."""
    n_way = results["protocol"]["n_way"]
    keys = sorted(dict.fromkeys((r["method"], r["n_shot"]) for r in results["results"]), key=lambda k: shot_order(k[1]))
    shots = shots_of(results["results"])
    conds = [c for c in CONDITIONS if c in ("clean", "adversarial", "corruption") or select(results, c)]
    cells = {(c, s): _cells(results, c, s) for c in conds for s in shots}
    domains = domains_of(results["results"])
    header = ["method", "shot", *[f"{SHORT[c]} {kind}" for c in conds for kind in ("ID", "OOD")]]
    table = [[m, cell_label(n_way, s), *[v for c in conds for v in _averages(cells[(c, s)], m, domains)[:2]]]
             for m, s in keys]
    notes = ["Accuracy (%) averaged over in-domain (ID) and out-of-domain (OOD) domains."]
    if ref := reference_of(results):
        diffs = {(c, s): _differences(results, c, s, ref) for c in conds for s in shots}
        table += [[f"Δ {m} − {ref}", cell_label(n_way, s), *[v for c in conds for v in _combined(diffs[(c, s)], m,
                                                                                            domains)[:2]]]
                  for m, s in keys if m != ref]
        notes.append(f"Δ rows: paired difference to {ref} over the same tasks, averaged over the domains of each "
                     "kind, [95% CI] (per-domain variances combined), * where the CI excludes 0.")
    if adv := select(results, "adversarial"):
        notes.append("PGD: " + _attack_label(adv[0]["attack"]) + ".")
    if results.get("partial"):
        notes.insert(0, f"PARTIAL: {results['partial']}.")
    if aa := select(results, "autoattack"):
        notes.append(f"AA: {_attack_label(aa[0]['attack'])}, on the first {aa[0]['n_tasks']} tasks.")
    if corr := select(results, "corruption"):
        notes.append("Corr: " + _corruption_label(corr) + ".")
    return _render(header, table, fmt, notes)


MASKING_FLAGS = ("rises_with_eps", "not_zero_at_large_eps", "more_steps_help", "black_box_stronger",
                 "zero_gradients")


def masking_table(results: dict, fmt: str = "md") -> str:
    """The gradient-masking checks per method, domain and shot (``results["masking"]``): the accuracies compared
    (%) and which flags fired ("—": none; see :mod:`amt.masking` for what each flag means)."""
    entries = [(m, d, s, info) for m, per_domain in (results.get("masking") or {}).items()
               for d, per_shot in per_domain.items()
               for s, info in sorted(per_shot.items(), key=lambda kv: shot_order(kv[0]))]
    labels = list(dict.fromkeys(k for *_, info in entries for k in info["accuracy"]))
    header = ["method", "domain", "shot", "tasks", *labels, "flags"]
    table = [[m, d, s, info["n_tasks"], *[info["accuracy"].get(k) for k in labels],
              ", ".join(f for f in MASKING_FLAGS if info["flags"].get(f)) or MISSING] for m, d, s, info in entries]
    fired = sum(1 for *_, info in entries if info.get("masking"))
    notes = [f"{fired} of {len(entries)} (method, domain, shot) cells raise a flag. Accuracy in % over the first tasks "
             "(gradient: % of queries with a non-zero input gradient)."]
    return _render(header, table, fmt, notes)


def merge_table(results: dict, fmt: str = "md") -> str:
    """Settings chosen on validation tasks per tuned method, domain and shot (merge hyper-parameters, fine-tuning
    learning rate), the objective they maximised, and the chosen setting's validation accuracy (%), clean and (robust
    objectives) under the selection attack."""
    header = ["method", "domain", "shot", "rule", "chosen", "objective", "validation acc", "validation robust acc",
              "validation tasks"]
    table = []
    for method, domain, shot, info in tuned(results):
        chosen = dict(info.get("chosen") or {})
        points = [v for v in info.get("validation", []) if v.get("params") == chosen]
        acc = [v["acc"] for v in points]
        robust = [v["robust_acc"] for v in points if "robust_acc" in v]
        ft = info.get("finetune") or {}
        if "chosen_lr" in ft:
            chosen["finetune_lr"] = ft["chosen_lr"]
            acc = acc or [v["acc"] for v in ft.get("lr_validation", []) if v.get("lr") == ft["chosen_lr"]]
        sel = info.get("selection") or {}
        objective = sel.get("objective", "clean") + "".join(
            f", {k} {sel[k]:g}" for k in ("robust_weight", "clean_tolerance") if k in sel)
        table.append([method, domain, shot, info.get("rule") or MISSING,
                      ", ".join(f"{k}={v}" for k, v in chosen.items()) or MISSING, objective,
                      float(acc[0]) if acc else None, float(robust[0]) if robust else None,
                      info.get("validation_tasks", MISSING)])
    return _render(header, table, fmt)


# ---------------------------------------------------------------- whole report


def _tables(results: dict) -> dict[str, str]:
    """CSV file name → CSV text, and "report.md" → Markdown, for every condition and shot present."""
    p = results["protocol"]
    files = {"main.csv": main_table(results, "csv")}
    md = [f"# Results\n\nProtocol: {_protocol(p)}, {p.get('n_tasks', '?')} tasks, seed {p.get('seed', '?')}.\n",
          "## Summary\n", main_table(results), ""]
    if results.get("partial"):
        md.insert(1, f"**Partial results: {results['partial']}.**\n")
    if select(results, "clean", VWVS):
        files["task_shapes.csv"] = shape_table(results, "csv")
        md += ["## Variable-way variable-shot task shapes ([CSV](task_shapes.csv))\n", shape_table(results), ""]
    for cond in CONDITIONS:
        for shot in shots_of(select(results, cond)):
            name = f"{cond}_{shot}shot.csv" if shot != VWVS else f"{cond}_{VWVS}.csv"
            title = f"{p['n_way']}-way {shot}-shot" if shot != VWVS else "variable-way variable-shot"
            files[name] = condition_table(results, cond, shot, "csv")
            md += [f"## {cond.capitalize()}, {title} ([CSV]({name}))\n", condition_table(results, cond, shot), ""]
    if results.get("masking"):
        files["masking.csv"] = masking_table(results, "csv")
        md += ["## Gradient-masking checks ([CSV](masking.csv))\n", masking_table(results), ""]
    if results.get("tuning"):
        md += ["## Settings chosen on validation tasks (per domain and shot)\n", merge_table(results), ""]
    files["report.md"] = "\n".join(md)
    return files


def _protocol(p: dict) -> str:
    """The task protocol of a results file in words."""
    v = p.get("variable")
    if p.get("episodes") == "variable" and v:
        return (f"variable-way variable-shot tasks (Meta-Dataset's sampler: {v['min_ways']}–{v['max_ways']} ways, "
                f"at most {v['max_support']} support images, {v['max_support_per_class']} per class, "
                f"{v['max_query_per_class']} queries per class)")
    return f"{p['n_way']}-way, {p.get('n_query', '?')} queries per class"


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
        old = [p.name for c in CONDITIONS for pattern in (f"{c}_*shot.csv", f"{c}_{VWVS}.csv")
               for p in out_dir.glob(pattern)]
        stale = {*FIGURES, "task_shapes.csv", *old} - {*texts, *pngs}
        for name in [*texts, *pngs]:
            os.replace(stage / name, out_dir / name)
        for name in stale:
            (out_dir / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return main_table(results)
