"""Properties of the LoRA pool layer and the model-level pool operations on a tiny real timm ViT."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amt.lora import (
    active_adapter,
    adapter_names,
    adapter_parameters,
    adapter_state_dict,
    add_adapter,
    check_residual_fingerprint,
    inject_lora,
    load_adapter_state_dict,
    lora_layers,
    mark_trainable,
    merge_adapters,
    merged,
    remove_adapter,
    residual_fingerprint,
    set_active_adapter,
    unmerge_adapters,
)
from amt.lora_layer import LoRALinear

from conftest import gen, tiny_vit

RANK = 8
EXPECTED = [f"blocks.{i}.{t}" for i in range(2) for t in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=gen(1))


@pytest.fixture
def pool() -> nn.Module:
    """Tiny ViT with an SVD-initialised pool of three members."""
    model = tiny_vit()
    inject_lora(model, names=("m0", "m1", "m2"), rank=RANK)
    return model


def randomize_adapters(model: nn.Module, seed: int = 2) -> None:
    g = gen(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name in layer.adapter_names:
                for p in layer.adapter_parameters(name):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {q: layer.weight.detach().clone() for q, layer in lora_layers(model).items()}


def hand_delta(layer: LoRALinear, name: str) -> torch.Tensor:
    """ΔW ``[out, in]`` assembled by hand from the factors, independently of ``LoRALinear.delta_weight``.

    Row block j (q, k, v for ``attn.qkv``; the whole matrix otherwise) is scaling · B[j-th out/splits rows] @
    A[j-th rank rows], computed in float64.
    """
    a, b = layer.lora_A[name].detach().double(), layer.lora_B[name].detach().double()
    r, block = layer.rank, layer.out_features // layer.splits
    rows = [b[j * block : (j + 1) * block] @ a[j * r : (j + 1) * r] for j in range(layer.splits)]
    return (layer.scaling * torch.cat(rows)).float()


def test_injection_hits_exactly_the_targets() -> None:
    model = tiny_vit()
    replaced = inject_lora(model, rank=RANK)
    assert replaced == EXPECTED
    assert list(lora_layers(model)) == EXPECTED
    assert isinstance(model.patch_embed.proj, nn.Conv2d)
    for q, layer in lora_layers(model).items():
        assert layer.splits == (3 if q.endswith("attn.qkv") else 1)
        assert not layer.weight.requires_grad and not layer.bias.requires_grad
        assert layer.active_adapter == "member0"
        assert layer.lora_A["member0"].shape == (layer.splits * RANK, layer.in_features)
        assert layer.lora_B["member0"].shape == (layer.out_features, RANK)


def test_svd_init_preserves_function_and_weights(images: torch.Tensor) -> None:
    model = tiny_vit()
    original = {q: model.get_submodule(q).weight.detach().clone() for q in EXPECTED}
    with torch.no_grad():
        before = model(images)
    inject_lora(model, names=("m0", "m1"), rank=RANK)
    with torch.no_grad():
        after = model(images)
    torch.testing.assert_close(after, before, atol=1e-5 * before.abs().max().item(), rtol=0)
    for q, layer in lora_layers(model).items():
        delta = hand_delta(layer, "m0")
        torch.testing.assert_close(layer.weight + delta, original[q], atol=1e-6, rtol=0)
        assert torch.equal(layer.lora_A["m0"], layer.lora_A["m1"])
        assert torch.equal(layer.lora_B["m0"], layer.lora_B["m1"])
        block = layer.out_features // layer.splits
        for j in range(layer.splits):
            rows = slice(j * block, (j + 1) * block)
            assert torch.linalg.matrix_rank(delta[rows], rtol=1e-4).item() == RANK
            # the residual keeps exactly the trailing spectrum of its block
            s_orig = torch.linalg.svdvals(original[q][rows].double())
            s_res = torch.linalg.svdvals(layer.weight[rows].double())
            torch.testing.assert_close(s_res[: len(s_orig) - RANK], s_orig[RANK:], atol=1e-5, rtol=0)


def test_later_svd_adapter_gets_initial_factors_and_shares_residual(pool: nn.Module) -> None:
    residual = base_weights(pool)
    init_A = {q: layer.lora_A["m0"].detach().clone() for q, layer in lora_layers(pool).items()}
    randomize_adapters(pool)
    add_adapter(pool, "m3")
    for q, layer in lora_layers(pool).items():
        assert torch.equal(layer.weight, residual[q])
        assert torch.equal(layer.lora_A["m3"], init_A[q])
    assert adapter_names(pool) == ["m0", "m1", "m2", "m3"]


def test_standard_init_is_identity_and_reproducible(images: torch.Tensor) -> None:
    model = tiny_vit()
    original = {q: model.get_submodule(q).weight.detach().clone() for q in EXPECTED}
    with torch.no_grad():
        before = model(images)
    inject_lora(model, names=("m0", "m1"), rank=RANK, init="standard", generator=gen(5))
    with torch.no_grad():
        after = model(images)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    twin = tiny_vit()
    inject_lora(twin, names=("m0", "m1"), rank=RANK, init="standard", generator=gen(5))
    other = tiny_vit()
    inject_lora(other, names=("m0",), rank=RANK, init="standard", generator=gen(6))
    for q, layer in lora_layers(model).items():
        assert torch.equal(layer.weight, original[q])
        assert torch.count_nonzero(layer.lora_B["m0"]) == 0
        assert layer.lora_A["m0"].abs().max() <= layer.in_features**-0.5
        assert not torch.equal(layer.lora_A["m0"], layer.lora_A["m1"])
        assert torch.equal(layer.lora_A["m1"], lora_layers(twin)[q].lora_A["m1"])
        assert not torch.equal(layer.lora_A["m0"], lora_layers(other)[q].lora_A["m0"])


def test_mixing_init_modes_raises(pool: nn.Module) -> None:
    with pytest.raises(ValueError, match="one init mode"):
        add_adapter(pool, "extra", init="standard")
    std = tiny_vit()
    inject_lora(std, rank=RANK, init="standard")
    with pytest.raises(ValueError, match="one init mode"):
        add_adapter(std, "extra", init="svd")


def test_delta_weight_is_the_blockwise_product_of_the_factors(pool: nn.Module) -> None:
    randomize_adapters(pool)
    for q, layer in lora_layers(pool).items():
        expected = hand_delta(layer, "m1")
        torch.testing.assert_close(layer.delta_weight("m1").detach(), expected, atol=1e-6, rtol=1e-5)
        if layer.splits == 3:  # q, k, v blocks use their own factors: no cross terms between blocks
            r, block = layer.rank, layer.out_features // 3
            a, b = layer.lora_A["m1"].detach(), layer.lora_B["m1"].detach()
            k_rows = slice(block, 2 * block)
            torch.testing.assert_close(layer.delta_weight("m1")[k_rows].detach(), b[k_rows] @ a[r : 2 * r])
            assert not torch.allclose(expected[k_rows], b[k_rows] @ a[:r], atol=1e-4), q


def test_active_forward_equals_dense_linear(pool: nn.Module) -> None:
    """Each layer's output equals F.linear with the hand-built weight W_res + scaling·B·A (blockwise for qkv)."""
    randomize_adapters(pool)
    x = torch.randn(2, 5, 192, generator=gen(3))
    for layer in lora_layers(pool).values():
        xi = x[..., : layer.in_features]
        for name in ("m1", None):
            layer.set_active_adapter(name)
            w = layer.weight if name is None else layer.weight + hand_delta(layer, name)
            torch.testing.assert_close(layer(xi), F.linear(xi, w, layer.bias), atol=1e-5, rtol=1e-5)


