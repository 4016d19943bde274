"""`amt app`: a browser app to classify your own images with PM and AMT side by side, and to attack them.

A person uploads a few images per class (or loads a task of one of the embedded glyph domains), uploads query
images, and sees both models' predictions; then attacks one query at a chosen ℓ∞ radius — each model by its own
white-box attack (:meth:`amt.classify.FewShotClassifier.attack`) — and sees both predictions on the adversarial
images with the perturbations shown magnified. Everything runs locally: Gradio's analytics are off, nothing is
fetched from the internet, the server listens on 127.0.0.1 unless told otherwise.

Gradio is an optional dependency: ``pip install -e '.[app]'``. The page's parts carry ``elem_id``s
(``amt-predictions``, ``amt-attack``, …) so that tests can drive it in a real browser (tests/test_app.py).
"""

from __future__ import annotations

import html
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from amt.classify import FewShotClassifier, Prediction
from amt.config import ConfigError, ExperimentConfig
from amt.data.base import DataError

log = logging.getLogger(__name__)

SLOTS = 5  # class slots on the page (classes with no images are ignored)
SHOWN_PIXELS = 128  # side of the images drawn on the page (nearest-neighbour upscaling of small inputs)


@dataclass
class AppModels:
    """The two classifiers the page compares, built once; ``lock`` serialises their use across page requests."""

    cfg: ExperimentConfig
    models: dict[str, FewShotClassifier]  # "PM", and "AMT" when a pool is given
    lock: threading.Lock

    @classmethod
    def load(cls, cfg: ExperimentConfig, pool: str | None) -> AppModels:
        models = {"PM": FewShotClassifier.from_config(cfg)}
        if pool:
            models["AMT"] = FewShotClassifier.from_config(cfg, pool=pool)
        return cls(cfg, models, threading.Lock())


def support_from_slots(names: Sequence[str | None], files: Sequence[Sequence[str] | None]) -> dict[str, list[str]]:
    """Class name → image paths from the page's slots; a slot without images is skipped, an unnamed one gets
    ``class K``. Raises :class:`DataError` for fewer than two classes or a repeated name."""
    support: dict[str, list[str]] = {}
    for k, (name, paths) in enumerate(zip(names, files, strict=True)):
        if not paths:
            continue
        label = (name or "").strip() or f"class {k + 1}"
        if label in support:
            raise DataError(f"two classes are named {label!r}; give every class its own name")
        support[label] = [str(p) for p in paths]
    if len(support) < 2:
        raise DataError("give images for at least 2 classes (a name and a few images in each slot)")
    return support


def example_task(cfg: ExperimentConfig, domain: str, n_shot: int, n_query: int = 2, seed: int = 0,
                 ) -> tuple[dict[str, list[str]], list[str]]:
    """A ``min(5, classes)``-way task of an embedded glyph domain's test classes as image paths: (support, queries)."""
    from amt.data.episodes import FixedSampler
    from amt.pipeline import domain_dataset, resolve

    cfg = resolve(cfg)
    by_name = {d.name: d for d in cfg.domains}
    if domain not in by_name:
        raise ConfigError(f"unknown domain {domain!r}; the embedded benchmark has {sorted(by_name)}")
    data = domain_dataset(cfg, by_name[domain])
    n_way = min(SLOTS, len(data.class_names))
    sampler = FixedSampler(data.indices_by_class(), n_way, n_shot, n_query, torch.Generator().manual_seed(seed),
                           data.name, data.class_names)
    task = sampler.sample()
    support: dict[str, list[str]] = {}
    for i, y in zip(task.support_indices.tolist(), task.support_labels.tolist(), strict=True):
        support.setdefault(data.class_names[int(task.class_ids[y])], []).append(str(data.samples[i][0]))
    return support, [str(data.samples[i][0]) for i in task.query_indices.tolist()]


