import json
import math

import pytest
import torch

from amt.config import DataConfig, DomainConfig, EvalConfig
from amt.data.datasets import load_domain
from amt.evaluate import evaluate, mean_ci95, query_budget, task_seed, write_results
from amt.head import protonet_logits
from amt.report import markdown_table

from conftest import write_image_folder


def test_mean_ci95_formula():
    mean, ci = mean_ci95([50.0, 70.0, 60.0, 80.0])
    std = math.sqrt(((50 - 65) ** 2 + (70 - 65) ** 2 + (60 - 65) ** 2 + (80 - 65) ** 2) / 4)
    assert mean == pytest.approx(65.0) and ci == pytest.approx(1.96 * std / 2)
    assert mean_ci95([42.0]) == (42.0, 0.0)


def test_task_seed_is_stable_and_distinct():
    assert task_seed(0, "greek", 1) == task_seed(0, "greek", 1)
    assert len({task_seed(0, "greek", 1), task_seed(0, "greek", 5), task_seed(1, "greek", 1),
                task_seed(0, "latin", 1)}) == 4


def _mean_colour(episode):
    """A 'method' that classifies by mean colour: reliable on the colour-coded test folders."""
    f = lambda x: x.mean(dim=(2, 3))  # noqa: E731
    return protonet_logits(f(episode.support_images), episode.support_labels, f(episode.query_images), episode.n_way)


def _chance(episode):
    return torch.zeros(len(episode.query_labels), episode.n_way)


def test_evaluate_shares_tasks_and_reduces_queries_for_small_classes(tmp_path, caplog):
    root = write_image_folder(tmp_path / "d", 6, [12, 12, 12, 12, 12, 8])
    ds = load_domain(DomainConfig("d", str(root), in_domain=True), DataConfig(image_size=8, resize_ratio=1.0))
    assert query_budget(ds, 5, 1, 15) == 7
    cfg = EvalConfig(n_tasks=6, n_way=5, shots=(1, 5), n_query=15)
    res = evaluate({"colour": _mean_colour, "chance": _chance}, [(DomainConfig("d", str(root), in_domain=True), ds)], cfg)
    rows = {(r["method"], r["n_shot"]): r for r in res["results"]}
    assert rows[("colour", 1)]["n_query"] == 7 and rows[("colour", 5)]["n_query"] == 3
    assert rows[("colour", 5)]["mean"] > 90.0  # classes are separable by colour
    assert rows[("chance", 1)]["mean"] == pytest.approx(20.0)  # argmax of ties picks class 0: 1/5 of queries
    assert "using 7 queries per class" in caplog.text
    again = evaluate({"colour": _mean_colour}, [(DomainConfig("d", str(root), in_domain=True), ds)], cfg)
    assert again["results"][0]["accuracies"] == rows[("colour", 1)]["accuracies"]
    path = write_results(res, tmp_path / "run")
    assert json.loads(path.read_text())["results"][0]["n_tasks"] == 6
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| colour | 5w1s |" in table and "7 queries per class" in table
    assert markdown_table(res) in table
