"""Reports from synthetic results dicts: table values follow from the per-task accuracies, CSV matches Markdown,
figures are PNGs, absent sections are skipped, a failed render keeps the earlier report."""

import csv
import io
import json
import math
import random
import subprocess
import sys

import pytest

from amt.report import condition_table, figures, main_table, markdown_table, mean_ci95, merge_table, render_report

PNG = b"\x89PNG\r\n\x1a\n"
METHODS = ["PM", "StyleAdv", "AMT"]
DOMAINS = {"latin": True, "greek": False, "runic": False}
SHOTS = [1, 5]
T = 6  # tasks per cell
HEADLINE = {"norm": "linf", "eps": 4 / 255, "step_size": 0.4 / 255, "steps": 10, "headline": True}
SWEEP = [{"norm": "linf", "eps": e / 255, "step_size": e / 2550, "steps": 10, "headline": False} for e in (1, 2, 8)]
SWEEP.append({"norm": "l2", "eps": 0.5, "step_size": 0.05, "steps": 10, "headline": False})
CORRUPTIONS = [{"name": n, "severity": s} for n in ("gaussian_noise", "fog") for s in (1, 3)]


def _row(rng, method, domain, shot, **extra):
    accs = [rng.uniform(20, 100) for _ in range(T)]
    mean = sum(accs) / T
    ci = 1.96 * math.sqrt(sum((a - mean) ** 2 for a in accs) / T) / math.sqrt(T)
    return {"method": method, "domain": domain, "in_domain": DOMAINS[domain], "n_shot": shot, "n_query": 15,
            "n_tasks": T, **extra, "mean": mean, "ci95": ci, "accuracies": accs}


def synthetic(with_optional=True):
    rng = random.Random(0)
    rows = []
    for m in METHODS:
        for d in DOMAINS:
            for s in SHOTS:
                rows.append(_row(rng, m, d, s))  # clean rows carry no "condition" key
                rows += [_row(rng, m, d, s, condition="adversarial", attack=a) for a in [HEADLINE, *SWEEP]]
                rows += [_row(rng, m, d, s, condition="corruption", corruption=c) for c in CORRUPTIONS]
    results = {"protocol": {"n_way": 5, "n_query": 15, "n_tasks": T, "seed": 0, "shots": SHOTS}, "results": rows}
    if with_optional:
        chosen = {"lambda": 0.5, "beta": 6.0, "rho": 0.9, "trim_group": "attn"}
        results["tuning"] = {"AMT": {d: {str(s): {
            "rule": "ttm", "members": [f"member{i}" for i in range(4)], "validation_tasks": "validation classes",
            "chosen": {**chosen, "beta": 6.0 + s},
            "validation": [{"params": {**chosen, "beta": 6.0 + s, "rho": 1.0}, "acc": 80.0},
                           {"params": {**chosen, "beta": 6.0 + s}, "acc": 81.5 + s}],
            "coefficients": [[rng.random() for _ in range(4)] for _ in range(T)]} for s in SHOTS} for d in DOMAINS}}
        results["spectra"] = {label: {"weights": "uniform merge of 4 pool members", "top": 4, "layers": {
            f"vit.blocks.{b}.{kind}": {"block": b, "kind": kind,
                                       "pretrained": sorted((rng.uniform(0.01, 10) for _ in range(4)), reverse=True),
                                       "tuned": sorted((rng.uniform(0.01, 10) for _ in range(4)), reverse=True)}
            for b in range(3) for kind in ("mlp.fc1", "mlp.fc2", "attn.proj")}}
            for label in ("AMT (APQ+APSV)", "APQ only")}
    return results


def expected_cells(results, cond, shot):
    """(method, domain) → (mean, ci95) computed here from the per-task accuracies."""
    out = {}
    for m in METHODS:
        for d in DOMAINS:
            sel = [r for r in results["results"] if (r["method"], r["domain"], r["n_shot"]) == (m, d, shot)
                   and r.get("condition", "clean") == cond and (cond != "adversarial" or r["attack"]["headline"])]
            per_task = [sum(accs) / len(sel) for accs in zip(*(r["accuracies"] for r in sel))]
            mean = sum(per_task) / T
            out[(m, d)] = (mean, 1.96 * math.sqrt(sum((a - mean) ** 2 for a in per_task) / T) / math.sqrt(T))
    return out


def md_rows(md):
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[1:]]


def csv_rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def _mean(xs):
    return sum(xs) / len(xs)


def test_mean_ci95_matches_evaluate():
    from amt.evaluate import mean_ci95 as torch_mean_ci95

    for values in ([50.0], [20.0, 80.0, 60.0, 100.0], [33.3] * 5):
        assert mean_ci95(values) == pytest.approx(torch_mean_ci95(values))