def test_folded_and_factored_adapter_paths_agree_in_value_and_gradient(pool: nn.Module) -> None:
    """Many rows take the folded path x (W_res + ΔW)ᵀ, one row the factored B (A x): same outputs and factor grads."""
    randomize_adapters(pool)
    layer = next(iter(lora_layers(pool).values()))
    layer.set_active_adapter("m1")
    x = torch.randn(400, layer.in_features, generator=gen(5))
    grads = []
    for chunks in (x[None], x[:, None]):  # one call with 400 rows (folded) / 400 calls with one row (factored)
        out = torch.cat([layer(c) for c in chunks]).reshape(400, -1)
        (out.square().sum()).backward()
        grads.append([p.grad.clone() for p in layer.adapter_parameters("m1")])
        for p in layer.adapter_parameters("m1"):
            p.grad = None
        torch.testing.assert_close(
            out.detach(), F.linear(x, layer.weight + hand_delta(layer, "m1"), layer.bias), atol=1e-5, rtol=1e-5
        )
    for folded, factored in zip(*grads):
        assert folded.abs().max() > 0
        torch.testing.assert_close(folded, factored, atol=1e-4, rtol=1e-4)


def test_scaling_multiplies_the_adapter_term() -> None:
    model = tiny_vit()
    inject_lora(model, names=("m0",), rank=RANK, scaling=0.5)
    randomize_adapters(model)
    x = torch.randn(3, 48, generator=gen(4))
    layer = lora_layers(model)["blocks.1.attn.qkv"]
    a, b = layer.lora_A["m0"].detach(), layer.lora_B["m0"].detach()
    block = layer.out_features // 3
    ba = torch.cat([b[j * block : (j + 1) * block] @ a[j * RANK : (j + 1) * RANK] for j in range(3)])
    w = layer.weight + 0.5 * ba
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight("m0").detach(), 0.5 * ba, atol=1e-6, rtol=1e-5)
    with merged(model, {"m0": 1.0}):
        torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), atol=1e-5, rtol=1e-5)


