"""The test-time rows of the paper's Tables 1, 3 and 6 on a tiny real timm ViT with a trained-looking pool: ATTNSCALE
(and ATTNSCALE + AMT-FT) trains only attention scales and restores everything; adversarial test-time fine-tuning
attacks its pseudo-queries inside the ε-ball and changes the tuned model; the linear-classifier merge rule gives a
probability vector that follows the member whose attacks look like the support images."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from amt.config import AttackConfig, ConfigError, FinetuneConfig, MergeConfig, MethodConfig
from amt.finetune import attacked_pseudo_queries, attention_scaled
from amt.head import cosine_logits, prototypes
from amt.merge import fit_member_classifier, member_probabilities, pseudo_queries
from amt.methods import FinetunedMethod, PoolMethod
from amt.rundir import LoadedPool
from test_methods import AUG, CFG, POOL, _method, _queries

from conftest import assert_same_state, gen, snapshot
from test_merge import NAMES, make_pool, make_support

ATTACK = AttackConfig(eps=8 / 255, step_size=4 / 255, steps=2)


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _features(fn, x):
    with torch.no_grad():
        return fn.model(x)


@pytest.mark.parametrize("rule", ["uniform", "ttm"])  # "ttm" + attnscale = ATTNSCALE + AMT-FT
def test_attnscale_trains_only_attention_scales_changes_support_features_and_restores_everything(rule):
    inner = _method(rule)
    before = snapshot(inner.model)
    x, y = make_support()
    q = _queries()
    with inner.adapt(x, y, 3, gen(0)) as (fn, _):
        task_state = snapshot(inner.model)  # the merged per-task model ATTNSCALE starts from
        start_feats, start_logits = _features(fn, x), fn(q).detach()
    outs = {}
    for lr in (0.0, 5e-2):
        method = FinetunedMethod(inner, FinetuneConfig(steps=3, attnscale_lr_grid=(lr,)), AUG, tuned="attnscale")
        assert method.lr == lr and method.tunable == inner.tunable
        with method.adapt(x, y, 3, gen(0)) as (fn, record):
            assert_same_state(task_state, inner.model)  # no weight moved: only the hooks' scales were trained
            assert _hooks(inner.model) == 2 * 2  # qkv and proj of both blocks
            outs[lr] = (_features(fn, x), fn(q).detach())
            assert record.extra["finetune_lr"] == lr
        assert_same_state(before, inner.model)
        assert _hooks(inner.model) == 0
        assert all(not p.requires_grad for n, p in inner.model.named_parameters() if "lora" not in n)
    assert torch.equal(outs[0.0][1], start_logits)  # scales at 1, offsets at 0: exactly the model it starts from
    assert (outs[5e-2][0] - start_feats).abs().max() > 1e-3  # tuning changed the support features


def test_test_time_lora_trains_only_fresh_factors_changes_features_and_restores_everything():
    inner = _method("ttm")  # test-time LoRA on the merged AMT model
    before = snapshot(inner.model)
    x, y = make_support()
    with inner.adapt(x, y, 3, gen(0)) as (fn, _):
        task_state, start_feats = snapshot(inner.model), _features(fn, x)
    feats = {}
    for lr in (0.0, 5e-2):
        method = FinetunedMethod(inner, FinetuneConfig(steps=3, lora_rank=4, lora_lr_grid=(lr,)), AUG, tuned="lora")
        with method.adapt(x, y, 3, gen(0)) as (fn, record):
            assert_same_state(task_state, inner.model)  # the weights never move: the fresh factors live in hooks
            assert _hooks(inner.model) == 2 * 4  # qkv, proj, fc1, fc2 of both blocks
            feats[lr] = _features(fn, x)
        assert_same_state(before, inner.model)
        assert _hooks(inner.model) == 0
    assert torch.equal(feats[0.0], start_feats)  # B = 0: exactly the model it starts from
    assert (feats[5e-2] - start_feats).abs().max() > 1e-3  # tuning the factors changed the support features
    with pytest.raises(ValueError, match="lora_rank"):
        with FinetunedMethod(inner, FinetuneConfig(lora_rank=0, lora_lr_grid=(1e-2,)), AUG, tuned="lora").adapt(
                x, y, 3, gen(0)):
            pass


def test_attention_scales_are_the_only_new_parameters_and_multiply_the_projections():
    model = make_pool()
    x, _ = make_support()
    with torch.no_grad():
        clean = model(x)
    with attention_scaled(model) as params:
        shapes = sorted(tuple(p.shape) for p in params)
        assert shapes == sorted([(3 * 48,), (48,), (48,)] * 2)  # per block: q,k,v scales; proj scale and offset
        assert not any(p is q for p in params for q in model.parameters())
        with torch.no_grad():
            torch.testing.assert_close(model(x), clean, rtol=0, atol=0)
            for p in params:
                p.fill_(0.0)  # every attention output zeroed: only the MLP paths remain, the features change
            assert not torch.allclose(model(x), clean)
    with torch.no_grad():
        torch.testing.assert_close(model(x), clean, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no attention"), attention_scaled(torch.nn.Linear(3, 3)):
        pass


def test_adversarial_pseudo_queries_stay_in_the_eps_ball_and_raise_the_loss():
    model = make_pool()
    x, y = make_support()
    pseudo, labels = pseudo_queries(x, y, AUG, gen(3))
    adv = attacked_pseudo_queries(model, x, y, 3, pseudo, labels, 10.0, ATTACK, gen(4))
    assert adv.shape == pseudo.shape and adv.min() >= 0 and adv.max() <= 1
    gap = (adv - pseudo).abs().amax()
    assert ATTACK.eps / 2 < gap <= ATTACK.eps + 1e-6
    with torch.no_grad():
        protos = prototypes(model(x), y, 3)
        ce = [F.cross_entropy(cosine_logits(model(z), protos, 10.0), labels) for z in (pseudo, adv)]
    assert ce[1] > ce[0]
    again = attacked_pseudo_queries(model, x, y, 3, pseudo, labels, 10.0, ATTACK, gen(4))
    assert torch.equal(adv, again)  # the generator drives the random start


@pytest.mark.parametrize("tuned", ["full", "attnscale"])  # Adv. TTF for PMF/AMT-FT, and for ATTNSCALE
def test_adversarial_finetuning_changes_the_tuned_model_and_restores_every_weight(tuned):
    inner = _method("ttm")
    before = snapshot(inner.model)
    x, y = make_support()
    q = _queries()
    cfg = FinetuneConfig(steps=2, lr_grid=(1e-2,), attnscale_lr_grid=(5e-2,), attack=ATTACK)
    outs = {}
    for adversarial in (False, True):
        method = FinetunedMethod(inner, cfg, AUG, tuned=tuned, adversarial=adversarial)
        with method.adapt(x, y, 3, gen(0)) as (fn, _):
            with torch.no_grad():
                outs[adversarial] = fn(q)
        assert_same_state(before, inner.model)
        assert _hooks(inner.model) == 0
    assert not torch.allclose(outs[False], outs[True])
    with pytest.raises(ValueError, match="fine-tuning target"):
        FinetunedMethod(inner, cfg, AUG, tuned="prompt")


def test_member_classifier_recovers_which_member_produced_a_sample():
    g = gen(0)
    centres = 3 * torch.randn(3, 8, generator=g)
    members = torch.arange(3).repeat_interleave(20)
    feats = centres[members] + torch.randn(60, 8, generator=g)
    weight = fit_member_classifier(feats, members, 3, MergeConfig())
    probs = member_probabilities(weight, feats)
    assert torch.allclose(probs.sum(1), torch.ones(60)) and (probs > 0).all()
    assert (probs.argmax(1) == members).float().mean() > 0.9
    assert torch.equal(weight, fit_member_classifier(feats, members, 3, MergeConfig()))  # deterministic


def _linear(eps: tuple[float, ...], model=None) -> PoolMethod:
    pool = LoadedPool(tuple(NAMES), POOL.scales, eps)
    return PoolMethod(model or make_pool(), pool, "linear_classifier", CFG, AUG, attack=ATTACK)


def test_linear_classifier_rule_follows_the_member_whose_attacks_look_like_the_support():
    weak, strong = 0.2 / 255, 64 / 255
    x, y = make_support()
    zetas = {}
    for order in ((weak, strong, strong), (strong, strong, weak)):
        method = _linear(order)
        before = snapshot(method.model)
        with method.adapt(x, y, 3, gen(0)) as (fn, record):
            assert fn(_queries()).shape == (6, 3)
            zetas[order] = z = torch.tensor(record.coefficients)
        assert_same_state(before, method.model)
        assert z.sum().item() == pytest.approx(1.0) and (z > 0).all()  # every member gets a weight
    # clean support images resemble the weakly attacked samples: the member attacked at the small radius leads
    assert int(zetas[(weak, strong, strong)].argmax()) == 0
    assert int(zetas[(strong, strong, weak)].argmax()) == 2


def test_linear_classifier_rule_needs_the_members_radii_and_fine_tunes_like_any_single_model():
    with pytest.raises(ValueError, match="one eps per member"):
        PoolMethod(make_pool(), POOL, "linear_classifier", CFG, AUG, attack=ATTACK)
    with pytest.raises(ValueError, match="one eps per member"):
        PoolMethod(make_pool(), LoadedPool(tuple(NAMES), POOL.scales, (1 / 255,) * 3), "linear_classifier", CFG, AUG)
    method = FinetunedMethod(_linear((1 / 255, 4 / 255, 8 / 255)), FinetuneConfig(steps=1, lr_grid=(1e-2,)), AUG)
    x, y = make_support()
    before = snapshot(method.model)
    with method.adapt(x, y, 3, gen(0)) as (fn, record):
        assert fn(_queries()).shape == (6, 3) and len(record.coefficients) == 3
    assert_same_state(before, method.model)


def test_rows_without_finetune_refuse_the_finetuning_switches():
    from amt.pipeline import build_methods

    for row in (MethodConfig("X", finetune_params="attnscale"), MethodConfig("X", finetune_adversarial=True)):
        cfg = _embedded(row)
        with pytest.raises(ConfigError, match="finetune: true"):
            build_methods(cfg)


def test_a_loaded_pool_records_each_members_training_radius():
    import json

    from amt.pipeline import build_methods, embedded_asset
    from amt.rundir import MANIFEST_FILE

    method = build_methods(_embedded(MethodConfig("LC", pool="embedded:glyph_pool", rule="linear_classifier")))[0]["LC"]
    manifest = json.loads((embedded_asset("glyph_pool") / MANIFEST_FILE).read_text())
    assert manifest["config"]["pool"]["strategy"] == "separate"
    assert method.member_eps == tuple(manifest["config"]["pool"]["eps"])


def _embedded(row: MethodConfig):
    """The embedded default's configuration with one evaluated row (no benchmark is built)."""
    from amt.config import DomainConfig, load_config
    from amt.pipeline import resolve

    cfg = load_config("configs/embedded.yaml")
    return resolve(dataclasses.replace(cfg, benchmark="custom", domains=(DomainConfig("x", "."),), methods=(row,)))


