"""The comparators' training variants on tiny real models: StyleAdv, RandConv, ALT (and their runs end to end)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from amt.cli import main
from amt.config import (
    ALTConfig,
    AugmentConfig,
    ConfigError,
    DataConfig,
    DomainConfig,
    HeadConfig,
    LoRAConfig,
    PerturbConfig,
    PoolConfig,
    RandConvConfig,
    StyleAdvConfig,
    TrainConfig,
)
from amt.data.domains import load_domain
from amt.data.episodes import FixedSampler, load_episode
from amt.data.transforms import build_transform
from amt.head import cosine_logits, prototypes
from amt.lora import inject_lora
from amt.query_augment import alt, alt_objective, alt_transform, randconv
from amt.styleadv import adversarial_shifts, restyle, restyled, style_stats, styleadv_loss
from amt.train import MemberSpec, MetaTuning, train_member
from test_pipeline import SMALL, TRAIN

from conftest import assert_same_state, changed_keys, gen, snapshot, tiny_backbone, write_image_folder

SIZE = 32
TINY = TrainConfig(epochs=1, episodes_per_epoch=3, warmup_epochs=0.5, lr=0.05, n_way=3, n_shot=1, n_query=2,
                   val_every=3, val_tasks=2, checkpoint_every=3, seed=3, apq=False, apsv=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("variants") / "d", n_classes=6, per_class=6, size=SIZE)
    dcfg = DataConfig(resize_ratio=1.0, cache_decoded=True)
    dom = DomainConfig(name="d", path=str(root))
    return tuple(load_domain(dom, dcfg, build_transform(SIZE, dcfg, AugmentConfig(), train)) for train in (True, False))


def _episode(dataset, seed=0):
    return load_episode(dataset, FixedSampler(dataset.indices_by_class(), 3, 1, 2, gen(seed), "d").sample())


def _block_output(model, images, block):
    out = {}
    handle = model.vit.blocks[block].register_forward_hook(lambda _m, _i, o: out.setdefault("x", o.detach()))
    try:
        model(images)
    finally:
        handle.remove()
    return out["x"]


# ---------------------------------------------------------------------------- StyleAdv


def test_restyle_moves_mean_and_std_exactly_and_zero_shift_is_the_identity():
    x = torch.randn(4, 5, 7, generator=gen(0)) * 3 + 1
    d_mu, d_sigma = torch.full((4, 1, 7), 0.3), torch.full((4, 1, 7), -0.2)
    mu, sigma = style_stats(x, (1,))
    new_mu, new_sigma = style_stats(restyle(x, d_mu, d_sigma, (1,)), (1,))
    torch.testing.assert_close(new_mu, mu + 0.3 * sigma)
    torch.testing.assert_close(new_sigma, sigma * 0.8, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(restyle(x, 0 * d_mu, 0 * d_sigma, (1,)), x)


def test_styleadv_attack_moves_the_block_styles_within_eps_and_removes_its_hooks(data):
    model = tiny_backbone(image_size=SIZE)
    before = snapshot(model)
    episode = _episode(data[0])
    images = torch.cat([episode.support_images, episode.query_images])
    eps = 0.08
    cfg = StyleAdvConfig(blocks=(0,), image=False)
    shifts = adversarial_shifts(model, episode, torch.tensor(10.0), cfg, eps)
    assert all(p.grad is None for p in model.parameters())  # the attack differentiates the shifts only
    assert set(shifts) == {0} and all(torch.equal(d.abs(), torch.full_like(d, eps)) for d in shifts[0])
    clean = _block_output(model, images, 0)
    with restyled(model, shifts):
        attacked = _block_output(model, images, 0)
    (mu, sigma), (mu_a, sigma_a) = style_stats(clean, (1,)), style_stats(attacked, (1,))
    assert not torch.allclose(mu_a, mu) and not torch.allclose(sigma_a, sigma)  # the style did change ...
    assert ((mu_a - mu).abs() <= eps * sigma * (1 + 1e-3) + 1e-5).all()  # ... within ε (relative units)
    assert ((sigma_a / sigma - 1).abs() <= eps + 1e-3).all()
    assert not model.vit.blocks[0]._forward_hooks  # hooks removed; the model computes what it computed
    torch.testing.assert_close(_block_output(model, images, 0), clean, rtol=0, atol=0)
    assert_same_state(before, model)


def test_styleadv_loss_adds_a_harder_style_ce_and_reaches_every_backbone_parameter(data):
    model = tiny_backbone(image_size=SIZE)
    for p in model.parameters():
        p.requires_grad_(True)
    scale = torch.nn.Parameter(torch.tensor(10.0))
    cfg = StyleAdvConfig(eps=(0.2,), weight=1.0)
    loss, ce, style_ce, acc = styleadv_loss(model, _episode(data[0]), scale, cfg, gen(0))
    assert style_ce > ce  # the signed-gradient style attack raises the task loss
    assert float(loss.detach()) == pytest.approx(ce + style_ce, rel=1e-5) and 0 <= acc <= 100
    loss.backward()
    blocks = [n for n, p in model.named_parameters() if n.startswith("vit.blocks.")]
    assert blocks and all(model.get_parameter(n).grad is not None and model.get_parameter(n).grad.abs().sum() > 0
                          for n in blocks)
    assert scale.grad is not None
    with pytest.raises(ConfigError, match="out of range"):
        styleadv_loss(model, _episode(data[0]), scale, dataclasses.replace(cfg, blocks=(7,)), gen(0))
    with pytest.raises(ConfigError, match="relative radii"):
        styleadv_loss(model, _episode(data[0]), scale, dataclasses.replace(cfg, eps=(1.5,)), gen(0))


def test_styleadv_member_trains_the_full_backbone_and_refuses_a_query_attack(data, tmp_path):
    model = tiny_backbone(image_size=SIZE)
    before = snapshot(model)
    settings = MetaTuning(dataclasses.replace(TINY, mode="full", augment="styleadv"), PoolConfig(), PerturbConfig(),
                          HeadConfig())
    summary = train_member(model, MemberSpec(0, None, tmp_path / "m"), data[0], data[1], settings)
    assert summary["finished"] and summary["final"]["kl"] > 0  # the style-attacked CE, logged in the KL column
    assert {k for k in changed_keys(before, model.state_dict()) if k.startswith("vit.blocks.")}
    bad = MetaTuning(dataclasses.replace(settings.train, apq=True), PoolConfig(), PerturbConfig(), HeadConfig())
    with pytest.raises(ConfigError, match="replaces the query attack"):
        train_member(tiny_backbone(image_size=SIZE), MemberSpec(0, None, tmp_path / "x"), data[0], data[1], bad)


# ---------------------------------------------------------------------------- RandConv and ALT


def test_randconv_changes_the_images_keeps_shape_and_range_and_follows_its_generator(data):
    images = _episode(data[0]).query_images
    for cfg in (RandConvConfig(), RandConvConfig(kernel_sizes=(3,), mix=False)):
        out = randconv(images, cfg, gen(1))
        assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
        assert (out - images).abs().max() > 0.05
        assert torch.equal(out, randconv(images, cfg, gen(1)))
    assert not torch.equal(randconv(images, RandConvConfig(), gen(1)), randconv(images, RandConvConfig(), gen(2)))
    with pytest.raises(ConfigError, match="odd sizes"):
        randconv(images, RandConvConfig(kernel_sizes=(2,)), gen(0))


def test_alt_ascends_its_objective_stays_in_range_and_leaves_the_model_alone(data):
    model = tiny_backbone(image_size=SIZE)
    for p in model.parameters():
        p.requires_grad_(True)
    episode = _episode(data[0])
    with torch.no_grad():
        protos = prototypes(model(episode.support_images), episode.support_labels, episode.n_way)
        clean = cosine_logits(model(episode.query_images), protos, 10.0)

    def fn(x):
        return cosine_logits(model(x), protos, 10.0)

    x = episode.query_images
    cfg = ALTConfig(steps=(5,), lr=1e-2)
    out = alt(fn, x, clean, cfg, gen(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)
    assert not out.requires_grad and all(p.grad is None for p in model.parameters())
    start = alt(fn, x, clean, dataclasses.replace(cfg, steps=(0,)), gen(0))  # the same random network, untrained
    with torch.no_grad():
        gains = [float(alt_objective(fn, x, y, clean, cfg.consistency)) for y in (start, out)]
    assert gains[1] > gains[0]
    assert torch.equal(alt_transform(x, [torch.zeros(w.shape) for w in _shapes(cfg)]), x)  # g = 0: the identity


def _shapes(cfg):
    chans = [3] + [cfg.width] * 4 + [3]
    return [torch.empty(o, i, 3, 3) for i, o in zip(chans[:-1], chans[1:])]


@pytest.mark.parametrize("augment", ["randconv", "alt"])
def test_an_augmented_lora_member_trains_only_its_factors(data, tmp_path, augment):
    model = tiny_backbone(image_size=SIZE)
    inject_lora(model.vit, LoRAConfig().targets, ["member0"], rank=4, generator=gen(1))
    before = snapshot(model)
    settings = MetaTuning(dataclasses.replace(TINY, augment=augment), PoolConfig(), PerturbConfig(), HeadConfig())
    summary = train_member(model, MemberSpec(0, "member0", tmp_path / augment), data[0], data[1], settings)
    changed = changed_keys(before, model.state_dict())
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)
    assert summary["final"]["kl"] > 0  # KL(p_clean ‖ p_augmented) is in the loss


# ---------------------------------------------------------------------------- end to end


def test_styleadv_and_randconv_train_from_the_cli_and_evaluate_as_rows_with_and_without_finetuning(tmp_path):
    common = ["--set", f"cache_dir={tmp_path / 'cache'}", *SMALL, *TRAIN, "--set", "eval.shots=[1]",
              "--set", "eval.corruptions=[]", "--set", "eval.adversarial=false", "--set", "eval.n_tasks=2",
              "--set", "finetune.steps=2", "--set", "finetune.lr_grid=[]"]
    for variant in ("styleadv", "randconv"):
        assert main(["train", "--variant", variant, "--out", str(tmp_path / variant), *common]) == 0
    manifest = json.loads((tmp_path / "styleadv" / "pool.json").read_text())
    assert manifest["mode"] == "full" and manifest["config"]["train"]["augment"] == "styleadv"
    methods = (f"methods=[{{name: PM}}, {{name: StyleAdv, pool: {tmp_path / 'styleadv'}}}, "
               f"{{name: StyleAdv-FT, pool: {tmp_path / 'styleadv'}, finetune: true}}, "
               f"{{name: RandConv, pool: {tmp_path / 'randconv'}, rule: single}}]")
    assert main(["evaluate", "--out", str(tmp_path / "ev"), *common, "--set", methods]) == 0
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())["results"]
    assert {r["method"] for r in rows} == {"PM", "StyleAdv", "StyleAdv-FT", "RandConv"}


def test_the_documented_comparator_rows_parse_on_the_paper_preset():
    """docs/paper.md: the StyleAdv rows of `M1` (Tables 1, 2, 20) and the Table 16/17 commands and rows."""
    import re
    from pathlib import Path

    from amt.config import VARIANTS, load_config, parse_override

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "paper.md").read_text()
    preset = root / "configs" / "paper" / "metadataset.yaml"
    m1 = re.search(r'^M1="(methods=.*)"$', doc, re.M).group(1)
    rows = {m.name: m for m in load_config(preset, parse_override(m1)).methods}
    assert rows["StyleAdv"].pool == "runs/paper/styleadv_1shot" and not rows["StyleAdv"].finetune
    assert rows["StyleAdv-FT"].finetune
    assert "--variant styleadv   --out runs/paper/styleadv_1shot" in doc
    for table in ("Table 16", "Table 17"):
        line = next(x for x in doc.splitlines() if x.startswith(f"| **{table}**"))
        for variant in re.findall(r"--variant (\w+)", line):
            assert variant in VARIANTS, (table, variant)
        methods = re.search(r'"(methods=\[.*?\])"', line)
        if methods and "..." not in methods.group(1):
            load_config(preset, parse_override(methods.group(1)))
        rows = re.findall(r"\{name: [^}]*\}", line)
        assert rows and all(load_config(preset, parse_override(f"methods=[{r}]")).methods for r in rows)
        assert "not built" not in line.replace("Test-time LoRA tuning: **not built**", "")
    for line in doc.splitlines():
        if line.startswith(("| **Table 1**", "| **Table 2**", "| **Table 20**")):
            assert "not built" not in line and "StyleAdv" in line
