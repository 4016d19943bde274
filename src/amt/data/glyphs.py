"""The embedded glyph benchmark: an Omniglot-like multi-domain few-shot benchmark, no download.

A *domain* is a Unicode script or symbol block, a *class* is one character (code point), and the
samples of a class are renderings of that character in different typefaces with a random affine warp,
a mild elastic distortion and stroke-width jitter (fonts and rendering: :mod:`amt.data.glyph_render`).
This module finds the classes, splits them, and writes and caches the benchmark.

A (font, character) pair counts only if the rendering has ink (``GlyphConfig.min_ink_pixels`` dark
pixels at 64 px per em) and differs from the font's ``.notdef`` rendering; a character is a class
only if ``GlyphConfig.min_fonts`` fonts pass. Characters that are canonical duplicates (changed by
NFC) or that render pixel-identically to an already kept character of the same domain in some font
(e.g. Greek tonos/oxia pairs, Latin small capitals) are dropped.

Out-of-domain classes that render like a Latin class are removed (before the per-domain cap and the
split) and listed in the manifest. The measure (:func:`amt.data.glyph_render.glyph_similarity`): both
characters rendered by the same font at :data:`SCAN_EM_PX` px per em, on one canvas with their baselines
on one row (height and size stay part of a character: o vs O, as in the benchmark's layout) and their ink
boxes centred on one column (side bearings do not matter: samples are translated at random), compared by
the Tanimoto coefficient of the anti-aliased coverages, a·b / (a·a + b·b − a·b) (the IoU of the inks for
binary masks; 1 only for identical renderings). Per (candidate, Latin class) pair it is aggregated over
the fonts that draw both as the lower median (the value reached in at least half of them, so a design
shared by a minority of fonts does not decide); a candidate whose aggregate reaches
:data:`LOOKALIKE_THRESHOLD` for some Latin class (every Latin class, not just the training split) is a
look-alike. Homoglyphs share outlines within a font and score 1.0 in most fonts (Greek Α, Cyrillic а,
Armenian օ); distinct Latin letters that differ only by a diacritic reach 0.981 at most.

Layout on disk (``<root>`` is returned by :func:`build_glyph_benchmark`)::

    <root>/manifest.json                      fonts, counts, removed look-alikes, seed, version, configuration
    <root>/<domain>/splits.json               {"train": [...], "val": [...], "test": [...]}
    <root>/<domain>/classes.json              class name -> character, Unicode name, fonts
    <root>/<domain>/U+0041/00.png             L-mode PNG, black glyph on white, image_size²
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import time
import unicodedata
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from fontTools.ttLib import TTFont
from PIL import Image, ImageFont
from tqdm import tqdm

from amt.config import ConfigError, DomainConfig, GlyphConfig, to_dict
from amt.data.glyph_render import (
    EM_FRACTION,
    FONT_FILES,
    SUPERSAMPLE,
    Glyph,
    font_paths,
    load_fonts,
    nearest_lookalikes,
    render_glyph,
    render_glyphs,
    sample_distortions,
)

log = logging.getLogger(__name__)

GLYPH_VERSION = "2"  # bump whenever a change alters the written images, splits or class sets

SOURCE_DOMAIN = "latin"  # the training domain; its held-out classes are the in-domain test
# Domain rules, checked in order: inclusive code-point ranges, then Unicode-name prefixes.
DOMAIN_RULES: tuple[tuple[str, tuple[tuple[int, int], ...], tuple[str, ...]], ...] = (
    ("latin", (), ("LATIN ",)),
    ("greek", (), ("GREEK ",)),
    ("cyrillic", (), ("CYRILLIC ",)),
    ("armenian_georgian", (), ("ARMENIAN ", "GEORGIAN ")),
    ("braille", ((0x2800, 0x28FF),), ()),
    # Mathematical Operators, Misc Technical, Misc Math Symbols-A/-B, Supplemental Math Operators.
    ("math", ((0x2200, 0x22FF), (0x2300, 0x23FF), (0x27C0, 0x27EF), (0x2980, 0x29FF), (0x2A00, 0x2AFF)), ()),
    # Arrows, Geometric Shapes, Supplemental Arrows-A/-B, Misc Symbols and Arrows. Box drawing and
    # block elements are left out: their identity is their extent in the text cell, which framing removes.
    ("arrows_shapes", ((0x2190, 0x21FF), (0x25A0, 0x25FF), (0x27F0, 0x27FF), (0x2900, 0x297F), (0x2B00, 0x2BFF)), ()),
    ("dingbats", ((0x2600, 0x26FF), (0x2700, 0x27BF)), ()),  # Misc Symbols, Dingbats
)
DOMAIN_NAMES = tuple(rule[0] for rule in DOMAIN_RULES)

# Scan and build constants (SCAN_EM_PX and NOTDEF_PROBE change the class sets: bump GLYPH_VERSION).
SCAN_EM_PX = 64  # pixels per em of the reference rendering used for the ink and duplicate checks
NOTDEF_PROBE = 0x10FFFD  # a code point no used font maps: renders the .notdef glyph
CLASSES_PER_BATCH = 16  # classes rendered per tensor batch (speed only; batches are fixed, so bytes are too)
WRITER_THREADS = 4  # threads writing PNG files
# An out-of-domain class is removed when its aggregated rendering similarity (module docstring) to some Latin
# class is ≥ this (changes the class sets: bump GLYPH_VERSION). Measured with the default GlyphConfig: each Latin
# class vs its nearest other Latin class: median 0.897, 90 % 0.951, 99 % 0.971, max 0.981 (Ŭ/Ǔ: the closest
# distinct Latin classes differ only by a diacritic). Each of the 1911 out-of-domain candidates vs its nearest
# Latin class: median < 0.5, 90 % 0.85; 107 ≥ 0.999 (Greek Α/A, Cyrillic а/a, Armenian օ/o, ...), 10 in
# [0.990, 0.999) (Ё/Ë, Ϊ/Ï, ս/u, ...), none in [0.985, 0.990), then 0.9849 (Ӈ/Ꜧ), 0.981 (Ͻ/Ɔ), 0.976 (ѐ/è).
# (Random pairs in one font: median 0.24 Latin-Latin, 0.19 out-of-domain-Latin.) Above every distinct-Latin
# pair: a removed class is closer to a Latin class than any two Latin classes are to each other.
LOOKALIKE_THRESHOLD = 0.985


def domain_of(code_point: int) -> str | None:
    """The benchmark domain of a code point, or None if it belongs to none."""
    char = chr(code_point)
    name = unicodedata.name(char, "")
    for domain, ranges, prefixes in DOMAIN_RULES:
        if any(lo <= code_point <= hi for lo, hi in ranges) or (name and name.startswith(prefixes)):
            return domain
    return None


def _is_candidate(code_point: int) -> bool:
    """A visible, NFC-stable character (no controls, spaces, combining marks or canonical duplicates)."""
    char = chr(code_point)
    category = unicodedata.category(char)
    if category[0] in "CZ" or category in ("Mn", "Me"):
        return False
    return unicodedata.normalize("NFC", char) == char


@dataclass(frozen=True)
class GlyphClass:
    """A character kept as a class: its code point and the fonts (indices) that draw it."""

    code_point: int
    fonts: tuple[int, ...]

    @property
    def name(self) -> str:
        """Filesystem-safe class folder name, e.g. ``U+0041``."""
        return f"U+{self.code_point:04X}"


def scan_classes(cfg: GlyphConfig, paths: list[Path]) -> tuple[dict[str, list[GlyphClass]], dict]:
    """Find every character with ink in ``cfg.min_fonts`` fonts, per domain, duplicates removed.

    Returns:
        (classes per domain in code-point order, reference renderings ``{(code point, font): Glyph}``
        at :data:`SCAN_EM_PX` px per em for the kept classes).
    """
    cmaps = [set(TTFont(p, lazy=True).getBestCmap()) for p in paths]
    fonts = load_fonts(paths, SCAN_EM_PX)
    notdef = [render_glyph(f, chr(NOTDEF_PROBE)) for f in fonts]
    coverage: dict[int, list[int]] = {}
    for i, cmap in enumerate(cmaps):
        for cp in cmap:
            coverage.setdefault(cp, []).append(i)
    classes: dict[str, list[GlyphClass]] = {d: [] for d in DOMAIN_NAMES}
    renders: dict[tuple[int, int], Glyph] = {}
    seen: dict[str, dict[tuple, int]] = {d: {} for d in DOMAIN_NAMES}
    n_rendered = n_blank = n_duplicate = 0
    for cp in sorted(coverage):
        if len(coverage[cp]) < cfg.min_fonts or not _is_candidate(cp):
            continue
        domain = domain_of(cp)
        if domain is None:
            continue
        good: dict[int, Glyph] = {}
        for i in coverage[cp]:
            glyph = render_glyph(fonts[i], chr(cp))
            n_rendered += 1
            if glyph is None or int((glyph.ink > 127).sum()) < cfg.min_ink_pixels:
                continue
            ref = notdef[i]
            if ref is not None and ref.key() == glyph.key():
                continue
            good[i] = glyph
        if len(good) < cfg.min_fonts:
            n_blank += 1
            continue
        keys = [(i, g.key()) for i, g in good.items()]
        if any(k in seen[domain] for k in keys):
            n_duplicate += 1
            continue
        seen[domain].update((k, cp) for k in keys)
        classes[domain].append(GlyphClass(cp, tuple(sorted(good))))
        renders.update(((cp, i), g) for i, g in good.items())
    log.info(
        "scanned %d (font, character) renderings: %d characters lack ink in %d fonts, %d duplicates dropped; "
        "candidates per domain: %s",
        n_rendered, n_blank, cfg.min_fonts, n_duplicate, {d: len(c) for d, c in classes.items()},
    )  # fmt: skip
    return classes, renders


def remove_lookalikes(
    found: dict[str, list[GlyphClass]], renders: dict[tuple[int, int], Glyph]
) -> tuple[dict[str, list[GlyphClass]], dict[str, list[dict]]]:
    """Drop the out-of-domain classes that render like a Latin class (rule: module docstring).

    Args:
        found: classes per domain (:func:`scan_classes`); every Latin class is a reference.
        renders: reference renderings ``{(code point, font): Glyph}`` at :data:`SCAN_EM_PX` px per em.

    Returns:
        (classes per domain without the look-alikes, removed classes per out-of-domain domain in
        code-point order: class, char, the most similar Latin class and char (lowest code point on a
        tie), its aggregated similarity in [0, 1], the fonts compared and how many reach the threshold).
    """
    refs = {c.code_point: c.fonts for c in found[SOURCE_DOMAIN]}
    queries = {c.code_point: c.fonts for d in DOMAIN_NAMES if d != SOURCE_DOMAIN for c in found[d]}
    best = {
        q: {"class": f"U+{q:04X}", "char": chr(q), "latin_class": f"U+{ref:04X}", "latin_char": chr(ref),
            "similarity": round(sim, 4), "fonts_compared": n, "fonts_alike": n_alike}
        for q, (sim, ref, n, n_alike) in nearest_lookalikes(queries, refs, renders, LOOKALIKE_THRESHOLD).items()
    }  # fmt: skip
    kept = {d: [c for c in cs if d == SOURCE_DOMAIN or c.code_point not in best] for d, cs in found.items()}
    removed = {d: [best[c.code_point] for c in cs if c.code_point in best] for d, cs in found.items()}
    log.info("removed classes that render like a Latin class (similarity ≥ %.3f): %s", LOOKALIKE_THRESHOLD,
             {d: "".join(r["char"] for r in rs) for d, rs in removed.items() if rs})  # fmt: skip
    return kept, {d: rs for d, rs in removed.items() if d != SOURCE_DOMAIN}


def split_classes(
    classes: list[GlyphClass], cfg: GlyphConfig, domain_index: int, source: bool
) -> dict[str, list[GlyphClass]]:
    """Cap and split one domain's classes with a generator seeded by (cfg.seed, domain).

    The source domain keeps at most ``cfg.max_source_classes`` split into train / val / test by
    ``cfg.val_fraction`` and ``cfg.test_fraction``; other domains keep at most
    ``cfg.max_classes_per_domain`` split into val (``cfg.val_fraction``) and test (the rest).
    Each split is in code-point order.
    """
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(0, domain_index)))
    cap = cfg.max_source_classes if source else cfg.max_classes_per_domain
    order = [classes[i] for i in rng.permutation(len(classes))[:cap]]
    n_val = round(cfg.val_fraction * len(order))
    n_test = round(cfg.test_fraction * len(order)) if source else len(order) - n_val
    parts = {
        "train": order[n_val + n_test :],
        "val": order[:n_val],
        "test": order[n_val : n_val + n_test],
    }
    return {k: sorted(v, key=lambda c: c.code_point) for k, v in parts.items()}


def _font_schedule(fonts: tuple[int, ...], n: int, rng: np.random.Generator) -> list[int]:
    """``n`` font indices: concatenated random permutations of ``fonts`` (each used ⌊n/F⌋ or ⌈n/F⌉ times)."""
    out: list[int] = []
    while len(out) < n:
        out += [fonts[i] for i in rng.permutation(len(fonts))]
    return out[:n]


def config_hash(cfg: GlyphConfig, paths: list[Path]) -> str:
    """Digest of everything that determines the benchmark: version, configuration, font files."""
    payload = {
        "version": GLYPH_VERSION,
        "config": {k: v for k, v in to_dict(cfg).items() if k != "eval_domains"},  # selection, not content
        "fonts": [[p.name, p.stat().st_size] for p in paths],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def benchmark_dir(cfg: GlyphConfig, cache_dir: str | Path) -> Path:
    """Where :func:`build_glyph_benchmark` writes (or finds) the benchmark for ``cfg``."""
    digest = config_hash(cfg, font_paths())
    return Path(cache_dir) / f"glyphs-v{GLYPH_VERSION}-seed{cfg.seed}-{cfg.image_size}px-{digest}"


def _manifest_matches(root: Path, digest: str) -> bool:
    """True if ``root`` holds a complete benchmark built from the configuration ``digest``."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return manifest.get("version") == GLYPH_VERSION and manifest.get("config_hash") == digest


