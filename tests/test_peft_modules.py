"""FiLM and Adapter pools (paper Table 17) on a tiny real ViT: identity at init, what trains, merging, round trips,
and a pool trained from the CLI evaluated as rows."""

from __future__ import annotations

import json

import pytest
import torch

from amt.cli import main
from amt.config import ConfigError, HeadConfig, PEFTConfig, PerturbConfig, PoolConfig, TrainConfig
from amt.lora import (
    active_adapter,
    adapter_state_dict,
    load_adapter_state_dict,
    mark_trainable,
    merged,
    pool_layers,
)
from amt.peft_modules import AdapterPool, FiLMPool, inject_peft, peft_layers
from amt.train import MetaTuning, check_settings
from test_pipeline import SMALL, TRAIN

from conftest import assert_same_state, gen, snapshot, tiny_backbone

CFG = PEFTConfig(adapter_bottleneck=8, adapter_scale=0.1)


def _pool(mode, names=("m0", "m1")):
    model = tiny_backbone()
    inject_peft(model.vit, mode, list(names), CFG, gen(1))
    return model


def _randomise(model, name, seed):
    with torch.no_grad():
        for p in [p for layer in pool_layers(model).values() for p in layer.adapter_parameters(name)]:
            p.add_(0.3 * torch.randn(p.shape, generator=gen(seed)))


@pytest.mark.parametrize("mode", ["film", "adapter"])
def test_a_fresh_pool_is_the_identity_and_keeps_the_backbones_names(mode):
    x = torch.rand(3, 3, 32, 32, generator=gen(0))
    bare = tiny_backbone()
    model = _pool(mode)
    torch.testing.assert_close(model(x), bare(x), rtol=0, atol=0)
    assert set(bare.state_dict()) <= set(model.state_dict())  # timm's names untouched; the pool's are added
    hosts = peft_layers(model)
    kind = FiLMPool if mode == "film" else AdapterPool
    assert hosts and all(isinstance(m, kind) for m in hosts.values())
    if mode == "film":  # every LayerNorm: norm1, norm2 of each of the 2 blocks and the final norm
        assert sorted(hosts) == sorted(f"vit.{n}.peft" for n in ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1",
                                                                  "blocks.1.norm2", "norm"])
    else:
        assert sorted(hosts) == ["vit.blocks.0.mlp.peft", "vit.blocks.1.mlp.peft"]
    _randomise(model, "m0", 2)
    assert not torch.allclose(model(x), bare(x))  # the module does act once its parameters move
    with active_adapter(model, None):
        torch.testing.assert_close(model(x), bare(x), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["film", "adapter"])
def test_only_the_members_module_trains_and_its_gradient_arrives(mode):
    model = _pool(mode)
    _randomise(model, "m1", 3)  # a zero up-projection passes no gradient to the down one: start away from it
    trained = mark_trainable(model, ["m1"])
    assert {id(p) for p in trained} == {id(p) for p in model.parameters() if p.requires_grad}
    with active_adapter(model, "m1"):
        model(torch.rand(2, 3, 32, 32, generator=gen(0))).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert all(p.grad is None for n, p in model.named_parameters() if ".m1." not in n)


@pytest.mark.parametrize("mode", ["film", "adapter"])
def test_merging_is_the_weight_average_and_restores_exactly(mode):
    x = torch.rand(2, 3, 32, 32, generator=gen(0))
    model = _pool(mode, ("m0", "m1", "avg"))
    _randomise(model, "m0", 4)
    _randomise(model, "m1", 5)
    with torch.no_grad():
        for layer in pool_layers(model).values():
            for key, t in layer.adapter_tensors("avg").items():
                t.copy_(0.25 * layer.adapter_tensors("m0")[key] + 0.75 * layer.adapter_tensors("m1")[key])
    before = snapshot(model)
    with active_adapter(model, "avg"):
        expected = model(x)
    with merged(model, {"m0": 0.25, "m1": 0.75}):
        torch.testing.assert_close(model(x), expected)
    assert not any(layer.merged for layer in pool_layers(model).values())
    assert_same_state(before, model)
    if mode == "film":  # FiLM is linear in its parameters: merging equals mixing the members' outputs
        with active_adapter(model, "m0"):
            y0 = model.vit.blocks[0].norm1(model.vit.patch_embed(x).flatten(0, 1))
        with active_adapter(model, "m1"):
            y1 = model.vit.blocks[0].norm1(model.vit.patch_embed(x).flatten(0, 1))
        with merged(model, {"m0": 0.25, "m1": 0.75}):
            y = model.vit.blocks[0].norm1(model.vit.patch_embed(x).flatten(0, 1))
        torch.testing.assert_close(y, 0.25 * y0 + 0.75 * y1)


