"""Meta-tuning on a tiny real timm ViT and real image folders: parameter sets, switches, resume, failures."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from amt.backbone import Backbone
from amt.config import (
    VARIANTS,
    AttackConfig,
    AugmentConfig,
    ConfigError,
    DataConfig,
    DomainConfig,
    ExperimentConfig,
    HeadConfig,
    LoRAConfig,
    PEFTConfig,
    PerturbConfig,
    PoolConfig,
    TrainConfig,
    from_dict,
    merge_dicts,
    to_dict,
    variant_overrides,
)
from amt.data.domains import load_domain
from amt.data.episodes import FixedSampler, load_episode
from amt.data.transforms import build_transform
from amt.lora import (
    adapter_parameters,
    adapter_state_dict,
    inject_lora,
    lora_layers,
    mark_trainable,
    set_active_adapter,
)
from amt.peft_modules import PEFT_MODES, inject_peft
from amt.rundir import check_fingerprint, load_weights, member_names
from amt.train import (
    MemberSpec,
    MetaTuning,
    TrainingError,
    kl_clean_adv,
    lr_at,
    member_attack,
    meta_loss,
    train_member,
    training_step,
)

from conftest import changed_keys, gen, snapshot, tiny_backbone, write_image_folder

SIZE = 32
POOL = PoolConfig(eps=(2 / 255, 8 / 255), attack=AttackConfig(steps=2, objective="kl"))
TINY = TrainConfig(epochs=1, episodes_per_epoch=6, warmup_epochs=0.5, lr=0.05, n_way=3, n_shot=1, n_query=2,
                   val_every=3, val_tasks=2, checkpoint_every=2, seed=3)


def _model(names=("member0", "member1"), init="svd") -> Backbone:
    model = tiny_backbone(image_size=SIZE)
    if names:
        inject_lora(model.vit, LoRAConfig().targets, list(names), rank=4, init=init, generator=gen(1))
    return model


def write_data(path):
    return write_image_folder(path / "d", n_classes=6, per_class=6, size=SIZE)


def load_data(root):
    dcfg = DataConfig(resize_ratio=1.0, cache_decoded=True)
    dom = DomainConfig(name="d", path=str(root))
    return tuple(load_domain(dom, dcfg, build_transform(SIZE, dcfg, AugmentConfig(), train)) for train in (True, False))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_data(write_data(tmp_path_factory.mktemp("train")))


def _episode(dataset, seed=0):
    sampler = FixedSampler(dataset.indices_by_class(), 3, 1, 2, gen(seed), "d")
    return load_episode(dataset, sampler.sample())


def _run(model, tmp_path, data, cfg=TINY, perturb=None, pool=POOL, name="member0", index=0, **kw):
    spec = MemberSpec(index, name, tmp_path / (name or "full"))
    settings = MetaTuning(cfg, pool, perturb or PerturbConfig(), HeadConfig())
    return train_member(model, spec, data[0], data[1], settings, **kw), spec


def _member_step(data, apq=True, apsv=False, lambda_adv=6.0, eta=1e-4, model=None, episode=None):
    """One training step of member0 (trained: member0's factors and the scale); returns (model, grads, result)."""
    model = model or _model()
    trained = mark_trainable(model, ["member0"])
    set_active_adapter(model, "member0")
    scale = torch.nn.Parameter(torch.tensor(10.0))
    attack = member_attack(POOL, 1, gen(0)) if apq else None
    _, res = training_step(model, episode or _episode(data[0]), scale,
                           adapter_parameters(model, "member0") if apsv else None, attack, PerturbConfig(eta=eta),
                           lambda_adv, gen(0))
    return model, [p.grad.clone() for p in trained + [scale]], res


# ---------------------------------------------------------------------------- schedule and attacks


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(epochs=4, episodes_per_epoch=10, warmup_epochs=1, lr=1e-2, warmup_lr=1e-5, min_lr=1e-4)
    lrs = [lr_at(i, cfg) for i in range(40)]
    assert lrs[0] == pytest.approx(1e-5)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warm-up rises
    assert max(lrs) == pytest.approx(1e-2)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine never rises
    assert 1e-4 <= lrs[-1] < 2e-4


def test_pool_strategies_choose_the_documented_radius():
    gen = torch.Generator().manual_seed(0)
    a1 = member_attack(POOL, 1, gen)
    assert a1.eps == POOL.eps[1] and a1.step_size == pytest.approx(0.5 * POOL.eps[1]) and a1.objective == "kl"
    uni = dataclasses.replace(POOL, strategy="uniform")
    assert [member_attack(uni, i, gen).eps for i in range(2)] == pytest.approx([5 / 255, 5 / 255])
    rnd = dataclasses.replace(POOL, strategy="random")
    drawn = {member_attack(rnd, 0, gen).eps for _ in range(50)}
    assert drawn == set(POOL.eps)
    with pytest.raises(ConfigError, match="strategy"):
        member_attack(dataclasses.replace(POOL, strategy="nope"), 0, gen)


def test_clean_meta_tuning_trains_one_member_and_apq_one_per_radius():
    assert member_names(len(POOL.eps), True) == ["member0", "member1"]
    assert member_names(len(POOL.eps), False) == ["member0"]


# ---------------------------------------------------------------------------- the loss


def test_kl_is_taken_from_the_clean_to_the_adversarial_distribution():
    clean, adv = torch.randn(5, 4, generator=gen(0)), torch.randn(5, 4, generator=gen(1)) * 3
    p, q = clean.softmax(-1), adv.softmax(-1)
    by_hand = (p * (p.log() - q.log())).sum(-1).mean()  # KL(p_clean ‖ p_adv)
    flipped = (q * (q.log() - p.log())).sum(-1).mean()
    assert not torch.isclose(by_hand, flipped, rtol=1e-3)  # the two directions differ on these logits
    torch.testing.assert_close(kl_clean_adv(clean, adv), by_hand)


def test_meta_loss_is_ce_on_clean_logits_plus_lambda_kl():
    clean, adv = torch.randn(6, 3, generator=gen(2)), torch.randn(6, 3, generator=gen(3)) * 2
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss, ce, kl = meta_loss(clean, adv, labels, 6.0)
    torch.testing.assert_close(ce, F.cross_entropy(clean, labels))
    assert not torch.isclose(ce, F.cross_entropy(adv, labels))  # CE on the adversarial logits would differ
    torch.testing.assert_close(kl, kl_clean_adv(clean, adv))
    torch.testing.assert_close(loss, ce + 6.0 * kl)
    loss0, ce0, kl0 = meta_loss(clean, None, labels, 6.0)
    assert torch.equal(loss0, ce0) and kl0.item() == 0.0


def test_a_step_takes_the_ce_on_the_clean_queries(data):
    # with lambda_adv = 0 the attack must not change the gradient: the CE term sees only the clean queries
    episode = _episode(data[0])  # one draw of the training transforms for both steps
    _, clean_grads, _ = _member_step(data, apq=False, lambda_adv=0.0, episode=episode)
    _, adv_grads, res = _member_step(data, apq=True, lambda_adv=0.0, episode=episode)
    assert res.kl > 0  # the attack ran
    for a, b in zip(clean_grads, adv_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("apsv", [False, True])
def test_training_never_perturbs_the_support_set(data, apsv):
    episode = _episode(data[0])
    n_s, n_q = len(episode.support_images), len(episode.query_images)
    model = _model()
    seen = []
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    _member_step(data, apq=True, apsv=apsv, model=model, episode=episode)
    with_support = [x for x in seen if len(x) in (n_s + n_q, n_s + 2 * n_q)]
    assert len(with_support) == (2 if apsv else 1)  # the clean forward (+ the one at perturbed weights)
    for x in with_support:
        assert torch.equal(x[:n_s], episode.support_images) and torch.equal(x[n_s : n_s + n_q], episode.query_images)
    attacked = [x for x in seen if len(x) == n_q]
    assert attacked and not torch.equal(attacked[-1], episode.query_images)  # the queries were attacked
    assert all(len(x) in (n_q, n_s + n_q, n_s + 2 * n_q) for x in seen)  # no forward of a (perturbed) support alone


# ---------------------------------------------------------------------------- one step


@pytest.mark.parametrize("apq,apsv", [(True, True), (True, False), (False, False)])
def test_a_step_moves_only_the_members_lora_factors(data, apq, apsv):
    model = _model()
    trained = mark_trainable(model, ["member0"])
    set_active_adapter(model, "member0")
    own = [p for n, p in model.named_parameters() if ".member0" in n]
    assert {id(p) for p in trained} == {id(p) for p in own}  # exactly the member's factors are trainable
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".member0" not in n)
    scale = torch.nn.Parameter(torch.tensor(10.0))
    opt = torch.optim.SGD(trained + [scale], lr=0.1, momentum=0.9)
    before = snapshot(model)
    attack = member_attack(POOL, 1, gen(0)) if apq else None
    _, res = training_step(model, _episode(data[0]), scale, adapter_parameters(model, "member0") if apsv else None,
                           attack, PerturbConfig(), 6.0, gen(0))
    opt.step()
    changed = changed_keys(before, snapshot(model))
    assert changed, "nothing trained"
    assert all(".member0" in k or "member0." in k for k in changed), changed
    own = {k for k in before if "member0" in k}
    assert changed == own  # every factor of the member moves (A and B of every layer)
    assert scale.item() != 10.0
    assert math.isfinite(res.loss) and (res.kl > 0) == apq


def test_apsv_changes_the_update_but_restores_the_weights_it_perturbs(data):
    results = {}
    for apsv in (False, True):
        model = _model()
        before = snapshot(model)
        _, grads, _ = _member_step(data, apq=True, apsv=apsv, eta=1e-2, model=model)
        assert changed_keys(before, snapshot(model)) == set()  # the step itself leaves the weights as they were
        results[apsv] = torch.cat([g.flatten() for g in grads[:-1]])
    assert not torch.allclose(results[False], results[True])  # the gradient is taken at perturbed weights


# ---------------------------------------------------------------------------- switches


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_trains_its_documented_parameter_set(data, tmp_path, variant):
    base = ExperimentConfig(train=TINY, pool=POOL)
    cfg = from_dict(ExperimentConfig, merge_dicts(to_dict(base), variant_overrides(variant)))
    names = member_names(len(cfg.pool.eps), cfg.train.apq, cfg.pool.size) if cfg.train.mode != "full" else []
    model = _model(names if cfg.train.mode == "lora" else (), init=cfg.lora.init)
    if cfg.train.mode in PEFT_MODES:
        inject_peft(model.vit, cfg.train.mode, list(names), PEFTConfig(adapter_bottleneck=8), gen(1))
    before = snapshot(model)
    name = names[-1] if names else None
    summary, spec = _run(model, tmp_path, data, cfg=cfg.train, perturb=cfg.perturb, pool=cfg.pool,
                         name=name, index=len(names) - 1 if names else 0)
    changed = changed_keys(before, snapshot(model))
    if cfg.train.mode == "full":
        assert not lora_layers(model)
        assert any("blocks.0.attn.qkv.weight" in k for k in changed) and any("patch_embed" in k for k in changed)
    else:
        assert changed == {k for k in before if f".{name}." in k or k.endswith(f".{name}")}, (variant, changed)
    assert spec.out_dir.joinpath("weights.safetensors").is_file()
    kls = [json.loads(line)["kl"] for line in spec.out_dir.joinpath("metrics.jsonl").read_text().splitlines()]
    assert (max(kls) > 0) == (cfg.train.apq or cfg.train.augment != "none")


def test_standard_init_starts_at_the_backbone_and_svd_init_splits_it(data):
    x = torch.rand(2, 3, SIZE, SIZE, generator=gen(0))
    plain = _model(names=())
    with torch.no_grad():
        ref = plain(x)
        for init in ("standard", "svd"):
            model = _model(["member0"], init=init)
            set_active_adapter(model, "member0")
            torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
            b = adapter_state_dict(model, "member0")
            zero_b = all(float(v.abs().max()) == 0 for k, v in b.items() if "lora_B" in k)
            assert zero_b == (init == "standard")


# ---------------------------------------------------------------------------- resume and failures


def test_resume_equals_an_uninterrupted_run(data, tmp_path):
    full_model = _model()
    _run(full_model, tmp_path / "a", data)
    full = adapter_state_dict(full_model, "member0")

    part_model = _model()
    s1, spec = _run(part_model, tmp_path / "b", data, stop_after=3)
    assert s1["episodes"] == 3 and not s1["finished"]
    fresh = _model()  # a new process: the model is rebuilt from scratch
    s2, _ = _run(fresh, tmp_path / "b", data, resume=True)
    assert s2["finished"]
    resumed = adapter_state_dict(fresh, "member0")
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    a = (tmp_path / "a" / "member0" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "b" / "member0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in a] == [json.loads(x)["loss"] for x in b]
    assert s2["seconds"] > s1["seconds"] > 0  # the resumed run counts the first process's seconds too
    again, _ = _run(_model(), tmp_path / "b", data, resume=True)  # a finished member: nothing to do, nothing lost
    assert again["seconds"] > s1["seconds"] and again["episodes"] == s2["episodes"]  # up to the last checkpoint


def test_existing_state_needs_resume_and_is_not_overwritten(data, tmp_path):
    _run(_model(), tmp_path, data, stop_after=2)
    state = (tmp_path / "member0" / "state.pt").read_bytes()
    with pytest.raises(ConfigError, match="--resume"):
        _run(_model(), tmp_path, data)
    assert (tmp_path / "member0" / "state.pt").read_bytes() == state


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(data, tmp_path):
    model = _model()

    def poison(done, _):
        if done == 3:  # after the checkpoint at 2; episode 4's loss is NaN
            with torch.no_grad():
                next(iter(lora_layers(model).values())).lora_A["member0"].fill_(float("nan"))

    with pytest.raises(TrainingError, match="last good checkpoint"):
        _run(model, tmp_path, data, on_episode=poison)
    state = torch.load(tmp_path / "member0" / "state.pt", weights_only=True)
    assert state["episode"] == 2
    assert all(torch.isfinite(v).all() for v in state["weights"].values() if v.is_floating_point())


def test_member_weights_round_trip_and_the_pool_checks_its_backbone(data, tmp_path):
    model = _model()
    summary, spec = _run(model, tmp_path, data)
    other = _model()
    scale = load_weights(other, "member0", spec.out_dir / "weights.safetensors")
    saved_scale = load_file(str(spec.out_dir / "weights.safetensors"))["head.scale"].item()
    assert scale == saved_scale != 10.0  # the trained logit scale comes back
    saved = load_file(str(spec.out_dir / "weights.safetensors"))
    loaded = adapter_state_dict(other, "member0")
    assert loaded and all(torch.equal(saved["lora." + k], v) for k, v in loaded.items())
    with pytest.raises(KeyError, match="member0"):
        load_weights(_model(["other"]), "member0", spec.out_dir / "weights.safetensors")
    check_fingerprint({"backbone_fingerprint": "abc"}, "abc", tmp_path)
    with pytest.raises(ConfigError, match="trained from backbone abc"):
        check_fingerprint({"backbone_fingerprint": "abc"}, "def", tmp_path)


def test_resume_refuses_another_configuration_and_keep_last_writes_the_final_weights(data, tmp_path):
    _run(_model(), tmp_path, data, stop_after=2)
    with pytest.raises(ConfigError, match=r"train.lr: 0.05 -> 0.01"):
        _run(_model(), tmp_path, data, cfg=dataclasses.replace(TINY, lr=0.01), resume=True)
    model = _model()
    _, spec = _run(model, tmp_path / "last", data, cfg=dataclasses.replace(TINY, keep="last", val_every=2))
    saved = load_file(str(spec.out_dir / "weights.safetensors"))
    final = adapter_state_dict(model, "member0")
    assert all(torch.equal(saved["lora." + k], v) for k, v in final.items())