def _check_config(cfg: GlyphConfig) -> None:
    """Fail fast on settings that cannot give a usable benchmark."""
    problems = []
    if cfg.image_size < 8:
        problems.append(f"image_size={cfg.image_size} (need ≥ 8)")
    if cfg.samples_per_class < 1:
        problems.append(f"samples_per_class={cfg.samples_per_class} (need ≥ 1)")
    if not 1 <= cfg.min_fonts <= len(FONT_FILES):
        problems.append(f"min_fonts={cfg.min_fonts} (need 1..{len(FONT_FILES)})")
    if not (0 <= cfg.val_fraction and 0 <= cfg.test_fraction and cfg.val_fraction + cfg.test_fraction < 1):
        problems.append(f"val_fraction={cfg.val_fraction}, test_fraction={cfg.test_fraction} (need ≥ 0, sum < 1)")
    if cfg.max_source_classes < 3 or cfg.max_classes_per_domain < 2:
        problems.append(
            f"max_source_classes={cfg.max_source_classes}, max_classes_per_domain={cfg.max_classes_per_domain} "
            f"(need ≥ 3 and ≥ 2)"
        )
    if problems:
        raise ConfigError("glyphs: invalid " + "; ".join(problems))


def build_glyph_benchmark(cfg: GlyphConfig, cache_dir: str | Path) -> Path:
    """Render the benchmark into ``cache_dir`` (or reuse it) and return its root folder.

    Deterministic: the same ``cfg`` and fonts give the same bytes. Idempotent: a root whose
    manifest matches is returned without touching it. Atomic: everything is written into a
    temporary sibling folder that is renamed into place only when complete (``manifest.json``
    last); a failed build removes its temporary folder.

    Args:
        cfg: benchmark settings (seed, image size, samples per class, class caps, splits).
        cache_dir: parent folder; created if missing.

    Returns:
        ``cache_dir/glyphs-v{GLYPH_VERSION}-seed{seed}-{image_size}px-{config hash}``.
    """
    _check_config(cfg)
    paths = font_paths()
    digest = config_hash(cfg, paths)
    root = benchmark_dir(cfg, cache_dir)
    if _manifest_matches(root, digest):
        log.info("glyph benchmark already built at %s", root)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    log.info("building glyph benchmark %s (temporary folder %s)", root.name, tmp.name)
    try:
        _write_benchmark(cfg, paths, digest, tmp)
        _move_into_place(tmp, root, digest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _move_into_place(tmp: Path, root: Path, digest: str) -> None:
    """Rename the finished ``tmp`` to ``root``, replacing a stale ``root``; tolerate a concurrent winner."""
    if root.exists() and not _manifest_matches(root, digest):
        log.warning("replacing incomplete or stale benchmark folder %s", root)
        stale = root.parent / f".{root.name}.stale-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(root, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, root)
    except OSError:
        if not _manifest_matches(root, digest):
            raise
        log.info("another process finished %s first; discarding this build", root)
        shutil.rmtree(tmp, ignore_errors=True)


def _write_benchmark(cfg: GlyphConfig, paths: list[Path], digest: str, out: Path) -> None:
    """Scan, split, render and write every domain into ``out``; ``manifest.json`` is written last."""
    start = time.perf_counter()
    found, renders = scan_classes(cfg, paths)
    n_found = {d: len(cs) for d, cs in found.items()}
    found, lookalikes = remove_lookalikes(found, renders)
    em_px = max(SCAN_EM_PX, math.ceil(SUPERSAMPLE * EM_FRACTION[1] * cfg.image_size))
    fonts = load_fonts(paths, em_px) if em_px != SCAN_EM_PX else None
    splits = {
        d: split_classes(found[d], cfg, i, source=d == SOURCE_DOMAIN) for i, d in enumerate(DOMAIN_NAMES) if found[d]
    }
    jobs = [(d, c) for d, parts in splits.items() for part in parts.values() for c in part]
    domains_info = {d: _write_domain_files(out / d, parts, paths, n_found[d]) for d, parts in splits.items()}
    for d, removed in lookalikes.items():
        if d in domains_info:
            domains_info[d]["lookalikes_removed"] = removed
    digits = len(str(cfg.samples_per_class - 1))
    n = cfg.samples_per_class
    pending: list[Future] = []
    # PNG encoding and file creation release the GIL; a few writer threads overlap them with rendering.
    with ThreadPoolExecutor(WRITER_THREADS) as pool, tqdm(
        total=len(jobs), desc="rendering glyphs", unit="class", disable=None
    ) as bar:
        for first in range(0, len(jobs), CLASSES_PER_BATCH):
            batch = jobs[first : first + CLASSES_PER_BATCH]
            images = _render_classes([c for _, c in batch], cfg, renders, fonts)
            for future in pending:  # surface write errors within one batch; bounds memory
                future.result()
            pending = [
                pool.submit(_write_class, out / d / c.name, images[j * n : (j + 1) * n], digits)
                for j, (d, c) in enumerate(batch)
            ]
            bar.update(len(batch))
        for future in pending:
            future.result()
    manifest = {
        "version": GLYPH_VERSION,
        "config_hash": digest,
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "samples_per_class": cfg.samples_per_class,
        "source_domain": SOURCE_DOMAIN,
        "lookalike_threshold": LOOKALIKE_THRESHOLD,
        "domains": domains_info,
        "total_classes": len(jobs),
        "total_images": len(jobs) * cfg.samples_per_class,
        "fonts": [{"file": p.name, "bytes": p.stat().st_size} for p in paths],
        "matplotlib_version": matplotlib.__version__,
        "config": to_dict(cfg),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log.info(
        "wrote %d classes, %d images (%s) in %.1f s",
        len(jobs), manifest["total_images"], {d: i["n_classes"] for d, i in domains_info.items()},
        time.perf_counter() - start,
    )  # fmt: skip


def _write_domain_files(folder: Path, parts: dict[str, list[GlyphClass]], paths: list[Path], n_found: int) -> dict:
    """Create ``folder`` with ``splits.json`` and ``classes.json``; return the domain's manifest entry."""
    folder.mkdir()
    (folder / "splits.json").write_text(json.dumps({k: [c.name for c in v] for k, v in parts.items()}, indent=1))
    classes = sorted((c for part in parts.values() for c in part), key=lambda c: c.code_point)
    meta = {
        c.name: {"char": chr(c.code_point), "name": unicodedata.name(chr(c.code_point), ""),
                 "fonts": [paths[i].name for i in c.fonts]}
        for c in classes
    }  # fmt: skip
    (folder / "classes.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    if len(parts["test"]) < 5:
        log.warning("domain %s has only %d test classes; 5-way tasks need 5", folder.name, len(parts["test"]))
    return {
        "in_domain": folder.name == SOURCE_DOMAIN,
        "n_classes": len(classes),
        "n_candidates": n_found,
        "splits": {k: len(v) for k, v in parts.items()},
    }


def _render_classes(
    classes: list[GlyphClass],
    cfg: GlyphConfig,
    renders: dict[tuple[int, int], Glyph],
    fonts: list[ImageFont.FreeTypeFont] | None,
) -> np.ndarray:
    """``cfg.samples_per_class`` images of each class, uint8 [len(classes) · n, S, S], class-major.

    Each class has its own generator seeded by (cfg.seed, code point): its images do not depend on
    which other classes are built. ``fonts`` (None: reuse the reference ``renders``) re-renders at
    a larger em size when the image size needs it.
    """
    glyphs: list[Glyph] = []
    params = []
    for c in classes:
        rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1, c.code_point)))
        schedule = _font_schedule(c.fonts, cfg.samples_per_class, rng)
        if fonts is None:
            glyphs += [renders[(c.code_point, i)] for i in schedule]
        else:
            cache = {i: render_glyph(fonts[i], chr(c.code_point)) for i in set(schedule)}
            glyphs += [cache[i] for i in schedule]
        params.append(sample_distortions(cfg.samples_per_class, rng))
    return render_glyphs(glyphs, {k: np.concatenate([p[k] for p in params]) for k in params[0]}, cfg.image_size)