def test_merge_unmerge_restores_bit_for_bit(pool: nn.Module) -> None:
    randomize_adapters(pool)
    residual = base_weights(pool)
    merge_adapters(pool, {"m0": 0.3, "m1": torch.tensor(0.7)})
    assert all(not torch.equal(layer.weight, residual[q]) for q, layer in lora_layers(pool).items())
    with pytest.raises(RuntimeError, match="already merged"):
        merge_adapters(pool, {"m0": 1.0})
    unmerge_adapters(pool)
    for q, layer in lora_layers(pool).items():
        assert torch.equal(layer.weight, residual[q])
        assert not layer.merged


def test_weighted_merge_equals_weighted_sum_of_deltas(pool: nn.Module, images: torch.Tensor) -> None:
    randomize_adapters(pool)
    weights = {"m0": 0.2, "m1": 0.5, "m2": 0.3}
    residual = base_weights(pool)
    # reference model: each LoRA layer replaced by a plain Linear with W_res + Σ w ΔW
    reference = copy.deepcopy(pool)
    for q, layer in lora_layers(reference).items():
        dense = nn.Linear(layer.in_features, layer.out_features)
        with torch.no_grad():
            dense.weight.copy_(layer.weight + sum(w * hand_delta(layer, n) for n, w in weights.items()))
            dense.bias.copy_(layer.bias)
        parent, _, child = q.rpartition(".")
        setattr(reference.get_submodule(parent), child, dense)
    with merged(pool, weights), torch.no_grad():
        for q, layer in lora_layers(pool).items():
            expected = sum(w * hand_delta(layer, n) for n, w in weights.items())
            torch.testing.assert_close(layer.weight - residual[q], expected, atol=1e-6, rtol=1e-5)
        out = pool(images)
        ref = reference(images)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_single_member_merge_equals_active_forward(pool: nn.Module, images: torch.Tensor) -> None:
    randomize_adapters(pool)
    with active_adapter(pool, "m1"), torch.no_grad():
        active = pool(images)
    with merged(pool, {"m1": 1.0}), torch.no_grad():
        merged_out = pool(images)
    torch.testing.assert_close(merged_out, active, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(active, pool(images).detach(), atol=1e-4)  # pool's active is still m0


def test_gradients_reach_only_the_active_adapter(pool: nn.Module, images: torch.Tensor) -> None:
    randomize_adapters(pool)
    trainable = mark_trainable(pool, "m1")
    assert {id(p) for p in trainable} == {id(p) for p in adapter_parameters(pool, "m1")}
    assert {id(p) for p in pool.parameters() if p.requires_grad} == {id(p) for p in trainable}
    mark_trainable(pool, ["m0", "m1"])
    with active_adapter(pool, "m1"):
        pool(images).pow(2).sum().backward()
    for layer in lora_layers(pool).values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.adapter_parameters("m1"))
        assert all(p.grad is None for p in layer.adapter_parameters("m0"))
        assert layer.weight.grad is None
    assert all(p.grad is None for n, p in pool.named_parameters() if "lora_" not in n)


