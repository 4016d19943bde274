"""ImageNet-C common corruptions applied to batches of query images (robustness evaluation).

The 15 corruptions of Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations" (ICLR 2019), each at severity 1..5, computed by the reference
implementation in the maintained package ``imagecorruptions-imaug`` (module ``imagecorruptions``, a
NumPy-2 / scikit-image ≥ 0.19 compatible fork of ``imagecorruptions`` 1.1.2, which is the ImageNet-C
code packaged for arbitrary image sizes). :data:`CORRUPTIONS` lists the names in the ImageNet-C order
(noise, blur, weather, digital)::

    gen = torch.Generator().manual_seed(0)
    corrupted = corrupt(query_images, "gaussian_noise", severity=3, generator=gen)

Units: images are float ``[B, 3, H, W]`` tensors with pixels in [0, 1] (any device, any floating dtype);
the output has the same shape, dtype and device, pixels in [0, 1]. Each image is converted to the
reference's input, a uint8 ``[H, W, 3]`` array (``round(255·x)``), corrupted, and converted back
(``/255``), so outputs are multiples of 1/255 (except for the small-image path below). The corruption
parameters are the reference's, tuned for 224-px ImageNet images: blur radii and motion lengths are in
pixels and frost crops its texture from full-size ice photos, so on 32-px images the blurs and frost are
relatively much stronger than on ImageNet (noise, brightness, contrast and pixelate are per pixel or
relative to the image size; CIFAR-10-C used separate, milder constants for 32 px, which are not used here).

Small images: the reference refuses images with a side under 32 px (:data:`MIN_SIDE`); at 32 px and
above every corruption is applied as is, with no resizing (checked for all 15 × 5 at 32, 128 and
224 px). For an image whose shorter side ``s`` is under 32 px — and only then, for every corruption,
since the reference refuses them all — the image is upsampled by the integer factor
``k = ceil(32 / s)`` with nearest-neighbour (pixel replication), corrupted at ``(k·H, k·W)``, and
box-averaged back over the ``k × k`` blocks. This is exact for an identity corruption, but averaging
attenuates per-pixel noise (the noise corruptions' standard deviation shrinks by up to ``k``), and the
output is no longer quantised to 1/255.

Determinism: the reference draws from NumPy's *global* RNG (``np.random.normal``, ``np.random.randint``,
...), plus a ``seed`` argument for ``impulse_noise`` (scikit-image ``random_noise``) and ``glass_blur``
(a Numba kernel with its own RNG) that otherwise draw fresh OS entropy; it does not use Python's
``random`` module. :func:`corrupt` draws one 32-bit seed per image from ``generator`` (on the
generator's device), runs each image inside :func:`numpy_global_seed` — which seeds ``np.random`` and
restores the previous global state in ``finally`` — and passes the same seed to the corruptions that
take one. So the same generator state gives the same output, and the caller's global NumPy stream is
left exactly where it was. (``glass_blur`` also reseeds Numba's own RNG, which is separate from NumPy's
and not restored.) Seeding the global RNG is not thread-safe: do not corrupt from several threads at
once. The first ``glass_blur`` call in a process compiles its Numba kernel (about 2 s).

Extension point: :data:`CORRUPTION_FNS` maps a name to a per-image function
``fn(image uint8 [H, W, 3], severity, seed) -> uint8-valued [H, W, 3]``; register more there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
from collections.abc import Callable, Iterator
from types import ModuleType

import numpy as np
import torch

logger = logging.getLogger(__name__)

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",                 # noise
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",        # blur
    "snow", "frost", "fog", "brightness",                            # weather
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",  # digital
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
MIN_SIDE = 32  # the reference's smallest accepted image side, pixels; smaller images are upsampled

# image uint8 [H, W, 3], severity 1..5, seed in [0, 2**32) -> array [H, W, 3] with values in [0, 255]
ImageCorruption = Callable[[np.ndarray, int, int], np.ndarray]

_SEED_HIGH = 2**32  # np.random.seed and Numba's seed accept 32-bit unsigned seeds
_TAKES_SEED = frozenset({"impulse_noise", "glass_blur"})  # reference functions with a `seed` argument


@functools.cache
def _reference() -> ModuleType:
    """The reference package, imported on first use (it pulls in OpenCV, Numba, scikit-image, SciPy)."""
    try:
        import imagecorruptions
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "amt.corruptions needs the reference ImageNet-C code: pip install 'imagecorruptions-imaug>=1.1.5' "
            "(not the unmaintained 'imagecorruptions' 1.1.2, which fails on NumPy 2)"
        ) from err
    return imagecorruptions


def _reference_corruption(name: str) -> ImageCorruption:
    """Per-image function calling ``imagecorruptions.corrupt`` (seed passed where the reference takes one)."""

    def fn(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
        kwargs = {"seed": seed} if name in _TAKES_SEED else {}
        return _reference().corrupt(image, severity=severity, corruption_name=name, **kwargs)

    fn.__name__ = name
    return fn


CORRUPTION_FNS: dict[str, ImageCorruption] = {name: _reference_corruption(name) for name in CORRUPTIONS}


@contextlib.contextmanager
def numpy_global_seed(seed: int) -> Iterator[None]:
    """Seed NumPy's global RNG (``np.random``) with ``seed`` for the block; restore its previous state after.

    The state is restored in ``finally``, so the caller's global NumPy stream continues exactly where
    it was, also when the block raises.
    """
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _check(images: torch.Tensor, name: str, severity: int) -> None:
    if name not in CORRUPTION_FNS:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTION_FNS)}")
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or severity not in SEVERITIES:
        raise ValueError(f"severity={severity!r}; expected an integer in 1..5")
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor [B, 3, H, W] in [0, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W] (RGB), got {list(images.shape)}; "
                         "repeat a grey channel with images.expand(-1, 3, -1, -1)")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point with pixels in [0, 1], got dtype {images.dtype}")


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] (``round(255·x)``), the reference's input layout.

    Done in NumPy: torch's intra-op threads cost tens of ms per small op on a busy CPU.
    """
    x = images.detach().to(device="cpu", dtype=torch.float32).numpy()
    if x.size:
        lo, hi = float(x.min()), float(x.max())
        if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
            raise ValueError(f"images must have pixels in [0, 1], got min {lo:.4g}, max {hi:.4g}; "
                             "pass unnormalised images (normalisation is the backbone's first op)")
    return np.rint(x.transpose(0, 2, 3, 1) * 255.0).astype(np.uint8)