def _write_class(folder: Path, images: np.ndarray, digits: int) -> None:
    """Write uint8 [N, S, S] images as ``folder/00.png`` … (L-mode PNG, no metadata)."""
    folder.mkdir()
    for j, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{j:0{digits}d}.png", format="PNG")


def glyph_domains(root: str | Path, eval_split: str = "test") -> tuple[DomainConfig, tuple[DomainConfig, ...]]:
    """Domain configurations of a built benchmark.

    Args:
        root: folder returned by :func:`build_glyph_benchmark`.
        eval_split: ``"test"`` for reported results, ``"val"`` for hyperparameter selection on
            disjoint classes.

    Returns:
        (training domain: Latin ``train`` split, evaluation domains: Latin ``eval_split``
        (in-domain) followed by every out-of-domain ``eval_split``, in :data:`DOMAIN_NAMES` order).
    """
    if eval_split not in ("val", "test"):
        raise ValueError(f"eval_split={eval_split!r}; use 'test' (reported results) or 'val' (model selection)")
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found; build the benchmark first with build_glyph_benchmark()")
    present = json.loads(manifest_path.read_text())["domains"]

    def domain(name: str, split: str) -> DomainConfig:
        return DomainConfig(
            name=name, path=str(root / name), format="folder", splits=str(root / name / "splits.json"),
            split=split, in_domain=name == SOURCE_DOMAIN,
        )  # fmt: skip

    if SOURCE_DOMAIN not in present:
        raise ValueError(f"{root} has no {SOURCE_DOMAIN!r} domain; rebuild it with build_glyph_benchmark()")
    evals = tuple(domain(d, eval_split) for d in DOMAIN_NAMES if d in present)
    return domain(SOURCE_DOMAIN, "train"), evals