@pytest.mark.parametrize("cond", ["clean", "adversarial", "corruption"])
@pytest.mark.parametrize("shot", SHOTS)
def test_condition_table_cells_and_averages_follow_from_per_task_accuracies(cond, shot):
    results = synthetic()
    cells = expected_cells(results, cond, shot)
    md, table = md_rows(condition_table(results, cond, shot)), csv_rows(condition_table(results, cond, shot, "csv"))
    assert [r["method"] for r in md] == [r["method"] for r in table] == METHODS
    for md_row, csv_row in zip(md, table):
        m = md_row["method"]
        for d, flag in DOMAINS.items():
            col = f"{d} (ID)" if flag else d
            mean, ci = cells[(m, d)]
            assert float(csv_row[f"{col} mean"]) == pytest.approx(mean)
            assert float(csv_row[f"{col} ci95"]) == pytest.approx(ci)
            assert md_row[col] == f"{mean:.2f} ± {ci:.2f}"
        for col, sel in (("ID avg", [True]), ("OOD avg", [False]), ("all avg", [True, False])):
            avg = _mean([cells[(m, d)][0] for d, flag in DOMAINS.items() if flag in sel])
            assert float(csv_row[col]) == pytest.approx(avg)
            assert md_row[col] == f"{avg:.2f}"


def test_corruption_ci_averages_each_task_over_corruptions_first():
    rows = [{"method": "PM", "domain": "latin", "in_domain": True, "n_shot": 1, "n_query": 15, "n_tasks": 4,
             "condition": "corruption", "corruption": {"name": n, "severity": 1}, "accuracies": accs,
             "mean": _mean(accs), "ci95": mean_ci95(accs)[1]}
            for n, accs in (("fog", [0.0, 100.0, 0.0, 100.0]), ("snow", [100.0, 0.0, 100.0, 0.0]))]
    table = csv_rows(condition_table({"protocol": {"n_way": 5}, "results": rows}, "corruption", 1, "csv"))
    # each task averages to 50 → zero spread; pooling the 8 accuracies would give a CI of 1.96·50/√8
    assert float(table[0]["latin (ID) mean"]) == 50.0 and float(table[0]["latin (ID) ci95"]) == 0.0


def test_main_table_averages_and_dashes_where_absent():
    results = synthetic(with_optional=False)
    md, table = md_rows(main_table(results)), csv_rows(main_table(results, "csv"))
    assert [(r["method"], r["shot"]) for r in md] == [(m, f"5w{s}s") for s in SHOTS for m in METHODS]
    for md_row, csv_row in zip(md, table):
        shot = int(md_row["shot"][2:-1])
        for cond, name in (("clean", "Clean"), ("adversarial", "PGD"), ("corruption", "Corr")):
            cells = expected_cells(results, cond, shot)
            for kind, flag in (("ID", True), ("OOD", False)):
                avg = _mean([cells[(md_row["method"], d)][0] for d, f in DOMAINS.items() if f == flag])
                assert float(csv_row[f"{name} {kind}"]) == pytest.approx(avg)
                assert md_row[f"{name} {kind}"] == f"{avg:.2f}"
    clean_only = {"protocol": results["protocol"], "results": [r for r in results["results"] if "condition" not in r]}
    row = md_rows(main_table(clean_only))[0]
    assert row["PGD ID"] == row["Corr OOD"] == "—" and row["Clean ID"] != "—"
    assert csv_rows(main_table(clean_only, "csv"))[0]["PGD OOD"] == ""


def test_merge_table_lists_chosen_hyperparameters_per_shot_and_their_validation_acc():
    rows = md_rows(merge_table(synthetic()))
    assert len(rows) == len(DOMAINS) * len(SHOTS)
    for row in rows[: len(SHOTS)]:
        s = int(row["shot"])
        assert row["domain"] == "latin" and "rho=0.9" in row["chosen"] and f"beta={6.0 + s}" in row["chosen"]
        assert float(row["validation acc"]) == 81.5 + s and row["validation tasks"] == "validation classes"
        assert row["objective"] == "clean" and row["validation robust acc"] == "—"  # the paper's selection
    results = synthetic()
    info = results["tuning"]["AMT"]["latin"]["1"]
    info["selection"] = {"objective": "constrained", "clean_tolerance": 1.0}
    for v in info["validation"]:
        v["robust_acc"] = v["acc"] - 40
    row = md_rows(merge_table(results))[0]
    assert row["objective"] == "constrained, clean_tolerance 1" and float(row["validation robust acc"]) == 42.5


def test_figures_are_pngs_and_absent_sections_are_skipped(tmp_path):
    paths = figures(synthetic(), tmp_path / "all")
    assert sorted(p.name for p in paths) == sorted(
        ["accuracy_vs_eps.png", "corruptions.png", "spectra.png", "merge_coefficients.png"])
    assert all(p.read_bytes().startswith(PNG) for p in paths)
    results = synthetic(with_optional=False)
    results["results"] = [r for r in results["results"] if "condition" not in r]
    assert figures(results, tmp_path / "none") == [] and not list((tmp_path / "none").iterdir())


