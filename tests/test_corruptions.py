"""ImageNet-C corruptions: shapes, ranges, determinism, global-RNG hygiene, agreement with the reference."""

from __future__ import annotations

import imagecorruptions
import numpy as np
import pytest
import torch

from amt import corruptions
from amt.corruptions import CORRUPTIONS, SEVERITIES, corrupt, numpy_global_seed

# Corruptions that draw random numbers; the other six are deterministic functions of the image.
RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur",
          "snow", "frost", "fog", "elastic_transform")
NOISE = ("gaussian_noise", "shot_noise", "impulse_noise")


def structured_images(size: int = 32) -> torch.Tensor:
    """[2, 3, size, size] in [0, 1]: a grey glyph-like ring and bar on white, and a colour gradient with a disc."""
    t = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    r = (xx**2 + yy**2).sqrt()
    glyph = torch.ones(size, size)
    glyph[(r > 0.45) & (r < 0.7)] = 0.0
    glyph[(xx.abs() < 0.12) & (yy > -0.2)] = 0.1
    grey = glyph.expand(3, -1, -1)
    colour = torch.stack([(xx + 1) / 2, (yy + 1) / 2, 0.5 + 0.3 * xx * yy])
    colour[:, r < 0.4] = torch.tensor([0.9, 0.2, 0.1])[:, None]
    return torch.stack([grey, colour]).clamp(0, 1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return structured_images(32)


@pytest.fixture(scope="module")
def table(images: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """Every name × severity applied once to the two 32-px images."""
    return {(name, s): corrupt(images, name, s, gen(s)) for name in CORRUPTIONS for s in SEVERITIES}


def test_names_are_the_imagenet_c_fifteen_in_order():
    assert len(CORRUPTIONS) == 15
    assert CORRUPTIONS == tuple(imagecorruptions.get_corruption_names("common"))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_severity_keeps_shape_range_and_changes_the_image(name, images, table):
    for s in SEVERITIES:
        out = table[name, s]
        assert out.shape == images.shape and out.dtype == images.dtype and out.device == images.device
        assert out.min() >= 0 and out.max() <= 1
        assert torch.equal(out * 255, (out * 255).round()), "32-px outputs are uint8 levels / 255"
        for i in range(len(images)):  # each image is changed, at every severity (no reference no-op here)
            assert (out[i] - images[i]).abs().max() > 2 / 255, (name, s, i)


def test_grey_input_stays_grey_except_for_coloured_textures(table):
    """Three equal channels in, three equal channels out — except for per-channel noise and frost's bluish ice."""
    for (name, s), out in table.items():
        grey = out[0]
        spread = (grey.max(0).values - grey.min(0).values).max()
        assert (spread > 0) == (name in NOISE + ("frost",)), (name, s)


def test_severity_5_is_stronger_than_severity_1_on_aggregate(images, table):
    dist = {k: (v - images).abs().mean().item() for k, v in table.items()}
    per_name = [dist[n, 5] >= dist[n, 1] for n in CORRUPTIONS]
    assert sum(per_name) >= 12, dict(zip(CORRUPTIONS, per_name))
    mean_by_severity = [np.mean([dist[n, s] for n in CORRUPTIONS]) for s in SEVERITIES]
    assert all(a < b for a, b in zip(mean_by_severity, mean_by_severity[1:])), mean_by_severity


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_same_seed_same_output_different_seed_differs_only_for_random_ones(name, images):
    a = corrupt(images, name, 3, gen(1))
    assert torch.equal(a, corrupt(images, name, 3, gen(1)))
    b = corrupt(images, name, 3, gen(2))
    assert torch.equal(a, b) == (name not in RANDOM)


@pytest.mark.parametrize("name", NOISE)
def test_images_in_a_batch_get_different_noise(name):
    twins = structured_images(32)[:1].expand(2, -1, -1, -1)
    out = corrupt(twins, name, 3, gen(0))
    assert not torch.equal(out[0], out[1])


def test_generator_is_the_only_source_of_randomness_and_advances(images):
    g = gen(5)
    first = corrupt(images, "gaussian_noise", 2, g)
    second = corrupt(images, "gaussian_noise", 2, g)
    assert not torch.equal(first, second)
    np.random.seed(0)
    with_global_0 = corrupt(images, "gaussian_noise", 2, gen(5))
    np.random.seed(1)
    assert torch.equal(with_global_0, corrupt(images, "gaussian_noise", 2, gen(5)))


@pytest.mark.parametrize("name", ("gaussian_noise", "glass_blur", "frost", "fog", "contrast"))
def test_global_numpy_state_is_unchanged(name, images):
    np.random.seed(123)
    before = np.random.get_state()
    corrupt(images, name, 4, gen(0))
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]


def test_global_numpy_state_is_restored_when_a_corruption_raises(images, monkeypatch):
    def broken(image, severity, seed):
        np.random.normal(size=10)
        raise RuntimeError("boom")

    monkeypatch.setitem(corruptions.CORRUPTION_FNS, "broken", broken)
    np.random.seed(7)
    expected = np.random.random(3)
    np.random.seed(7)
    with pytest.raises(RuntimeError, match="boom"):
        corrupt(images, "broken", 1, gen(0))
    assert np.array_equal(np.random.random(3), expected)


def test_numpy_global_seed_seeds_and_restores():
    np.random.seed(3)
    expected = np.random.random()
    np.random.seed(3)
    with numpy_global_seed(99):
        inside = np.random.random()
    assert np.random.random() == expected
    with numpy_global_seed(99):
        assert np.random.random() == inside


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_matches_reference_on_uint8_with_the_same_seed(name, images):
    image = images[1:]  # the colour one
    ours = corrupt(image, name, 3, gen(11))
    seed = int(torch.randint(0, corruptions._SEED_HIGH, (1,), generator=gen(11)))
    array = (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    kwargs = {"seed": seed} if name in ("impulse_noise", "glass_blur") else {}
    np.random.seed(seed)
    reference = imagecorruptions.corrupt(array, corruption_name=name, severity=3, **kwargs)
    assert np.array_equal((ours[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy(), reference)


@pytest.mark.parametrize("size", (128, 224))
def test_larger_images_work_for_every_corruption(size):
    image = structured_images(size)[1:]
    for name in CORRUPTIONS:
        out = corrupt(image, name, 5, gen(0))
        assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1
        assert (out - image).abs().max() > 2 / 255, name


@pytest.mark.slow
@pytest.mark.parametrize("size", (128, 224))
def test_larger_images_every_severity(size):
    image = structured_images(size)
    for name in CORRUPTIONS:
        for s in SEVERITIES:
            out = corrupt(image, name, s, gen(s))
            assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("shape", ((16, 16), (20, 24), (31, 40)))
def test_images_under_32_px_work_for_every_corruption(shape):
    h, w = shape
    image = torch.nn.functional.interpolate(structured_images(32), size=shape, mode="bilinear").clamp(0, 1)
    for name in CORRUPTIONS:
        out = corrupt(image, name, 3, gen(0))
        assert out.shape == (2, 3, h, w) and 0 <= out.min() and out.max() <= 1
        assert (out - image).abs().max() > 2 / 255, name


def test_small_images_are_upsampled_by_an_integer_factor_and_box_averaged_back(monkeypatch):
    seen = []

    def identity(image, severity, seed):
        seen.append(image.shape)
        return image

    monkeypatch.setitem(corruptions.CORRUPTION_FNS, "identity", identity)
    image = torch.rand(2, 3, 12, 20, generator=gen(0))
    out = corrupt(image, "identity", 1, gen(0))
    assert seen == [(36, 60, 3)] * 2  # k = ceil(32 / 12) = 3
    assert torch.allclose(out, (image * 255).round() / 255, atol=1e-6)
    seen.clear()
    corrupt(structured_images(32), "identity", 1, gen(0))
    assert seen == [(32, 32, 3)] * 2  # 32 px and above: no resizing


def test_dtype_and_empty_batch_are_preserved(images):
    out = corrupt(images.double(), "shot_noise", 2, gen(0))
    assert out.dtype == torch.float64
    assert torch.equal(out.float(), corrupt(images, "shot_noise", 2, gen(0)))
    assert corrupt(images.bfloat16(), "pixelate", 2, gen(0)).dtype == torch.bfloat16
    empty = corrupt(images[:0], "fog", 1, gen(0))
    assert empty.shape == (0, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_images_and_generator():
    images = structured_images(32).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    out = corrupt(images, "gaussian_noise", 1, g)
    assert out.device == images.device and out.shape == images.shape


def test_unknown_name_lists_valid_names(images):
    with pytest.raises(ValueError, match="unknown corruption 'gausian_noise'.*gaussian_noise.*jpeg_compression"):
        corrupt(images, "gausian_noise", 1, gen(0))


@pytest.mark.parametrize("severity", (0, 6, -1, 2.0, True, "3"))
def test_bad_severity(images, severity):
    with pytest.raises(ValueError, match="severity.*1..5"):
        corrupt(images, "fog", severity, gen(0))


@pytest.mark.parametrize("bad, message", [
    (torch.rand(3, 32, 32), r"shape \[B, 3, H, W\]"),
    (torch.rand(2, 1, 32, 32), r"shape \[B, 3, H, W\]"),
    (torch.rand(2, 32, 32, 3), r"shape \[B, 3, H, W\]"),
    (torch.rand(2, 3, 32, 32) * 255, r"\[0, 1\].*max"),
    (torch.rand(2, 3, 32, 32) - 0.5, r"\[0, 1\].*min"),
    (torch.full((1, 3, 32, 32), float("nan")), r"\[0, 1\]"),
    ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), "floating point"),
    (np.zeros((2, 3, 32, 32), dtype=np.float32), "torch.Tensor"),
])
def test_bad_images(bad, message):
    with pytest.raises(ValueError, match=message):
        corrupt(bad, "contrast", 1, gen(0))
