"""Backbone and checkpoints: architectures, strict checkpoint loading in every supported form, resizing, identity."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest
import safetensors.torch
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from amt.backbone import Backbone, build_backbone, build_vit
from amt.checkpoints import CheckpointError, fingerprint, load_checkpoint, save_backbone
from amt.config import LORA_TARGETS, BackboneConfig, ConfigError

from conftest import gen, tiny_backbone, tiny_vit


def source_vit(depth: int = 2, dim: int = 48, num_classes: int = 0, seed: int = 0) -> VisionTransformer:
    """A checkpoint writer's ViT: ``vit_tiny_test``'s layout at 64 px except for ``depth``, ``dim``, ``num_classes``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(
            img_size=64, patch_size=16, embed_dim=dim, depth=depth, num_heads=3, num_classes=num_classes
        ).eval()


def features(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Pre-logits features, whether or not the model has a classifier."""
    with torch.no_grad():
        return vit.forward_head(vit.forward_features(x), pre_logits=True)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, 64, 64, generator=gen(1))


def load_into_fresh(path: Path, key: str = "auto", arch: str = "vit_tiny_test", size: int = 64) -> VisionTransformer:
    vit = build_vit(arch, size).eval()
    load_checkpoint(vit, path, key=key)
    return vit


# --------------------------------------------------------------------------- checkpoint forms


def test_bare_dino_state_dict_loads_bit_identical(tmp_path, images):
    src = tiny_vit(image_size=64)
    path = tmp_path / "dino_backbone.pth"
    torch.save(src.state_dict(), path)
    assert torch.equal(features(load_into_fresh(path), images), features(src, images))


def test_dino_full_training_checkpoint_prefers_teacher(tmp_path, images):
    teacher, student = tiny_vit(image_size=64, seed=0), tiny_vit(image_size=64, seed=1)
    ckpt = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                    "head.mlp.0.weight": torch.randn(8, 48), "head.last_layer.weight_g": torch.ones(16, 1)},
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    "module.head.mlp.0.weight": torch.randn(8, 48)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, lr=0.0005),
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    assert torch.equal(features(load_into_fresh(path), images), features(teacher, images))
    assert torch.equal(features(load_into_fresh(path, key="teacher"), images), features(teacher, images))
    assert torch.equal(features(load_into_fresh(path, key="student"), images), features(student, images))


def test_ibot_mask_token_is_dropped(tmp_path, images):
    src = tiny_vit(image_size=64)
    sd = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    path = tmp_path / "ibot.pth"
    torch.save({"teacher": {**sd, "backbone.masked_embed": torch.zeros(1, 48)}, "epoch": 3}, path)
    assert torch.equal(features(load_into_fresh(path), images), features(src, images))


def test_deit_model_dict_drops_classifier(tmp_path, images):
    src = source_vit(num_classes=10)
    path = tmp_path / "deit.pth"
    torch.save({"model": src.state_dict(), "epoch": 299, "args": argparse.Namespace(model="deit_tiny")}, path)
    info_vit = build_vit("vit_tiny_test", 64).eval()
    info = load_checkpoint(info_vit, path)
    assert info.key == "model" and set(info.dropped) == {"head.weight", "head.bias"}
    assert torch.equal(features(info_vit, images), features(src, images))


def test_distilled_deit_into_plain_vit_names_dist_token(tmp_path):
    src = source_vit(num_classes=10)
    sd = {**src.state_dict(), "dist_token": torch.zeros(1, 1, 48),
          "head_dist.weight": torch.zeros(10, 48), "head_dist.bias": torch.zeros(10)}
    path = tmp_path / "deit_distilled.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="dist_token") as err:
        load_into_fresh(path)
    assert "distilled" in str(err.value) and "head_dist" not in str(err.value)


def test_timm_safetensors_with_head(tmp_path, images):
    src = source_vit(num_classes=10)
    path = tmp_path / "timm.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    assert torch.equal(features(load_into_fresh(path), images), features(src, images))


def test_save_backbone_roundtrip_glyph_vit(tmp_path):
    src = Backbone(tiny_vit("amt_glyph_vit", 32)).eval()  # ImageNet mean/std, as BackboneConfig's default
    path = tmp_path / "out" / "glyph.safetensors"
    save_backbone(src, path, metadata={"arch": "amt_glyph_vit"})
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata()["fingerprint"] == fingerprint(src.vit)
        assert f.metadata()["arch"] == "amt_glyph_vit"
    loaded = build_backbone(BackboneConfig(arch="amt_glyph_vit", checkpoint=str(path), image_size=32)).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), src(x))
    assert fingerprint(loaded) == fingerprint(src)


# --------------------------------------------------------------------------- refusals


def test_wrong_depth_lists_unexpected_blocks(tmp_path):
    path = tmp_path / "deeper.pth"
    torch.save(source_vit(depth=3).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_into_fresh(path)
    msg = str(err.value)
    assert "unexpected" in msg and "blocks.2.attn.qkv.weight" in msg and "depth 3" in msg and "backbone.arch" in msg


def test_wrong_dim_lists_shapes(tmp_path):
    path = tmp_path / "wider.pth"
    torch.save(source_vit(dim=96).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_into_fresh(path)
    msg = str(err.value)
    assert "blocks.0.attn.qkv.weight: checkpoint (288, 96) vs model (144, 48)" in msg
    assert "more" in msg  # the long list is truncated with a count


def test_random_dict_lists_missing_and_unexpected(tmp_path):
    path = tmp_path / "random.pth"
    torch.save({"foo.weight": torch.zeros(3), "bar": torch.ones(2)}, path)
    with pytest.raises(CheckpointError) as err:
        load_into_fresh(path)
    msg = str(err.value)
    assert "missing" in msg and "cls_token" in msg and "foo.weight" in msg and "checkpoint_key" in msg


def test_training_checkpoint_with_key_none_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": tiny_vit(image_size=64).state_dict(), "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="teacher"):
        load_into_fresh(path, key="none")
    with pytest.raises(CheckpointError, match="'model' is not in the checkpoint"):
        load_into_fresh(path, key="model")


def test_missing_empty_and_garbage_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_into_fresh(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_into_fresh(tmp_path / "empty.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a PyTorch"):
        load_into_fresh(tmp_path / "garbage.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="list"):
        load_into_fresh(tmp_path / "list.pth")


def _leave_mark(path: str) -> int:
    Path(path).write_text("code from the checkpoint ran")
    return 0


class Payload:
    """Unpickling this calls ``_leave_mark``: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, mark: Path) -> None:
        self.mark = mark

    def __reduce__(self):
        return (_leave_mark, (str(self.mark),))


