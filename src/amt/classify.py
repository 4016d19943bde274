"""Classify your own images: a few labelled examples per class (the support set), then predictions, class
probabilities and a per-query robustness readout for new images (`amt predict`, the Python API).

Example::

    from amt.classify import FewShotClassifier

    clf = FewShotClassifier.from_config("configs/embedded.yaml", pool="embedded:glyph_pool")
    clf.fit({"cat": ["cat1.png", "cat2.png"], "dog": ["dog1.jpg", "dog2.jpg"]})
    out = clf.predict(["query.png"], robustness=True)
    out.labels, out.probs, out.min_eps   # ["cat"], [1, 2] probabilities, [1] smallest flipping ℓ∞ ε (pixels)

Images may be file paths, PIL images or float tensors ``[3, H, W]`` in [0, 1]; any size or mode is converted to
RGB at the backbone's input size with the evaluation transform. AMT merges (and trims) its pool from the support
set alone; its merge settings are the configuration's untuned defaults, or those an `amt evaluate` run chose for a
domain (``results=``, ``domain=``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from amt.attacks import adversarial_queries, robust_under_pgd
from amt.config import ConfigError, ExperimentConfig, MethodConfig, load_config
from amt.data.base import DataError, Transform, read_rgb
from amt.methods import Method, PoolMethod

log = logging.getLogger(__name__)

ImageLike = str | Path | Image.Image | torch.Tensor


@dataclass
class Prediction:
    """Predictions for Q query images over the support set's N classes."""

    classes: list[str]  # class names, in probability-column order
    labels: list[str]  # predicted class per query
    probs: torch.Tensor  # [Q, N] softmax probabilities at the model's logit scale
    min_eps: torch.Tensor | None = None  # [Q] smallest ℓ∞ radius (pixels) found to flip the prediction; inf: none


