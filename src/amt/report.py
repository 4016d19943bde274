"""Tables (and later figures) rendered from results files; imports no torch."""

from __future__ import annotations

import json
from pathlib import Path


def load_results(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def markdown_table(results: dict) -> str:
    """Markdown table: one row per (method, shot), one column per domain plus averages.

    Cells are ``mean ± ci95`` in %. "ID avg" averages the in-domain columns, "OOD avg" the others.
    """
    rows = results["results"]
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
    notes = sorted({(r["domain"], r["n_shot"], r["n_query"]) for r in rows if r["n_query"] < results["protocol"]["n_query"]})
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
            f"| {best.get('val_acc', float('nan')):.2f} ({best.get('episode', '—')}) | {kept_acc} ({kept.get('episode', '—')}) "
            f"| {final.get('loss', float('nan')):.3f} | {final.get('ce', float('nan')):.3f} "
            f"| {final.get('kl', float('nan')):.4f} | {m.get('scale', float('nan')):.2f} | {m.get('seconds', 0):.0f} |")
    return "\n".join(lines)