class Plain:
    pass


def test_pickled_code_is_refused_without_running(tmp_path):
    mark = tmp_path / "mark.txt"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny_vit(image_size=64).state_dict(), "extra": Payload(mark)}, path)
    assert not mark.exists()
    with pytest.raises(CheckpointError, match="_leave_mark") as err:
        load_into_fresh(path)
    assert "safetensors" in str(err.value)
    assert not mark.exists()
    torch.save({"state_dict": tiny_vit(image_size=64).state_dict(), "extra": Plain()}, path)
    with pytest.raises(CheckpointError, match="Plain"):
        load_into_fresh(path)


# --------------------------------------------------------------------------- position embeddings


@pytest.mark.parametrize("size,tokens", [(32, 2 * 2 + 1), (96, 6 * 6 + 1)])
def test_pos_embed_resized_to_model_grid(tmp_path, size, tokens):
    src = tiny_vit(image_size=64)
    path = tmp_path / "src64.pth"
    torch.save(src.state_dict(), path)
    vit = build_vit("vit_tiny_test", size)
    info = load_checkpoint(vit, path)
    assert vit.pos_embed.shape == (1, tokens, 48) and info.pos_embed_resized == (4, int((tokens - 1) ** 0.5))
    assert torch.equal(vit.pos_embed[:, :1], src.pos_embed[:, :1])  # class token position kept
    assert vit(torch.rand(1, 3, size, size)).shape == (1, 48)


def test_pos_embed_same_size_is_identity_and_constant_stays_constant(tmp_path):
    src = tiny_vit(image_size=64)
    with torch.no_grad():
        src.pos_embed[:, 1:] = 0.37
        src.pos_embed[:, :1] = -2.0
    path = tmp_path / "const.pth"
    torch.save(src.state_dict(), path)
    same = load_into_fresh(path, size=64)
    assert torch.equal(same.pos_embed, src.pos_embed)
    big = load_into_fresh(path, size=96)
    assert torch.allclose(big.pos_embed[:, 1:], torch.full((1, 36, 48), 0.37), atol=1e-5)
    assert torch.equal(big.pos_embed[:, :1], src.pos_embed[:, :1])


def test_glyph_vit_pos_embed_resizes_without_class_token(tmp_path):
    path = tmp_path / "glyph.safetensors"
    save_backbone(tiny_vit("amt_glyph_vit", 32), path)
    vit = build_vit("amt_glyph_vit", 64)
    load_checkpoint(vit, path)
    assert vit.pos_embed.shape == (1, 8 * 8, 96)
    assert vit(torch.rand(2, 3, 64, 64)).shape == (2, 96)


# --------------------------------------------------------------------------- architectures and module