def load_image(image: ImageLike, transform: Transform, size: int) -> torch.Tensor:
    """One image as a float tensor ``[3, size, size]`` in [0, 1]; an unreadable file is a :class:`DataError`."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3) or not image.is_floating_point():
            raise DataError(f"a tensor image must be float [3, H, W] (or [1, H, W]) in [0, 1], got "
                            f"{image.dtype} {tuple(image.shape)}")
        if bool(image.min() < 0) or bool(image.max() > 1):
            raise DataError("a tensor image must hold pixels in [0, 1]")
        x = image.expand(3, -1, -1) if image.shape[0] == 1 else image
        return torch.nn.functional.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True,
                                               align_corners=False)[0].clamp(0, 1)
    if isinstance(image, Image.Image):
        return transform(image.convert("RGB"))
    return transform(read_rgb(image, "Give image files (png, jpg, ...)."))


class FewShotClassifier:
    """PM (a backbone) or AMT (a trained pool, merged per support set) as a classifier of your own images."""

    def __init__(self, method: Method, cfg: ExperimentConfig) -> None:
        from amt.data.transforms import build_transform

        self.method, self.cfg = method, cfg
        self.size = cfg.backbone.image_size
        self.transform = build_transform(self.size, cfg.data, cfg.augment, train=False)
        self.classes: list[str] = []
        self.support: torch.Tensor | None = None
        self.support_labels: torch.Tensor | None = None
        self.seed = cfg.eval.seed

    @classmethod
    def from_config(cls, config: str | Path | ExperimentConfig = "configs/embedded.yaml", pool: str | None = None,
                    results: str | Path | None = None, domain: str | None = None, n_shot: int | None = None,
                    ) -> FewShotClassifier:
        """The classifier of ``config``'s backbone: PM, or with ``pool`` (a run directory or ``embedded:NAME``)
        AMT with rule "ttm". ``results`` + ``domain``: use the merge settings an `amt evaluate` run chose for that
        domain (and ``n_shot``, default: the first shot it tuned)."""
        from amt.pipeline import build_methods, resolve_assets, resolve_device

        cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
        row = MethodConfig("AMT", pool=pool, rule="ttm") if pool else MethodConfig("PM")
        cfg = resolve_assets(dataclasses.replace(cfg, methods=(row,)))
        method = build_methods(cfg)[0][row.name]
        method.model.to(resolve_device(cfg.device))
        if results is not None:
            if not isinstance(method, PoolMethod):
                raise ConfigError("merge settings from a results file need a pool (pool=...)")
            method.params = _tuned_params(Path(results), domain, n_shot)
        return cls(method, cfg)

    def _images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        device = next(self.method.model.parameters()).device
        return torch.stack([load_image(im, self.transform, self.size) for im in images]).to(device)

    def fit(self, support: Mapping[str, Sequence[ImageLike]]) -> FewShotClassifier:
        """Remember the support set: class name → its labelled images (at least 2 classes, 1 image each)."""
        empty = [name for name, images in support.items() if len(images) == 0]
        if empty:
            raise DataError(f"class(es) {empty} have no support images; give every class at least one image")
        if len(support) < 2:
            raise DataError(f"a few-shot classifier needs at least 2 classes, got {list(support)}")
        self.classes = list(support)
        self.support = self._images([im for images in support.values() for im in images])
        self.support_labels = torch.tensor([c for c, images in enumerate(support.values()) for _ in images],
                                           device=self.support.device)
        return self

    def predict(self, queries: Sequence[ImageLike], robustness: bool = False, max_eps: float = 32 / 255,
                bisection_steps: int = 6) -> Prediction:
        """Labels and probabilities of ``queries``; with ``robustness``, the smallest ℓ∞ ε (pixels, bisection in
        [0, ``max_eps``]) at which the configuration's attack (worst case over PGD iterates and restarts, at that ε
        with step ε/10) changes the prediction (inf if it does not at ``max_eps``)."""
        if self.support is None:
            raise RuntimeError("call fit(support) before predict")
        if len(queries) == 0:
            raise DataError("no query images to classify")
        x = self._images(queries)
        n_way = len(self.classes)
        generator = torch.Generator().manual_seed(self.seed)
        with self.method.adapt(self.support, self.support_labels, n_way, generator) as (fn, _):
            with torch.no_grad():
                logits = fn(x)
            pred = logits.argmax(-1)
            min_eps = self._min_eps(fn, x, pred, max_eps, bisection_steps) if robustness else None
        return Prediction(list(self.classes), [self.classes[i] for i in pred.tolist()],
                          logits.softmax(-1).cpu(), min_eps)

    def attack(self, queries: Sequence[ImageLike], eps: float) -> tuple[torch.Tensor, Prediction, Prediction]:
        """Attack ``queries`` against this classifier (white box, fitted support set) at ℓ∞ radius ``eps`` (pixels).

        The configuration's attack (PGD, its steps and restarts, step ε/10, CE against the clean prediction) is
        run; per query the first restart that flips the prediction is kept (else the last one).
        Returns (adversarial images ``[Q, 3, S, S]`` in [0, 1] on the CPU, clean prediction, adversarial prediction).
        """
        if self.support is None:
            raise RuntimeError("call fit(support) before attack")
        if not 0 < eps <= 1:
            raise ValueError(f"eps must be in (0, 1] (pixel units; 8/255 = {8 / 255:.4f}), got {eps}")
        x = self._images(queries)
        generator = torch.Generator().manual_seed(self.seed)
        attack = dataclasses.replace(self.cfg.attack, norm="linf", eps=eps, step_size=eps / 10, pyramid=False,
                                     objective="ce")
        with self.method.adapt(self.support, self.support_labels, len(self.classes), generator) as (fn, _):
            with torch.no_grad():
                clean = fn(x)
            pred = clean.argmax(-1)
            adv = x.clone()
            flipped = torch.zeros(len(x), dtype=torch.bool, device=x.device)
            for _ in range(max(1, attack.restarts)):
                x_adv = adversarial_queries(attack, fn, x, labels=pred, generator=generator)
                with torch.no_grad():
                    now = fn(x_adv).argmax(-1) != pred
                take = ~flipped
                adv[take] = x_adv[take]
                flipped |= now
            with torch.no_grad():
                adv_logits = fn(adv)
        return adv.cpu(), self._prediction(clean), self._prediction(adv_logits)

    def _prediction(self, logits: torch.Tensor) -> Prediction:
        return Prediction(list(self.classes), [self.classes[i] for i in logits.argmax(-1).tolist()],
                          logits.softmax(-1).cpu())

    def _min_eps(self, fn, x: torch.Tensor, pred: torch.Tensor, max_eps: float, steps: int) -> torch.Tensor:
        def flips(i: int, eps: float) -> bool:
            attack = dataclasses.replace(self.cfg.attack, norm="linf", eps=eps, step_size=eps / 10, pyramid=False)
            kept = robust_under_pgd(attack, fn, x[i : i + 1], pred[i : i + 1], torch.Generator().manual_seed(i))
            return not bool(kept[0])

        out = torch.full((len(x),), float("inf"))
        for i in range(len(x)):
            if not flips(i, max_eps):
                continue
            lo, hi = 0.0, max_eps
            for _ in range(steps):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if flips(i, mid) else (mid, hi)
            out[i] = hi
        return out


def _tuned_params(results: Path, domain: str | None, n_shot: int | None):
    from amt.merge import MergeParams
    from amt.rundir import read_json

    tuning = read_json(results, "evaluation results").get("tuning", {})
    per_method = next((v for v in tuning.values() if any("chosen" in s for d in v.values() for s in d.values())),
                      None)
    if per_method is None or domain not in per_method:
        known = sorted(per_method) if per_method else []
        raise ConfigError(f"{results} holds no merge settings for domain {domain!r}; tuned domains: {known}")
    shot = str(n_shot) if n_shot is not None else sorted(per_method[domain])[0]
    chosen = per_method[domain][shot]["chosen"]
    return MergeParams(chosen["lambda"], chosen["beta"], chosen["rho"], chosen["trim_group"],
                       chosen.get("adv_weight", 0.0))


def predict_folders(clf: FewShotClassifier, support_dir: str | Path, queries: Sequence[str | Path],
                    robustness: bool = False) -> tuple[list[Path], Prediction]:
    """`amt predict`: fit on ``support_dir`` (one sub-folder of images per class) and classify ``queries``
    (image files, or folders of them)."""
    from amt.config import DomainConfig
    from amt.data.readers import read_folder

    if not Path(support_dir).is_dir():
        raise DataError(f"--support {support_dir}: not a folder; give a folder with one sub-folder of images per "
                        "class")
    exts = {e.lower() for e in clf.cfg.data.extensions}
    listed = read_folder(DomainConfig("support", str(support_dir)), clf.cfg.data, clf.transform)
    support = {c: [p for p, y in listed.samples if y == label] for label, c in enumerate(listed.class_names)}
    files: list[Path] = []
    for q in map(Path, queries):
        if q.is_dir():
            files += sorted(p for p in q.iterdir() if p.is_file() and p.suffix.lower() in exts)
        elif q.is_file():
            files.append(q)
        else:
            raise DataError(f"--query {q}: no such file or folder")
    clf.fit(support)
    return files, clf.predict(files, robustness=robustness)
