"""Rendering of the embedded glyph benchmark: fonts, one glyph, and its random distortions.

Characters are rendered with FreeType from the font files shipped inside matplotlib, then warped
(affine, elastic, stroke width) into framed images; :mod:`amt.data.glyphs` decides which characters
are classes and writes the benchmark.

Fonts (measured on matplotlib's bundled ``fonts/ttf``):

* used: DejaVu Sans, DejaVu Sans Mono, DejaVu Serif and STIX General, four styles each (16 files);
* ``LastResortHE``: maps every code point to a placeholder glyph — excluded;
* ``cm*`` (Computer Modern): TeX encoding behind the Unicode table, glyphs do not depict the
  character their code point names — excluded;
* ``STIXSiz*`` and ``DejaVu*Display``: 17–110 code points each, all delimiters, big operators and
  combining accents drawn as taller size variants of the same design (no new typeface) — excluded;
* ``STIXNonUni*``: private-use glyphs only (2 non-PUA code points) — excluded.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

FONT_FILES = tuple(
    f"{family}{style}.ttf"
    for family, styles in (
        ("DejaVuSans", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("DejaVuSansMono", ("", "-Bold", "-Oblique", "-BoldOblique")),
        ("DejaVuSerif", ("", "-Bold", "-Italic", "-BoldItalic")),
        ("STIXGeneral", ("", "Bol", "Italic", "BolIta")),
    )
    for style in styles
)

# Rendering constants (changing any of them changes the images: bump amt.data.glyphs.GLYPH_VERSION).
SUPERSAMPLE = 2  # images are rendered at this multiple of image_size, then box-filtered down
EM_FRACTION = (0.60, 0.75)  # em height as a fraction of the image side (random per sample)
BASELINE_CENTRE_EM = 0.30  # the frame centre sits this many ems above the baseline (before jitter)
ROTATION_DEG = 15.0  # rotation uniform in ±this, degrees
SHEAR = 0.15  # horizontal shear factor uniform in ±this
ASPECT_LOG = 0.10  # log(width/height) scale ratio uniform in ±this
TRANSLATION_STD = 0.06  # translation std, fraction of the half-side (then clipped to stay in frame)
ELASTIC_STD = 0.03  # elastic displacement std at the 4×4 control points, fraction of the half-side
ELASTIC_MAX = 0.06  # elastic displacement clipped to ±this, fraction of the half-side
ELASTIC_GRID = 4  # control points per side of the elastic displacement field
MARGIN_PX = 2.0  # empty border around the ink, output pixels (covers dilation, filtering); plus ELASTIC_MAX
STROKE_JITTER = (-0.5, 1.0)  # stroke jitter t: t>0 blends toward a 1-pixel dilation, t<0 toward an erosion


@dataclass(frozen=True)
class Glyph:
    """One character rendered by one font at a known size, cropped to its ink.

    Attributes:
        ink: uint8 [h, w] coverage, 0 = paper, 255 = full ink.
        left: x of the crop's left edge relative to the pen origin, pixels.
        top: y of the crop's top edge relative to the baseline (y grows downward), pixels.
        em_px: pixels per em of this rendering.
        advance: horizontal advance, pixels (the centre of the advance box is the glyph's
            horizontal reference, so position within the text cell survives: braille ⠁ vs ⠈).
    """

    ink: np.ndarray
    left: int
    top: int
    em_px: int
    advance: float

    def key(self) -> tuple:
        """Hashable identity of the rendering (pixels and placement), for duplicate detection."""
        return (self.left, self.top, self.ink.shape, hashlib.sha1(self.ink.tobytes()).digest())


def font_dir() -> Path:
    """Folder of the TrueType fonts bundled with matplotlib."""
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_paths() -> list[Path]:
    """Paths of the fonts used (see the module docstring); fails if matplotlib lacks one."""
    paths = [font_dir() / name for name in FONT_FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"matplotlib {matplotlib.__version__} lacks bundled font(s) {missing} in {font_dir()}; "
            f"the glyph benchmark needs them (reinstall matplotlib>=3.7)"
        )
    return paths


def render_glyph(font: ImageFont.FreeTypeFont, char: str) -> Glyph | None:
    """Render ``char`` with ``font`` (FreeType, anti-aliased) cropped to its ink; None if blank."""
    left, top, right, bottom = font.getbbox(char, anchor="ls")
    if right <= left or bottom <= top:
        return None
    image = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(image).text((-left, -top), char, font=font, fill=255, anchor="ls")
    ink = np.asarray(image)
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        return None
    crop = np.ascontiguousarray(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    return Glyph(crop, int(left + cols[0]), int(top + rows[0]), int(font.size), float(font.getlength(char)))


def load_fonts(paths: list[Path], em_px: int) -> list[ImageFont.FreeTypeFont]:
    """FreeType fonts at ``em_px`` pixels per em, basic layout (no shaping, deterministic)."""
    return [ImageFont.truetype(str(p), em_px, layout_engine=ImageFont.Layout.BASIC) for p in paths]


def sample_distortions(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random distortion parameters of ``n`` samples (see :func:`render_samples`).

    Returns:
        ``em_frac`` [n], ``theta`` [n] radians, ``shear`` [n], ``aspect`` [n] (x scale; y gets
        1/aspect), ``translation`` [n, 2] half-sides, ``elastic`` [n, 2, 4, 4] half-sides,
        ``stroke`` [n] in :data:`STROKE_JITTER`.
    """
    return {
        "em_frac": rng.uniform(*EM_FRACTION, n),
        "theta": np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, n)),
        "shear": rng.uniform(-SHEAR, SHEAR, n),
        "aspect": np.exp(rng.uniform(-ASPECT_LOG, ASPECT_LOG, n) / 2),
        "translation": rng.normal(0.0, TRANSLATION_STD, (n, 2)),
        "elastic": np.clip(rng.normal(0.0, ELASTIC_STD, (n, 2, ELASTIC_GRID, ELASTIC_GRID)), -ELASTIC_MAX, ELASTIC_MAX),
        "stroke": rng.uniform(*STROKE_JITTER, n),
    }


