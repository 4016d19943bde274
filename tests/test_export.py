"""`amt export --format peft`: every member of the shipped pool, loaded with peft onto the unmodified backbone,
computes amt's features for that member; the layer factors are exact; the model card names every radius and the
results; bad input is refused with a message and nothing is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from amt.backbone import build_backbone, build_vit
from amt.checkpoints import fingerprint, load_checkpoint
from amt.cli import main
from amt.config import ConfigError, load_config
from amt.export import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, export_peft, peft_factors
from amt.lora import active_adapter
from amt.lora_layer import LoRALinear
from amt.pipeline import pool_path, resolve_assets
from amt.report import condition_table
from amt.rundir import load_pool, read_manifest

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "embedded.yaml"
POOL = "embedded:glyph_pool"
ATOL = 1e-5  # features are O(1) (final LayerNorm)


@pytest.fixture(scope="module")
def cfg():
    return resolve_assets(load_config(CONFIG))


@pytest.fixture(scope="module")
def manifest():
    return read_manifest(Path(pool_path(POOL)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The shipped pool exported through the CLI, without results."""
    out = tmp_path_factory.mktemp("export") / "peft"
    assert main(["export", "--pool", POOL, "--format", "peft", "--out", str(out), "--config", str(CONFIG)]) == 0
    return out


@pytest.fixture(scope="module")
def amt_pool(cfg):
    backbone = build_backbone(cfg.backbone).eval()
    return backbone, load_pool(backbone, pool_path(POOL), fingerprint(backbone.vit)).names


# ---------------------------------------------------------------------------------------------- factors