def _corrupt_one(fn: ImageCorruption, image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """One uint8 [H, W, 3] image -> float32 [H, W, 3] in [0, 1]; small images go through upsampling."""
    h, w = image.shape[:2]
    k = math.ceil(MIN_SIDE / min(h, w)) if min(h, w) < MIN_SIDE else 1
    if k > 1:
        image = image.repeat(k, axis=0).repeat(k, axis=1)
    with numpy_global_seed(seed):
        out = np.asarray(fn(image, severity, seed), dtype=np.float32)
    if out.shape != image.shape:
        raise RuntimeError(f"corruption {getattr(fn, '__name__', fn)!r} returned shape {out.shape} "
                           f"for an input of shape {image.shape}")
    if k > 1:
        out = out.reshape(h, k, w, k, 3).mean(axis=(1, 3))
    return np.clip(out / 255.0, 0.0, 1.0)


def corrupt(images: torch.Tensor, name: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` to every image of the batch.

    Args:
        images: float ``[B, 3, H, W]``, pixels in [0, 1], any device. Grey images are fine as three
            equal channels; sides under :data:`MIN_SIDE` px are handled as the module docstring says.
        name: one of :data:`CORRUPTIONS` (or another key of :data:`CORRUPTION_FNS`).
        severity: integer 1..5.
        generator: the only source of randomness; B seeds are drawn from it, one per image, also for
            the deterministic corruptions, so the generator advances the same way for every name.

    Returns:
        Detached ``[B, 3, H, W]`` with the input's dtype and device, pixels in [0, 1].

    Raises:
        ValueError: unknown name, severity outside 1..5, or images not a float [B, 3, H, W] in [0, 1].
    """
    _check(images, name, severity)
    arrays = _to_uint8_hwc(images)
    b, _, h, w = images.shape
    seeds = torch.randint(0, _SEED_HIGH, (b,), generator=generator, device=generator.device).tolist()
    if min(h, w) < MIN_SIDE:
        logger.debug("corrupt: %d×%d images are under %d px; upsampling ×%d for %s",
                     h, w, MIN_SIDE, math.ceil(MIN_SIDE / min(h, w)), name)
    fn = CORRUPTION_FNS[name]
    corrupted = [_corrupt_one(fn, a, int(severity), s) for a, s in zip(arrays, seeds)]
    out = np.stack(corrupted) if corrupted else np.zeros((0, h, w, 3), dtype=np.float32)
    out = np.ascontiguousarray(out.transpose(0, 3, 1, 2))  # [B, 3, H, W]
    return torch.from_numpy(out).to(device=images.device, dtype=images.dtype)