@pytest.mark.parametrize("mode", ["film", "adapter"])
def test_member_state_dict_round_trips_into_a_fresh_pool(mode):
    x = torch.rand(2, 3, 32, 32, generator=gen(0))
    model = _pool(mode)
    _randomise(model, "m1", 6)
    state = adapter_state_dict(model, "m1")
    assert all(".peft." in k for k in state)
    fresh = _pool(mode)
    load_adapter_state_dict(fresh, "m0", state)
    with active_adapter(model, "m1"), active_adapter(fresh, "m0"):
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    if mode == "adapter":  # a member saved with another bottleneck does not load
        other = tiny_backbone()
        inject_peft(other.vit, mode, ["m0"], PEFTConfig(adapter_bottleneck=4), gen(1))
        with pytest.raises(ValueError, match="shape mismatch"):
            load_adapter_state_dict(other, "m0", state)


def test_apsv_and_a_separate_pool_of_another_size_are_refused():
    with pytest.raises(ConfigError, match="APSV perturbs LoRA factors"):
        check_settings(MetaTuning(TrainConfig(mode="film"), PoolConfig(), PerturbConfig(), HeadConfig()))
    with pytest.raises(ConfigError, match="pool.size"):
        check_settings(MetaTuning(TrainConfig(mode="film", apsv=False), PoolConfig(size=1), PerturbConfig(),
                                  HeadConfig()))
    check_settings(MetaTuning(TrainConfig(mode="film", apsv=False), PoolConfig(size=1, strategy="random"),
                              PerturbConfig(), HeadConfig()))


def test_film_pool_and_single_adapter_train_from_the_cli_and_evaluate_as_rows(tmp_path):
    common = ["--set", f"cache_dir={tmp_path / 'cache'}", *SMALL, *TRAIN, "--set", "eval.shots=[1]",
              "--set", "eval.corruptions=[]", "--set", "eval.adversarial=false", "--set", "eval.n_tasks=2",
              "--set", "finetune.steps=2", "--set", "finetune.lr_grid=[]", "--set", "peft.adapter_bottleneck=16"]
    assert main(["train", "--variant", "film_pool", "--out", str(tmp_path / "film"), *common]) == 0
    assert main(["train", "--variant", "adapter", "--out", str(tmp_path / "adapter"), *common]) == 0
    film = json.loads((tmp_path / "film" / "pool.json").read_text())
    adapter = json.loads((tmp_path / "adapter" / "pool.json").read_text())
    assert film["mode"] == "film" and len(film["members"]) == 2  # one per ε of TRAIN's pool.eps
    assert adapter["mode"] == "adapter" and len(adapter["members"]) == 1
    assert adapter["members"][0]["attack"] == {"strategy": "random", "eps": [0.004, 0.03]}
    methods = (f"methods=[{{name: PM}}, {{name: FiLM-pool, pool: {tmp_path / 'film'}, rule: ttm}}, "
               f"{{name: FiLM-avg, pool: {tmp_path / 'film'}, rule: uniform}}, "
               f"{{name: FiLM-logits, pool: {tmp_path / 'film'}, rule: logit_avg}}, "
               f"{{name: FiLM-classifier, pool: {tmp_path / 'film'}, rule: linear_classifier}}, "
               f"{{name: Adapter, pool: {tmp_path / 'adapter'}, rule: single}}, "
               f"{{name: Adapter-FT, pool: {tmp_path / 'adapter'}, rule: single, finetune: true}}]")
    assert main(["evaluate", "--out", str(tmp_path / "ev"), *common, "--set", methods]) == 0
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())["results"]
    assert {r["method"] for r in rows} == {"PM", "FiLM-pool", "FiLM-avg", "FiLM-logits", "FiLM-classifier", "Adapter",
                                          "Adapter-FT"}
