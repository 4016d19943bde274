"""Shared test helpers: tiny real image folders written to disk, tiny real timm ViTs, generators, state snapshots.

The helpers are plain functions, importable from any test module (pytest puts ``tests/`` on ``sys.path``
because it holds this rootdir ``conftest.py`` and no ``__init__.py``)::

    from conftest import assert_same_state, gen, snapshot, tiny_backbone, tiny_vit
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from amt.backbone import Backbone, build_vit

HALF = (0.5, 0.5, 0.5)  # mean/std of the tests' backbones: pixels in [0, 1] map to [-1, 1]


def write_image_folder(root: Path, n_classes: int, per_class: int | list[int], size: int = 16, seed: int = 0) -> Path:
    """Folder-per-class PNG dataset; class c's images are noisy copies of a class-specific colour."""
    rng = np.random.default_rng(seed)
    counts = per_class if isinstance(per_class, list) else [per_class] * n_classes
    for c in range(n_classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        for i in range(counts[c]):
            px = np.clip(base + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "domain", n_classes=8, per_class=12)


def gen(seed: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def tiny_vit(arch: str = "vit_tiny_test", image_size: int = 32, seed: int = 0) -> VisionTransformer:
    """A real timm ViT from :func:`amt.backbone.build_vit` (no classifier), in eval mode.

    Its random init is drawn with ``torch.manual_seed(seed)`` inside ``fork_rng``: the same weights on every
    call, and the global RNG state is left as it was. ``vit_tiny_test``: patch 16, embed_dim 48, depth 2,
    3 heads, CLS pooling (a 2×2 token grid at the default 32 px); ``amt_glyph_vit``: the glyph backbone.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_vit(arch, image_size).eval()


def tiny_backbone(
    arch: str = "vit_tiny_test",
    image_size: int = 32,
    seed: int = 0,
    mean: tuple[float, float, float] = HALF,
    std: tuple[float, float, float] = HALF,
) -> Backbone:
    """:func:`tiny_vit` wrapped in :class:`amt.backbone.Backbone` (normalisation ``(x - mean) / std``), eval mode."""
    return Backbone(tiny_vit(arch, image_size, seed), mean, std).eval()


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every entry of ``module.state_dict()`` (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_keys(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> set[str]:
    """Names whose tensors are not bit-for-bit equal (``torch.equal``) between two state dicts with the same keys."""
    assert set(before) == set(after), f"state keys differ: {sorted(set(before) ^ set(after))[:6]}"
    return {k for k in before if not torch.equal(before[k], after[k])}


def assert_same_state(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor] | nn.Module) -> None:
    """Assert two state dicts (or a snapshot and a module) have the same keys and bit-for-bit equal tensors."""
    if isinstance(after, nn.Module):
        after = after.state_dict()
    changed = changed_keys(before, after)
    assert not changed, f"{len(changed)} state entries changed, e.g. {sorted(changed)[:4]}"


def pytest_terminal_summary(terminalreporter) -> None:
    """Name the outcome of the browser-app tests (Chromium + Playwright) in the summary, so CI output shows
    whether the page was really driven or skipped, and why."""
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if "test_app.py" in getattr(report, "nodeid", "") and report.when in ("call", "setup"):
                if outcome == "passed" and report.when != "call":
                    continue
                why = f": {report.longrepr[2]}" if outcome == "skipped" and isinstance(report.longrepr, tuple) else ""
                terminalreporter.write_line(f"browser app: {report.nodeid.split('::')[-1]} {outcome}{why}")