def render_samples(glyphs: list[Glyph], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Distorted renderings of ``glyphs`` (one sample each), framed and centred.

    Per sample: em size uniform in :data:`EM_FRACTION` of the side (natural layout: the frame
    centre is the advance box's centre, :data:`BASELINE_CENTRE_EM` above the baseline, so ``o``
    stays smaller than ``O``, ``,`` lower than ``'``, braille ⠁ left of ⠈), rotation, shear,
    aspect and translation; the glyph is shrunk and shifted only where it would leave the frame
    (:data:`MARGIN_PX` plus the elastic bound). Then a smooth elastic field (bicubic from a 4×4
    grid), stroke jitter (a blend toward a 3×3 dilation or erosion at 2× resolution, i.e. ±½
    output pixel), a 2×2 box filter, and a contrast stretch that makes the darkest pixel black.

    Args:
        glyphs: N renderings (cropped ink and placement).
        image_size: output side S, pixels.
        rng: drives every random choice.

    Returns:
        uint8 [N, S, S], 0 = black ink, 255 = white paper.
    """
    return render_glyphs(glyphs, sample_distortions(len(glyphs), rng), image_size)


def _inverse_maps(glyphs: list[Glyph], params: dict[str, np.ndarray], image_size: int) -> np.ndarray:
    """Affine maps [N, 2, 3] from output coordinates ([-1, 1]², x right, y down) to crop pixels.

    Forward: p = k·M·(x - ref)/em + t with M = rotation·shear·aspect, k = 2·em_frac shrunk so the
    warped ink box fits inside the margin, t the nominal translation clipped to keep it inside.
    """
    n = len(glyphs)
    shape = np.array([g.ink.shape[::-1] for g in glyphs], np.float64)  # [n, 2] (w, h)
    origin = np.array([[g.left, g.top] for g in glyphs], np.float64)  # crop top-left, pixels from the pen
    em = np.array([g.em_px for g in glyphs], np.float64)
    advance = np.array([g.advance for g in glyphs], np.float64)
    x_ref = np.where(advance > 0, advance / 2, origin[:, 0] + shape[:, 0] / 2)
    ref = np.stack([x_ref, -BASELINE_CENTRE_EM * em], axis=1)  # glyph point mapped to the frame centre
    c, s = np.cos(params["theta"]), np.sin(params["theta"])
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], 1)
    shear = np.zeros((n, 2, 2))
    shear[:, 0, 0] = shear[:, 1, 1] = 1.0
    shear[:, 0, 1] = params["shear"]
    m = rot @ shear
    m[:, :, 0] *= params["aspect"][:, None]
    m[:, :, 1] /= params["aspect"][:, None]
    corners = origin[:, :, None] + shape[:, :, None] * np.array([[0, 1, 0, 1], [0, 0, 1, 1]])  # [n, 2, 4]
    warped = m @ ((corners - ref[:, :, None]) / em[:, None, None])  # em units
    margin = 2 * MARGIN_PX / image_size + ELASTIC_MAX  # fraction of the half-side
    extent = np.maximum(np.ptp(warped, axis=2).max(axis=1), 1e-6)
    k = np.minimum(2 * params["em_frac"], (2 - 2 * margin) / extent)
    lo, hi = k[:, None] * warped.min(axis=2), k[:, None] * warped.max(axis=2)
    t = np.clip(params["translation"], -1 + margin - lo, 1 - margin - hi)
    a = em[:, None, None] * np.linalg.inv(m) / k[:, None, None]  # x = ref + a·(p - t)
    offset = ref - np.einsum("nij,nj->ni", a, t) - origin
    return np.concatenate([a, offset[:, :, None]], axis=2)


@functools.lru_cache(maxsize=4)
def _bicubic_basis(size: int) -> torch.Tensor:
    """[G², size²] matrix: each control point's one-hot grid upsampled bicubically (align_corners)."""
    eye = torch.eye(ELASTIC_GRID**2).view(ELASTIC_GRID**2, 1, ELASTIC_GRID, ELASTIC_GRID)
    return F.interpolate(eye, size=(size, size), mode="bicubic", align_corners=True).view(ELASTIC_GRID**2, -1)


def _max3x3(x: torch.Tensor) -> torch.Tensor:
    """3×3 maximum filter of [N, 1, H, W] (separable; outside the image counts as -inf)."""
    p = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(p[..., :, :-2], p[..., :, 1:-1]), p[..., :, 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


def render_glyphs(glyphs: list[Glyph], params: dict[str, np.ndarray], image_size: int) -> np.ndarray:
    """Render ``glyphs`` with the distortions ``params`` (:func:`sample_distortions`); uint8 [N, S, S]."""
    n = len(glyphs)
    g = image_size * SUPERSAMPLE
    height = max(gl.ink.shape[0] for gl in glyphs)
    width = max(gl.ink.shape[1] for gl in glyphs)
    canvas = np.zeros((n, 1, height, width), np.float32)
    for i, gl in enumerate(glyphs):
        h, w = gl.ink.shape
        canvas[i, 0, :h, :w] = gl.ink
    canvas = torch.from_numpy(canvas) / 255.0
    inverse = torch.from_numpy(_inverse_maps(glyphs, params, image_size)).float()

    centres = (torch.arange(g, dtype=torch.float32) + 0.5) / g * 2 - 1
    py, px = torch.meshgrid(centres, centres, indexing="ij")
    points = torch.stack([px, py], dim=-1).expand(n, g, g, 2)  # (x, y) in [-1, 1]
    elastic = torch.from_numpy(params["elastic"]).float().reshape(n * 2, ELASTIC_GRID**2)
    field = (elastic @ _bicubic_basis(g)).view(n, 2, g, g)  # = bicubic upsampling, as one matmul
    points = points + field.clamp(-ELASTIC_MAX, ELASTIC_MAX).permute(0, 2, 3, 1)
    pix = torch.einsum("nij,nhwj->nhwi", inverse[:, :, :2], points) + inverse[:, None, None, :, 2]
    grid = pix * (2 / torch.tensor([width, height], dtype=torch.float32)) - 1  # pixel j spans [j, j+1]
    ink = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    t = torch.from_numpy(params["stroke"]).float().view(n, 1, 1, 1)
    dilated = _max3x3(ink)
    eroded = -_max3x3(-ink)
    ink = torch.where(t > 0, (1 - t) * ink + t * dilated, (1 + t) * ink - t * eroded)
    ink = F.avg_pool2d(ink, SUPERSAMPLE)
    # Contrast: the darkest pixel becomes full ink, so hairlines thinned below a pixel stay visible.
    ink = (ink / ink.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)).clamp(0, 1)
    return (255 - torch.round(ink[:, 0] * 255)).to(torch.uint8).numpy()


# Rendering similarity (used by amt.data.glyphs to find look-alikes of Latin letters). Speed only:
SIMILARITY_BLOCK_PX = 8  # block side of the pruning bound in similar_pairs, pixels of the rendering


def _placement(glyph: Glyph) -> tuple[int, int]:
    """(row, column) of the crop's top-left on the comparison canvas: baseline on row 0, ink centred on column 0."""
    return glyph.top, -(glyph.ink.shape[1] // 2)


def _energy(glyph: Glyph) -> int:
    """Σ coverage² of the rendering (coverage 0–255 per pixel), exact."""
    ink = glyph.ink.astype(np.int64)
    return int((ink * ink).sum())


def _dot(a: Glyph, b: Glyph) -> int:
    """Σ a·b over the common canvas (exact integer), the two placed by :func:`_placement`."""
    (ra, ca), (rb, cb) = _placement(a), _placement(b)
    r0, r1 = max(ra, rb), min(ra + a.ink.shape[0], rb + b.ink.shape[0])
    c0, c1 = max(ca, cb), min(ca + a.ink.shape[1], cb + b.ink.shape[1])
    if r1 <= r0 or c1 <= c0:
        return 0
    sa = a.ink[r0 - ra : r1 - ra, c0 - ca : c1 - ca].astype(np.int64)
    return int((sa * b.ink[r0 - rb : r1 - rb, c0 - cb : c1 - cb]).sum())


def glyph_similarity(a: Glyph, b: Glyph) -> float:
    """Rendering similarity of two glyphs rendered at the same em size, in [0, 1].

    Both crops go on one canvas with their baselines on one row and their ink bounding boxes centred on
    one column (to the pixel); with anti-aliased coverages a, b (0–255 per pixel) the similarity is the
    Tanimoto coefficient a·b / (a·a + b·b − a·b): 1 exactly when the two canvases are identical, the
    intersection-over-union of the inks for binary masks, 0 when the inks do not overlap. Exact integer
    sums, so the value depends only on the two renderings.
    """
    dot, ea, eb = _dot(a, b), _energy(a), _energy(b)
    return dot / (ea + eb - dot) if ea + eb - dot > 0 else 1.0


def _block_norms(glyphs: list[Glyph], origin: tuple[int, int], blocks: tuple[int, int]) -> np.ndarray:
    """[N, blocks] float64: √(Σ coverage²) of each glyph in each B×B block of the canvas (B = SIMILARITY_BLOCK_PX)."""
    bs = SIMILARITY_BLOCK_PX
    out = np.zeros((len(glyphs), *blocks))
    for k, glyph in enumerate(glyphs):
        r, c = (p - o for p, o in zip(_placement(glyph), origin))
        h, w = glyph.ink.shape
        pad = np.zeros((-(-(r % bs + h) // bs) * bs, -(-(c % bs + w) // bs) * bs))
        pad[r % bs : r % bs + h, c % bs : c % bs + w] = glyph.ink.astype(np.float64) ** 2
        sums = pad.reshape(pad.shape[0] // bs, bs, pad.shape[1] // bs, bs).sum(axis=(1, 3))
        out[k, r // bs : r // bs + sums.shape[0], c // bs : c // bs + sums.shape[1]] = sums
    return np.sqrt(out.reshape(len(glyphs), -1))


def similar_pairs(queries: list[Glyph], refs: list[Glyph], floor: float) -> list[tuple[int, int, float]]:
    """Every (query index, reference index, :func:`glyph_similarity`) whose similarity is ≥ ``floor``.

    Exact: a pair is skipped only when an upper bound of its similarity is below ``floor``. The bound
    replaces a·b by Σ over canvas blocks of ‖a_block‖·‖b_block‖ (Cauchy–Schwarz per block), one matrix
    product for all pairs; survivors are computed exactly. All glyphs must share one em size.
    """
    if not queries or not refs:
        return []
    everything = queries + refs
    places = np.array([_placement(g) for g in everything])
    ends = places + np.array([g.ink.shape for g in everything])
    origin = (int(places[:, 0].min()), int(places[:, 1].min()))
    blocks = tuple(int(-(-(e - o) // SIMILARITY_BLOCK_PX)) + 1 for e, o in zip(ends.max(axis=0), origin))
    norms = _block_norms(everything, origin, blocks)
    energy = [_energy(g) for g in everything]
    eq, er = np.array(energy[: len(queries)], np.float64), np.array(energy[len(queries) :], np.float64)
    bound = (norms[: len(queries)] @ norms[len(queries) :].T) * (1 + 1e-9) + 1.0  # ≥ a·b despite rounding
    upper = bound / np.maximum(eq[:, None] + er[None, :] - bound, 1e-9)
    upper[bound >= eq[:, None] + er[None, :] - bound] = np.inf
    out = []
    for i, j in zip(*np.nonzero(upper >= floor)):
        dot = _dot(queries[i], refs[j])
        sim = dot / (energy[i] + energy[len(queries) + j] - dot)
        if sim >= floor:
            out.append((int(i), int(j), sim))
    return out


def nearest_lookalikes(
    queries: dict[int, tuple[int, ...]],
    refs: dict[int, tuple[int, ...]],
    renders: dict[tuple[int, int], Glyph],
    threshold: float,
) -> dict[int, tuple[float, int, int, int]]:
    """The queries that render like some reference: aggregated similarity ≥ ``threshold``.

    Per (query, reference) pair the similarities (:func:`glyph_similarity`) in the fonts that draw both
    are aggregated as their lower median, i.e. the value reached in at least half of those fonts.

    Args:
        queries, refs: code point -> indices of the fonts that draw it.
        renders: ``{(code point, font index): Glyph}``, all at one em size.
        threshold: in (0, 1]; pairs below it in a font are not computed exactly (:func:`similar_pairs`).

    Returns:
        query code point -> (aggregated similarity, most similar reference code point (lowest on a tie),
        fonts compared, fonts where the similarity reaches ``threshold``), for look-alike queries only.
    """
    sims: dict[tuple[int, int], list[float]] = {}
    for font in sorted({i for fonts in refs.values() for i in fonts}):
        q_cps = [q for q in sorted(queries) if font in queries[q]]
        r_cps = [r for r in sorted(refs) if font in refs[r]]
        q_glyphs, r_glyphs = ([renders[(cp, font)] for cp in cps] for cps in (q_cps, r_cps))
        for i, j, sim in similar_pairs(q_glyphs, r_glyphs, threshold):
            sims.setdefault((q_cps[i], r_cps[j]), []).append(sim)
    best: dict[int, tuple[float, int, int, int]] = {}
    for (q, r), values in sorted(sims.items()):
        n = len(set(queries[q]) & set(refs[r]))
        rank = -(-n // 2)  # the lower median is the ⌈n/2⌉-th largest value; fonts not listed are below threshold
        score = sorted(values, reverse=True)[rank - 1] if len(values) >= rank else 0.0
        if score >= threshold and score > best.get(q, (-1.0,))[0]:
            best[q] = (score, r, n, len(values))
    return best