def test_normalisation_is_inside_the_model(images):
    vit = tiny_vit(image_size=64)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    bb = Backbone(vit, mean, std).eval()
    assert bb.mean.shape == (1, 3, 1, 1) and bb.std.shape == (1, 3, 1, 1) and bb.embed_dim == 48
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(bb(images), vit((images - m) / s))
    with pytest.raises(ValueError, match="num_classes=0"):
        Backbone(source_vit(num_classes=5))


def test_glyph_vit_shape_and_lora_targets():
    vit = build_vit("amt_glyph_vit", 32)
    assert isinstance(vit, VisionTransformer)
    n_params = sum(p.numel() for p in vit.parameters())
    assert 400_000 < n_params < 600_000
    names = dict(vit.named_modules())
    assert len(vit.blocks) == 4
    for i in range(4):
        for target in LORA_TARGETS:
            assert isinstance(names[f"blocks.{i}.{target}"], nn.Linear)
    bb = Backbone(vit).eval()
    assert bb(torch.rand(5, 3, 32, 32)).shape == (5, 96) and bb.embed_dim == 96


def test_build_vit_timm_name_and_errors():
    vit = build_vit("vit_tiny_patch16_224", 64)  # any timm ViT, never downloaded
    assert vit.pos_embed.shape == (1, 4 * 4 + 1, 192) and isinstance(vit.head, nn.Identity)
    with pytest.raises(ValueError, match="unknown backbone arch"):
        build_vit("not_a_model", 64)
    with pytest.raises(ValueError, match="VisionTransformer"):
        build_vit("resnet18", 64)
    with pytest.raises(ValueError, match="divisible"):
        build_vit("amt_glyph_vit", 36)


def test_fingerprint_stable_and_sensitive():
    vit = tiny_vit(image_size=64)
    fp = fingerprint(vit)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(vit) == fp == fingerprint(copy.deepcopy(vit)) == fingerprint(vit.state_dict())
    with torch.no_grad():
        vit.blocks[1].mlp.fc2.weight[3, 7] += 1e-6
    assert fingerprint(vit) != fp
    assert fingerprint(tiny_vit(image_size=64, seed=0)) == fp
    assert fingerprint(tiny_vit(image_size=64, seed=1)) != fp


def test_random_backbone_is_the_same_in_every_build_and_leaves_the_global_rng_alone():
    with pytest.raises(ConfigError, match="backbone.checkpoint is not set.*random_init=true"):
        build_backbone(BackboneConfig(arch="vit_tiny_test", image_size=32))  # a forgotten checkpoint
    cfg = BackboneConfig(arch="vit_tiny_test", image_size=32, checkpoint=None, random_init=True)
    torch.manual_seed(1)
    a = build_backbone(cfg)
    after_a = torch.rand(3)
    torch.manual_seed(1)
    b = build_backbone(cfg)
    assert torch.equal(torch.rand(3), after_a)  # the build drew nothing from the global generator
    assert fingerprint(a.vit) == fingerprint(b.vit)


def test_bf16_refuses_perturbations_below_its_rounding_and_keeps_attack_gradients():
    from amt.backbone import check_perturbations
    from amt.conditions import nonzero_input_gradients, robust_under_pgd
    from amt.config import AttackConfig, ConfigError
    from amt.head import cosine_logits, prototypes

    check_perturbations(None, (0.01 / 255,), (0.5,), 1e-4)  # fp32: anything goes
    check_perturbations(torch.bfloat16, (8 / 255, 4 / 255), (0.5,), 0.01)
    with pytest.raises(ConfigError, match=r"radii \['0.01/255'\].*precision=fp32"):
        check_perturbations(torch.bfloat16, (0.01 / 255, 8 / 255), (0.5,))
    with pytest.raises(ConfigError, match="perturb.eta=0.0001"):
        check_perturbations(torch.bfloat16, (8 / 255,), (0.5,), 1e-4)
    # under bf16 autocast the input gradients survive and PGD still flips predictions
    model = tiny_backbone(image_size=32)
    model.autocast_dtype = torch.bfloat16
    support, queries = torch.rand(6, 3, 32, 32, generator=gen(0)), torch.rand(12, 3, 32, 32, generator=gen(1))
    labels = torch.arange(12) % 3
    with torch.no_grad():
        protos = prototypes(model(support), torch.arange(6) % 3, 3)
    logits_fn = lambda x: cosine_logits(model(x), protos, 10.0)  # noqa: E731
    assert nonzero_input_gradients(logits_fn, queries, labels).all()
    with torch.no_grad():
        clean = logits_fn(queries).argmax(-1) == labels
    attack = AttackConfig(eps=16 / 255, step_size=4 / 255, steps=5)
    robust = robust_under_pgd(attack, logits_fn, queries, labels, gen(2))
    assert clean.any() and robust.sum() < clean.sum()