def test_adapter_state_dict_round_trip(pool: nn.Module, images: torch.Tensor) -> None:
    randomize_adapters(pool)
    state = adapter_state_dict(pool, "m0")
    assert set(state) == {f"{q}.{f}" for q in EXPECTED for f in ("lora_A", "lora_B")}
    assert "blocks.0.attn.qkv.lora_A" in state
    load_adapter_state_dict(pool, "m2", state)
    for layer in lora_layers(pool).values():
        assert torch.equal(layer.lora_A["m2"], layer.lora_A["m0"])
        assert torch.equal(layer.lora_B["m2"], layer.lora_B["m0"])
    with torch.no_grad(), active_adapter(pool, "m0"):
        out0 = pool(images)
    with torch.no_grad(), active_adapter(pool, "m2"):
        out2 = pool(images)
    assert torch.equal(out0, out2)
    state["blocks.0.mlp.fc1.lora_A"].add_(1.0)  # a copy, not a view of the parameter
    assert not torch.equal(lora_layers(pool)["blocks.0.mlp.fc1"].lora_A["m0"], state["blocks.0.mlp.fc1.lora_A"])


def test_strict_loading_names_bad_keys(pool: nn.Module) -> None:
    state = adapter_state_dict(pool, "m0")
    missing = dict(state)
    del missing["blocks.1.mlp.fc2.lora_B"]
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.mlp.fc2.lora_B'\]"):
        load_adapter_state_dict(pool, "m1", missing)
    result = load_adapter_state_dict(pool, "m1", missing, strict=False)
    assert result.missing_keys == ["blocks.1.mlp.fc2.lora_B"]
    extra = dict(state, **{"blocks.0.attn.bogus.lora_A": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys.*blocks.0.attn.bogus.lora_A"):
        load_adapter_state_dict(pool, "m1", extra)
    wrong = dict(state, **{"blocks.0.attn.qkv.lora_A": torch.zeros(RANK, 48)})
    with pytest.raises(ValueError, match="shape mismatch.*blocks.0.attn.qkv.lora_A"):
        load_adapter_state_dict(pool, "m1", wrong, strict=False)
    with pytest.raises(KeyError, match="nope"):
        load_adapter_state_dict(pool, "nope", state)


def test_merged_context_restores_after_exception(pool: nn.Module) -> None:
    randomize_adapters(pool)
    residual = base_weights(pool)
    with pytest.raises(RuntimeError, match="inside the merged block"), merged(pool, {"m0": 0.5, "m2": 0.5}):
        assert all(layer.merged for layer in lora_layers(pool).values())
        raise RuntimeError("inside the merged block")
    for q, layer in lora_layers(pool).items():
        assert torch.equal(layer.weight, residual[q])
        assert not layer.merged
    with pytest.raises(KeyError, match="unknown"):
        merge_adapters(pool, {"unknown": 1.0})
    assert not any(layer.merged for layer in lora_layers(pool).values())


def test_active_adapter_context_and_removal(pool: nn.Module) -> None:
    set_active_adapter(pool, "m2")
    with pytest.raises(RuntimeError), active_adapter(pool, None):
        assert all(layer.active_adapter is None for layer in lora_layers(pool).values())
        raise RuntimeError
    assert all(layer.active_adapter == "m2" for layer in lora_layers(pool).values())
    with pytest.raises(KeyError, match="missing"):
        set_active_adapter(pool, "missing")
    remove_adapter(pool, "m2")
    assert adapter_names(pool) == ["m0", "m1"]
    assert all(layer.active_adapter is None for layer in lora_layers(pool).values())


def test_bad_rank_and_targets_raise() -> None:
    with pytest.raises(ValueError, match=r"rank=49 is too large for blocks.0.attn.qkv"):
        inject_lora(tiny_vit(), rank=49)
    with pytest.raises(ValueError, match=r"targets \['attn.qkvz'\].*patch_embed"):
        inject_lora(tiny_vit(), targets=("attn.qkvz",))
    with pytest.raises(ValueError, match="rank=5"):
        LoRALinear(nn.Linear(4, 12), rank=5)
    model = tiny_vit()
    inject_lora(model, rank=RANK)
    with pytest.raises(ValueError, match="already carries LoRA"):
        inject_lora(model, rank=RANK)


def test_residual_fingerprint_is_json_ready_and_tolerant_only_of_rounding(pool: nn.Module) -> None:
    saved = json.loads(json.dumps(residual_fingerprint(pool)))
    assert list(saved) == EXPECTED and all(len(v) == 2 and v[0] > 0 for v in saved.values())
    check_residual_fingerprint(pool, saved, "pool.json")  # same model
    randomize_adapters(pool)  # the adapters are not part of W_res
    check_residual_fingerprint(pool, saved, "pool.json")
    fresh = tiny_vit()
    inject_lora(fresh, names=("a",), rank=RANK)  # rebuilt and injected the same way (SVD recomputed)
    check_residual_fingerprint(fresh, saved, "pool.json")
    with torch.no_grad():  # rounding-sized noise (1e-7 of the norm) is accepted
        for layer in lora_layers(fresh).values():
            layer.weight.mul_(1 + 1e-7)
    check_residual_fingerprint(fresh, saved, "pool.json")


def test_residual_fingerprint_names_the_changed_layer(pool: nn.Module) -> None:
    saved = residual_fingerprint(pool)
    layer = lora_layers(pool)["blocks.1.mlp.fc1"]
    with torch.no_grad():  # one element of one layer moves by 1% of the layer's norm (away from zero)
        w = layer.weight.view(-1)
        i = int(w.abs().argmax())
        w[i] += 0.01 * torch.linalg.matrix_norm(layer.weight) * torch.sign(w[i])
    with pytest.raises(ValueError, match=r"runs/pool\.json: LoRA layer 'blocks\.1\.mlp\.fc1'.*W_res.*retrain"):
        check_residual_fingerprint(pool, saved, "runs/pool.json")
    other_rank = tiny_vit()
    inject_lora(other_rank, rank=RANK // 2)  # other LoRA settings: another residual
    with pytest.raises(ValueError, match="blocks.0.attn.qkv"):
        check_residual_fingerprint(other_rank, saved, "pool.json")


def test_residual_fingerprint_refuses_other_layers_and_merged_weights(pool: nn.Module) -> None:
    saved = residual_fingerprint(pool)
    fewer = tiny_vit()
    inject_lora(fewer, targets=("attn.qkv", "attn.proj"), rank=RANK)
    with pytest.raises(ValueError, match=r"in the pool only: \['blocks.0.mlp.fc1'"):
        check_residual_fingerprint(fewer, saved, "pool.json")
    with merged(pool, {"m0": 1.0}), pytest.raises(RuntimeError, match="unmerge"):
        residual_fingerprint(pool)