def predictions_html(names: Sequence[str], preds: dict[str, Prediction]) -> str:
    """An HTML table, one row per query: its name and each model's label with its probability."""
    head = "".join(f"<th>{html.escape(m)}</th>" for m in preds)
    rows = []
    for q, name in enumerate(names):
        cells = []
        for m, p in preds.items():
            prob = float(p.probs[q].max())
            label = html.escape(p.labels[q])
            cells.append(f'<td class="amt-{m.lower()}" data-label="{label}">{label} ({prob:.2f})</td>')
        rows.append(f'<tr><td>{q + 1}</td><td>{html.escape(Path(name).name)}</td>{"".join(cells)}</tr>')
    return (f'<table id="amt-prediction-table"><thead><tr><th>#</th><th>query</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def shown(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [0, 1] → a PIL image at least :data:`SHOWN_PIXELS` wide (nearest-neighbour)."""
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    out = Image.fromarray(array)
    factor = max(1, SHOWN_PIXELS // max(out.size))
    return out.resize((out.width * factor, out.height * factor), Image.NEAREST) if factor > 1 else out


def magnified(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """A perturbation ``[3, H, W]`` in [−ε, ε] drawn in [0, 1]: grey is 0, black −ε, white +ε (×1/(2ε))."""
    return (0.5 + delta / (2 * eps)).clamp(0, 1)


def attack_one(app: AppModels, support: dict[str, list[str]], query: str, eps: float,
               ) -> tuple[list[tuple[Image.Image, str]], str]:
    """Attack ``query`` against each model at ``eps`` (pixels): gallery items (image, caption) and an HTML table."""
    items: list[tuple[Image.Image, str]] = []
    rows = []
    with app.lock:
        for name, clf in app.models.items():
            clf.fit(support)
            adv, clean, attacked = clf.attack([query], eps)
            x = clf._images([query]).cpu()[0]
            if not items:
                items.append((shown(x), "query"))
            items.append((shown(adv[0]), f"{name}: adversarial → {attacked.labels[0]}"))
            items.append((shown(magnified(adv[0] - x, eps)), f"{name}: perturbation ×{1 / (2 * eps):.0f}"))
            flipped = attacked.labels[0] != clean.labels[0]
            rows.append(f'<tr class="amt-{name.lower()}" data-clean="{html.escape(clean.labels[0])}" '
                        f'data-adversarial="{html.escape(attacked.labels[0])}" data-flipped="{str(flipped).lower()}">'
                        f"<td>{name}</td><td>{html.escape(clean.labels[0])} ({float(clean.probs[0].max()):.2f})</td>"
                        f"<td>{html.escape(attacked.labels[0])} ({float(attacked.probs[0].max()):.2f})</td>"
                        f"<td>{'flipped' if flipped else 'kept'}</td></tr>")
    table = (f'<table id="amt-attack-table"><thead><tr><th>model</th><th>clean</th><th>adversarial '
             f"(ℓ∞ ε = {eps * 255:.1f}/255)</th><th></th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return items, table


def error_html(exc: Exception) -> str:
    return f'<p id="amt-error" style="color:#b00">{html.escape(str(exc))}</p>'


def build_app(app: AppModels, domains: Sequence[str] = ()):
    """The Gradio page (``gradio.Blocks``) over ``app``'s models; ``domains``: embedded glyph domains to try."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as exc:
        raise ConfigError("the browser app needs Gradio: pip install -e '.[app]'") from exc

    def predict(*values):
        names, files, queries = values[:SLOTS], values[SLOTS: 2 * SLOTS], values[2 * SLOTS]
        try:
            support = support_from_slots(names, files)
            if not queries:
                raise DataError("upload at least one query image")
            queries = [str(q) for q in queries]
            with app.lock:
                preds = {m: clf.fit(support).predict(queries) for m, clf in app.models.items()}
        except (DataError, ConfigError, ValueError) as exc:
            return error_html(exc), None, gr.update()
        gallery = [(str(q), f"{i + 1}") for i, q in enumerate(queries)]
        return predictions_html(queries, preds), gallery, {"support": support, "queries": queries}

    def attack(state, index, eps_255):
        if not state:
            return None, error_html(DataError("classify query images first, then attack one"))
        queries = state["queries"]
        k = int(index or 1) - 1
        if not 0 <= k < len(queries):
            return None, error_html(DataError(f"query # must be between 1 and {len(queries)}"))
        try:
            return attack_one(app, state["support"], queries[k], float(eps_255) / 255)
        except (DataError, ValueError) as exc:
            return None, error_html(exc)

    def load_example(domain, n_shot):
        support, queries = example_task(app.cfg, domain, int(n_shot))
        names = list(support) + [""] * (SLOTS - len(support))
        paths = list(support.values()) + [None] * (SLOTS - len(support))
        return (*names, *paths, queries)

    with gr.Blocks(title="amt: robust few-shot classification", analytics_enabled=False) as page:
        gr.Markdown("# amt — few-shot classification, PM and AMT side by side\n"
                    f"Models: {', '.join(app.models)}. Give a few labelled images per class, then query images. "
                    "Everything runs on this machine.")
        if domains:
            with gr.Row():
                domain = gr.Dropdown(list(domains), value=domains[0], label="embedded glyph domain",
                                     elem_id="amt-domain")
                shots = gr.Slider(1, 5, value=1, step=1, label="images per class", elem_id="amt-shots")
                example = gr.Button("Load an example task", elem_id="amt-example")
        names, files = [], []
        with gr.Row():
            for k in range(SLOTS):
                with gr.Column(min_width=150):
                    names.append(gr.Textbox(label=f"class {k + 1}", elem_id=f"amt-name-{k}"))
                    files.append(gr.File(file_count="multiple", file_types=["image"], label="images",
                                         elem_id=f"amt-support-{k}"))
        queries = gr.File(file_count="multiple", file_types=["image"], label="query images", elem_id="amt-queries")
        run = gr.Button("Classify", variant="primary", elem_id="amt-classify")
        result = gr.HTML(elem_id="amt-predictions")
        gallery = gr.Gallery(label="queries", columns=8, height="auto", elem_id="amt-query-gallery")
        state = gr.State()
        gr.Markdown("## Attack one query\nEach model is attacked by its own white-box PGD (ℓ∞, worst case over "
                    "restarts) on the support set above; the perturbation is drawn magnified (grey = 0).")
        with gr.Row():
            index = gr.Number(value=1, precision=0, label="query #", elem_id="amt-query-index")
            eps = gr.Slider(0.5, 32, value=8, step=0.5, label="ε (/255)", elem_id="amt-eps")
            hit = gr.Button("Attack", elem_id="amt-attack-button")
        attacked = gr.HTML(elem_id="amt-attack")
        attack_gallery = gr.Gallery(label="adversarial images", columns=5, height="auto", elem_id="amt-attack-gallery")
        run.click(predict, [*names, *files, queries], [result, gallery, state])
        hit.click(attack, [state, index, eps], [attack_gallery, attacked])
        if domains:
            example.click(load_example, [domain, shots], [*names, *files, queries])
    return page


def serve(cfg: ExperimentConfig, pool: str | None, port: int | None = None, host: str = "127.0.0.1",
          block: bool = True):
    """Build the models and launch the page on ``host:port`` (a free port when None); returns the Gradio app.

    ``block=False`` returns once the server is up (tests); the caller then stops it with ``.close()``.
    """
    from amt.pipeline import resolve

    domains: list[str] = []
    allowed: list[str] = []
    if cfg.benchmark == "glyphs":
        resolved = resolve(cfg)
        domains = [d.name for d in resolved.domains]
        allowed = sorted({str(Path(d.path).parent) for d in resolved.domains})
    page = build_app(AppModels.load(cfg, pool), domains)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                ssr_mode=False, allowed_paths=allowed, footer_links=[])
    return page