def test_render_report_writes_tables_and_figures_and_survives_a_malformed_file(tmp_path):
    path, out = tmp_path / "results.json", tmp_path / "report"
    path.write_text(json.dumps(synthetic()))
    md = render_report(path, out)
    assert md == main_table(synthetic())
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "main.csv", "clean_1shot.csv", "adversarial_5shot.csv", "corruption_1shot.csv",
            "spectra.png", "merge_coefficients.png"} <= names and not any(n.startswith(".") for n in names)
    report = (out / "report.md").read_text()
    assert "(spectra.png)" in report and "rho=0.9" in report and "| AMT | 5w1s |" in report
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    path.write_text(json.dumps({"protocol": {"n_way": 5}}))
    with pytest.raises(ValueError, match="results.json.*'results'"):
        render_report(path, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_markdown_table_unchanged_for_clean_rows_and_ignores_other_conditions():
    res = {"protocol": {"n_way": 5, "n_query": 15}, "results": [
        {"method": "PM", "domain": "latin", "in_domain": True, "n_shot": 1, "n_query": 15, "n_tasks": 200,
         "mean": 91.2, "ci95": 0.9},
        {"method": "PM", "domain": "greek", "in_domain": False, "n_shot": 1, "n_query": 10, "n_tasks": 200,
         "mean": 60.0, "ci95": 1.5}]}
    expected = ("| method | shot | latin (ID) | greek | ID avg | OOD avg |\n|---|---|---|---|---|---|\n"
                "| PM | 5w1s | 91.20 ± 0.90 | 60.00 ± 1.50 | 91.20 | 60.00 |\n\n"
                "greek 1-shot: 10 queries per class (classes too small for 15).\n\n"
                "200 tasks per cell; ± is the 95% confidence interval.")
    assert markdown_table(res) == expected
    attacked = {**res["results"][0], "condition": "adversarial", "attack": HEADLINE, "mean": 10.0}
    assert markdown_table({**res, "results": [*res["results"], attacked]}) == expected


def test_report_module_imports_no_torch():
    code = "import sys, amt.report; assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_difference_rows_are_paired_over_the_same_tasks_and_marked_where_significant():
    from amt.stats import combine, paired_difference

    results = synthetic(with_optional=False)
    results["protocol"]["reference"] = "PM"
    md = md_rows(main_table(results))
    deltas = [r for r in md if r["method"].startswith("Δ")]
    assert [(r["method"], r["shot"]) for r in deltas] == [(f"Δ {m} − PM", f"5w{s}s") for s in SHOTS for m in METHODS
                                                          if m != "PM"]

    def per_task(m, d, s):
        return next(r["accuracies"] for r in results["results"] if (r["method"], r["domain"], r["n_shot"]) == (m, d, s)
                    and r.get("condition") == "adversarial" and r["attack"]["headline"])

    for row in deltas:
        m, s = row["method"][2:].split(" − ")[0], int(row["shot"][2:-1])
        est = combine([paired_difference(per_task(m, d, s), per_task("PM", d, s)) for d, f in DOMAINS.items() if not f])
        assert row["PGD OOD"] == f"{est.mean:+.2f} [{est.low:+.2f}, {est.high:+.2f}]{'*' if est.excludes_zero else ''}"
    table = md_rows(condition_table(results, "adversarial", 1))
    latin = paired_difference(per_task("AMT", "latin", 1), per_task("PM", "latin", 1))
    assert next(r for r in table if r["method"] == "Δ AMT − PM")["latin (ID)"].startswith(f"{latin.mean:+.2f} [")
    # significance is marked: a method that is PM plus 5 points on every task
    for r in results["results"]:
        if r["method"] == "StyleAdv":
            pm = next(x for x in results["results"] if x["method"] == "PM" and x["domain"] == r["domain"]
                      and x["n_shot"] == r["n_shot"] and x.get("condition") == r.get("condition")
                      and x.get("attack") == r.get("attack") and x.get("corruption") == r.get("corruption"))
            r["accuracies"] = [a + 5.0 + 0.1 * i for i, a in enumerate(pm["accuracies"])]
    styleadv = next(r for r in md_rows(main_table(results)) if r["method"] == "Δ StyleAdv − PM")
    assert styleadv["Clean ID"].startswith("+5.25 [") and styleadv["Clean ID"].endswith("*")
    assert "Δ" not in main_table(synthetic(with_optional=False))  # no reference in the protocol: no differences


def test_masking_table_lists_the_flags_that_fired():
    from amt.report import masking_table

    results = synthetic(with_optional=False)
    flags = dict.fromkeys(("rises_with_eps", "not_zero_at_large_eps", "more_steps_help", "black_box_stronger",
                           "zero_gradients"), False)
    results["masking"] = {"PM": {"latin": {"1": {"flags": flags, "accuracy": {"clean": 90.0, "square": 40.0},
                                                 "n_tasks": 2, "masking": False}}},
                          "AMT": {"latin": {"1": {"flags": flags | {"black_box_stronger": True},
                                                  "accuracy": {"clean": 91.0, "square": 10.0}, "n_tasks": 2,
                                                  "masking": True}}}}
    rows = md_rows(masking_table(results))
    assert [(r["method"], r["flags"]) for r in rows] == [("PM", "—"), ("AMT", "black_box_stronger")]
    assert rows[1]["square"] == "10.00" and "1 of 2" in masking_table(results)