@pytest.mark.parametrize("init", ["svd", "standard"])
@pytest.mark.parametrize("splits", [1, 3])
def test_layer_factors_reproduce_the_members_weight_on_the_pretrained_weight(init, splits):
    torch.manual_seed(0)
    base = nn.Linear(12, 18)
    w = base.weight.detach().clone()
    layer = LoRALinear(base, rank=2, scaling=0.5, splits=splits)
    layer.add_adapter("m", init=init, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a trained member: factors moved away from their init
        layer.lora_A["m"].add_(0.1 * torch.randn_like(layer.lora_A["m"]))
        layer.lora_B["m"].add_(0.1 * torch.randn_like(layer.lora_B["m"]))
    lora_a, lora_b = peft_factors(layer, "m")
    rank = (2 if init == "svd" else 1) * splits * 2
    assert lora_a.shape == (rank, 12) and lora_b.shape == (18, rank)
    want = layer.weight + layer.delta_weight("m")  # amt: W_res + ΔW
    assert torch.allclose(w + lora_b @ lora_a, want, atol=1e-5)
    if init == "svd":
        assert not torch.allclose(w, layer.weight, atol=1e-2)  # the residual term matters
    block, r = 18 // splits, 2
    for j in range(splits):  # row block j only uses its own columns: block-diagonal per part
        rows = lora_b[j * block : (j + 1) * block]
        own = [c for part in range(rank // (splits * r)) for c in range((part * splits + j) * r,
                                                                          (part * splits + j + 1) * r)]
        others = [c for c in range(rank) if c not in own]
        assert torch.count_nonzero(rows[:, others]) == 0


# ---------------------------------------------------------------------------------------------- PEFT round trip


def test_each_member_loads_with_peft_and_computes_the_amt_members_features(exported, amt_pool, cfg):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    backbone, names = amt_pool
    assert sorted(p.name for p in exported.iterdir()) == sorted([CARD_NAME, *names])
    assert not list(exported.parent.glob(".*tmp"))
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    normalised = (x - backbone.mean) / backbone.std  # what amt's Backbone does first
    for name in names:
        config = json.loads((exported / name / CONFIG_NAME).read_text())
        assert config["peft_type"] == "LORA" and config["bias"] == "none" and config["task_type"] is None
        assert config["rank_pattern"] == config["alpha_pattern"]
        assert {m: r for m, r in config["rank_pattern"].items() if m.endswith("qkv")} == {
            f"blocks.{i}.attn.qkv": 6 * 8 for i in range(4)}
        vit = build_vit(cfg.backbone.arch, cfg.backbone.image_size)
        load_checkpoint(vit, cfg.backbone.checkpoint)
        model = peft.PeftModel.from_pretrained(vit, exported / name).eval()
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert len(layers) == 16 and all(m.scaling["default"] == 1.0 for m in layers)
        state = load_file(str(exported / name / WEIGHTS_NAME))
        assert all(k.startswith("base_model.model.blocks.") for k in state)
        assert not peft.set_peft_model_state_dict(model, state).unexpected_keys  # every key lands somewhere
        with torch.no_grad(), active_adapter(backbone.vit, name):
            want = backbone(x)
        with torch.no_grad():
            got = model(normalised)
            with model.disable_adapter():
                plain = model(normalised)
        assert (got - want).abs().max() <= ATOL, name
        assert (plain - want).abs().max() > 100 * ATOL  # the check can fail: the bare backbone differs
        flipped = {k: torch.cat([v[:, : v.shape[1] // 2], -v[:, v.shape[1] // 2 :]], 1) if ".lora_B." in k else v
                   for k, v in state.items()}  # a wrong sign on the residual (SVD-init) term
        peft.set_peft_model_state_dict(model, flipped)
        with torch.no_grad():
            assert (model(normalised) - want).abs().max() > 100 * ATOL
        with safe_open(str(exported / name / WEIGHTS_NAME), "pt") as f:
            assert f.metadata()["amt_member"] == name
            assert math.isfinite(float(f.metadata()["amt_logit_scale"]))


# ---------------------------------------------------------------------------------------------- model card


def _results(fp: str) -> dict:
    """A results.json shaped like `amt evaluate`'s: PM and AMT, two domains, 1 and 5 shots, three conditions."""
    gen = torch.Generator().manual_seed(3)
    headline = {"name": "pgd", "role": "headline", "norm": "linf", "eps": 8 / 255, "step_size": 0.8 / 255,
                "steps": 10, "restarts": 2, "objective": "ce", "headline": True}
    rows = []
    for method in ("PM", "AMT"):
        for domain, in_domain in (("latin", True), ("greek", False)):
            for shot in (1, 5):
                for extra in ({"condition": "clean"}, {"condition": "adversarial", "attack": headline},
                              *({"condition": "corruption", "corruption": {"name": c, "severity": 3}}
                                for c in ("fog", "gaussian_noise"))):
                    accs = (torch.rand(4, generator=gen) * 60 + 30).tolist()
                    mean = sum(accs) / len(accs)
                    ci = 1.96 * math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs)) / 2
                    rows.append({"method": method, "domain": domain, "in_domain": in_domain, "n_way": 5,
                                 "n_shot": shot, "n_query": 10, "n_tasks": 4, **extra, "mean": mean, "ci95": ci,
                                 "accuracies": accs})
    return {"protocol": {"n_way": 5, "shots": [1, 5], "n_query": 10, "n_tasks": 4, "seed": 0, "reference": "PM"},
            "backbone": {"arch": "amt_glyph_vit", "fingerprint": fp}, "results": rows,
            "methods": [{"name": "PM", "pool": None, "rule": "ttm"}, {"name": "AMT", "pool": POOL, "rule": "ttm"}]}


def test_model_card_names_every_radius_and_says_when_there_are_no_results(exported, manifest):
    card = (exported / CARD_NAME).read_text()
    for m in manifest["members"]:
        assert f"| {m['name']} | {m['attack']['eps'] * 255:.3g}/255 | linf | {m['attack']['steps']} |" in card
    assert manifest["backbone_fingerprint"] in card
    assert "mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]" in card and "PeftModel.from_pretrained" in card
    assert "APQ (adversarial query perturbation): on" in card and "5-way 1-shot" in card
    assert "No evaluation results" in card


def test_model_card_holds_clean_robust_and_corrupted_accuracy_per_domain_and_shot(tmp_path, cfg, manifest):
    results = _results(manifest["backbone_fingerprint"])
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    card = (export_peft(POOL, tmp_path / "out", cfg.backbone, results=path) / CARD_NAME).read_text()
    assert "No evaluation results" not in card
    for r in results["results"]:
        if r["condition"] != "corruption":
            assert f"{r['mean']:.2f} ± {r['ci95']:.2f}" in card
    for shot in (1, 5):
        assert f"### Corrupted, 5w{shot}s" in card
        assert condition_table(results, "corruption", shot) in card
        assert condition_table(results, "adversarial", shot) in card
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_results("0123456789abcdef")))
    with pytest.raises(ConfigError, match="computed on backbone 0123456789abcdef"):
        export_peft(POOL, tmp_path / "out2", cfg.backbone, results=other)
    assert not (tmp_path / "out2").exists()


# ---------------------------------------------------------------------------------------------- bad input


def test_cli_refuses_bad_input_and_writes_nothing(tmp_path, caplog):
    def export(*extra: str) -> int:
        caplog.clear()
        return main(["export", "--pool", POOL, "--config", str(CONFIG), *extra])

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert export("--out", str(busy)) == 2
    assert "exists and is not an empty folder" in caplog.text and str(busy) in caplog.text
    assert [p.name for p in busy.iterdir()] == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"

    assert export("--format", "onnx", "--out", str(tmp_path / "a")) == 2
    assert "'onnx' is not supported" in caplog.text and "peft" in caplog.text

    assert export("--out", str(tmp_path / "b"), "--results", str(tmp_path / "missing.json")) == 2
    assert "missing.json: no such file" in caplog.text

    not_pool = tmp_path / "not_a_pool"
    not_pool.mkdir()
    assert main(["export", "--pool", str(not_pool), "--out", str(tmp_path / "c")]) == 2
    assert "pool.json not found" in caplog.text

    pmf = tmp_path / "pmf"
    pmf.mkdir()
    (pmf / "pool.json").write_text(json.dumps({"backbone_fingerprint": "x", "mode": "full", "config": {},
                                               "members": []}))
    caplog.clear()
    assert main(["export", "--pool", str(pmf), "--out", str(tmp_path / "d")]) == 2
    assert "not a LoRA pool" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "not_a_pool", "pmf"]