def test_the_documented_test_time_rows_parse_on_the_paper_preset():
    """docs/paper.md's `M1` (Tables 1-2, with the ATTNSCALE rows), `MA1` (Table 3's Adv. TTF) and Table 6's
    linear-classifier row build valid configurations of the Meta-Dataset preset."""
    import re
    from pathlib import Path

    from amt.config import load_config, parse_override

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "paper.md").read_text()
    rows = {}
    for var in ("M1", "MA1"):
        text = re.search(rf'^{var}="(methods=.*)"$', doc, re.M).group(1)
        preset = root / "configs" / "paper" / "metadataset.yaml"
        rows[var] = {m.name: m for m in load_config(preset, parse_override(text)).methods}
        assert len(rows[var]) > len(load_config(preset).methods)
    assert rows["M1"]["ATTNSCALE"].finetune_params == "attnscale" and rows["M1"]["ATTNSCALE"].pool is None
    assert rows["M1"]["ATTNSCALE+AMT-FT"].rule == "ttm" and rows["M1"]["ATTNSCALE+AMT-FT"].finetune
    assert all(m.finetune_adversarial for n, m in rows["MA1"].items() if n != "PM")
    assert "{name: Linear classifier, pool: runs/paper/amt_1shot, rule: linear_classifier}" in doc
    table_rows = [line for line in doc.splitlines() if line.startswith(("| **Table 3**", "| **Table 6**"))]
    assert len(table_rows) == 2 and not any("not built" in line for line in table_rows)
