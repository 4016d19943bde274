"""Seconds per training episode and per evaluated task at the paper's shapes, for each precision.

The paper's model on synthetic inputs: ViT-S/16 at 128 px (random weights), a pool of P = 4 rank-8 LoRA
members on every qkv/proj/fc1/fc2 (SVD init), 5-way tasks with 15 queries per class.

- ``train_episode_s``: one AMT episode of one member, 5w1s (APQ: PGD-2 with the KL objective at
  ε = 8/255; APSV; loss at the perturbed weights; SGD step) — ``amt.train.training_step``;
- ``task_clean_s[shot]``: one AMT test task — member scores (Algorithm 2), top-2 merge, trimming of every
  layer at ρ = 0.5, clean query accuracy, restore — through ``amt.evaluate.evaluate_task``;
- ``task_pgd_s[shot]``: the same task plus PGD-10 (ℓ∞, ε = 4.5/255, step ε/10) on the queries;
- ``task_clean_breakdown_s``: member scores, merge + trim + support forward, merge + support forward
  (no trim), query forward;
- ``agreement``: per precision, argmax agreement (%) of the clean query predictions with fp32 and the
  largest relative feature difference, on the same tasks (random weights, so a numerical check only).

``--e2e DIR`` also runs the command-line path end to end on the device (``amt train`` of the paper preset's
4-member pool for a few episodes, then ``amt evaluate`` of PM and AMT, clean and PGD-10) on a synthetic
folder dataset written under DIR, and records its wall time.

    .venv/bin/python benchmarks/paper_scale.py --device cpu --precisions fp32,bf16   # CPU
    python3 benchmarks/paper_scale.py --device cuda --precisions fp32,bf16,fp16 --e2e /tmp/e2e  # GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from amt.backbone import Backbone, build_vit, precision_dtype
from amt.config import (
    AttackConfig,
    AugmentConfig,
    EvalConfig,
    LoRAConfig,
    MergeConfig,
    PerturbConfig,
    PoolConfig,
)
from amt.data.episodes import Episode
from amt.evaluate import conditions, evaluate_task
from amt.lora import (
    adapter_parameters,
    inject_lora,
    lora_layers,
    mark_trainable,
    set_active_adapter,
)
from amt.merge import MergeParams
from amt.methods import PoolMethod
from amt.rundir import LoadedPool
from amt.train import member_attack, training_step
from record import write_record

log = logging.getLogger("benchmarks.paper_scale")
NAMES = [f"member{i}" for i in range(4)]
ATTACK = AttackConfig(eps=4.5 / 255, step_size=0.45 / 255, steps=10)  # the paper's evaluation PGD-10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Seconds between successive ``lap()`` calls, with the device's queued work finished."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        sync(device)
        self.last = time.perf_counter()

    def lap(self) -> float:
        sync(self.device)
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


def build(arch: str, image_size: int, device: torch.device) -> Backbone:
    torch.manual_seed(0)
    model = Backbone(build_vit(arch, image_size)).eval()
    inject_lora(model.vit, LoRAConfig().targets, NAMES, rank=8, init="svd")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # members that differ, as after training
        for layer in lora_layers(model).values():
            for name in NAMES:
                layer.lora_B[name].add_(0.01 * torch.randn(layer.lora_B[name].shape, generator=g))
    return model.to(device)


def episode(n_shot: int, n_query: int, image_size: int, seed: int, device: torch.device) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        support_images=torch.rand(5 * n_shot, 3, image_size, image_size, generator=g),
        support_labels=torch.arange(5).repeat_interleave(n_shot),
        query_images=torch.rand(5 * n_query, 3, image_size, image_size, generator=g),
        query_labels=torch.arange(5).repeat_interleave(n_query),
        class_ids=torch.arange(5),
    ).to(device)


def time_training(model: Backbone, image_size: int, episodes: int, device: torch.device) -> float:
    """Mean seconds per AMT training episode of member 0 (after 2 warm-up episodes)."""
    params = mark_trainable(model, ["member0"])
    set_active_adapter(model, "member0")
    scale = torch.nn.Parameter(torch.tensor(10.0, device=device))
    opt = torch.optim.SGD(params + [scale], lr=5e-4, momentum=0.9)
    pool = PoolConfig(eps=(0.01 / 255, 0.1 / 255, 6 / 255, 8 / 255), attack=AttackConfig(steps=2, objective="kl"))
    apsv = adapter_parameters(model, "member0")
    times = []
    for i in range(episodes + 2):
        e = episode(1, 15, image_size, 100 + i, device)
        gen = torch.Generator().manual_seed(i)
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        training_step(model, e, scale, apsv, member_attack(pool, 3, gen), PerturbConfig(), 6.0, gen)
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    for p in params:
        p.requires_grad_(False)
    return float(np.mean(times[2:]))


def time_tasks(model: Backbone, image_size: int, shot: int, tasks: int, device: torch.device) -> dict:
    """Mean seconds per AMT task, clean only and clean + PGD-10; the per-task predictions and features."""
    method = PoolMethod(model, LoadedPool(tuple(NAMES), (10.0,) * len(NAMES)), "ttm", MergeConfig(top_k=2),
                        AugmentConfig())
    method.params = MergeParams(lambda_=0.5, beta=6.0, rho=0.5, trim_group="all")
    conds = conditions(EvalConfig(n_tasks=tasks, adv_tasks=tasks, eps_sweep=(), l2_eps=(), corruptions=()), ATTACK)
    out: dict = {"clean": [], "pgd": [], "pred": [], "feat": []}
    for t in range(tasks + 1):  # task 0 is a warm-up
        e = episode(shot, 15, image_size, 1000 * shot + t, device)
        for kind, cs in (("clean", conds[:1]), ("pgd", conds)):
            sync(device)
            t0 = time.perf_counter()
            with method.adapt(e.support_images, e.support_labels, 5, torch.Generator().manual_seed(t)) as (fn, _):
                evaluate_task(fn, e, cs, 0, 0, {})
                if kind == "clean" and t > 0:
                    with torch.no_grad():
                        out["pred"].append(fn(e.query_images).argmax(-1).cpu())
                        out["feat"].append(model(e.query_images[:8]).float().cpu())
            sync(device)
            if t > 0:
                out[kind].append(time.perf_counter() - t0)
    e = episode(shot, 15, image_size, 999, device)  # where a clean task's time goes (median of 3)
    parts: dict[str, list[float]] = {"scores": [], "query_forward": []}
    for t in range(3):
        clock = Clock(device)
        scores = method.scores(e.support_images, e.support_labels, 5, torch.Generator().manual_seed(t))
        parts["scores"].append(clock.lap())
        for key, params in (("merge_trim_support", method.params), ("merge_support", MergeParams(rho=1.0))):
            with method.adapt_with(e.support_images, e.support_labels, 5, scores, params):
                pass
            parts.setdefault(key, []).append(clock.lap())
        with torch.no_grad():
            model(e.query_images)
        parts["query_forward"].append(clock.lap())
    out["breakdown"] = {k: float(np.median(v)) for k, v in parts.items()}
    return out


def measure(arch: str, image_size: int, device: torch.device, precisions: list[str], episodes: int,
            tasks: int) -> list[dict]:
    model = build(arch, image_size, device)
    runs, reference = [], {}
    for precision in precisions:
        model.autocast_dtype = precision_dtype(precision, device)
        run = {"arch": arch, "image_size": image_size, "precision": precision, "pool": len(NAMES), "rank": 8,
               "train_episode_s": time_training(model, image_size, episodes, device) if precision != "fp16" else None}
        for shot in (1, 5):
            r = time_tasks(model, image_size, shot, tasks, device)
            run[f"task_clean_s_{shot}shot"] = float(np.mean(r["clean"]))
            run[f"task_pgd_s_{shot}shot"] = float(np.mean(r["pgd"]))
            run[f"task_clean_breakdown_s_{shot}shot"] = r["breakdown"]
            if precision == precisions[0]:
                reference[shot] = r
            else:
                ref = reference[shot]
                agree = float(np.mean([float((a == b).float().mean()) for a, b in zip(r["pred"], ref["pred"])]))
                rel = max(float((a - b).norm() / b.norm()) for a, b in zip(r["feat"], ref["feat"]))
                run[f"agreement_vs_{precisions[0]}_{shot}shot"] = {"argmax_pct": 100 * agree,
                                                                    "max_rel_feature_diff": rel}
        log.info("%s", json.dumps(run))
        runs.append(run)
    model.autocast_dtype = None
    return runs


def write_synthetic_folder(root: Path, n_classes: int, per_class: int, size: int, seed: int) -> Path:
    """Folder-per-class JPEGs: class-specific colour plus noise (``amt evaluate`` reads them like real data)."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        d = root / f"c{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        for i in range(per_class):
            px = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(d / f"{i:03d}.jpg", quality=90)
    return root


def end_to_end(out: Path, device: str, precision: str, episodes: int, tasks: int, arch: str, image_size: int) -> dict:
    """``amt train`` (paper preset, 4 members) then ``amt evaluate`` (PM, AMT) on synthetic folders."""
    from amt.cli import main as amt

    data = write_synthetic_folder(out / "data", 30, 25, 146, 0)
    classes = sorted(p.name for p in data.iterdir())
    (out / "splits.json").write_text(json.dumps({"train": classes[:15], "val": classes[15:20], "test": classes[20:]}))
    common = ["--config", "configs/paper/dino_vits16.yaml", "--set", "backbone.checkpoint=null",
              "--set", "backbone.random_init=true",
              "--set", f"backbone.arch={arch}", "--set", f"backbone.image_size={image_size}",
              "--set", f"device={device}", "--set", f"precision={precision}",
              "--set", f"train_domain={{name: syn, path: {data}, format: folder, splits: {out / 'splits.json'}, "
                       "split: train, in_domain: true}",
              "--set", f"domains=[{{name: syn, path: {data}, splits: {out / 'splits.json'}, split: test, "
                       "in_domain: true}]"]
    t0 = time.perf_counter()
    rc = amt(["train", *common, "--out", str(out / "pool"), "--set", "train.epochs=1",
              "--set", f"train.episodes_per_epoch={episodes}", "--set", "train.warmup_epochs=0.2",
              "--set", f"train.val_every={episodes}", "--set", "train.val_tasks=5"])
    train_s = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"amt train failed with exit code {rc}")
    t0 = time.perf_counter()
    rc = amt(["evaluate", *common, "--out", str(out / "eval"), "--set", f"eval.n_tasks={tasks}",
              "--set", f"eval.adv_tasks={tasks}", "--set", "eval.val_tasks=2",
              "--set", "merge.lambda_grid=[0.5]", "--set", "merge.beta_grid=[4.0]", "--set", "merge.rho_grid=[1.0,0.5]",
              "--set", "merge.trim_group_grid=[all]",
              "--set", f"methods=[{{name: PM}}, {{name: AMT, pool: {out / 'pool'}}}]"])
    eval_s = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"amt evaluate failed with exit code {rc}")
    results = json.loads((out / "eval" / "results.json").read_text())
    rows = [{k: r[k] for k in ("method", "n_shot", "condition", "mean", "n_tasks")} for r in results["results"]]
    return {"precision": precision, "device": results["device"], "train_episodes_per_member": episodes,
            "members": 4, "train_s": train_s, "evaluate_s": eval_s, "eval_tasks": tasks, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated, the first is the reference")
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--episodes", type=int, default=10, help="timed training episodes per precision")
    parser.add_argument("--tasks", type=int, default=10, help="timed evaluation tasks per shot and precision")
    parser.add_argument("--e2e", type=Path, help="also run amt train + amt evaluate end to end under this folder")
    parser.add_argument("--only-e2e", action="store_true", help="skip the timings, run only the end-to-end check")
    parser.add_argument("--e2e-precision", default="bf16")
    parser.add_argument("--e2e-episodes", type=int, default=20, help="training episodes per pool member")
    parser.add_argument("--e2e-tasks", type=int, default=10, help="evaluation tasks per shot")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/paper_scale_<device>.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    runs = [] if args.only_e2e else measure(args.arch, args.image_size, device, args.precisions.split(","),
                                             args.episodes, args.tasks)
    for r in runs:
        r["device"] = name
    if args.e2e is not None:
        runs.append({"end_to_end": end_to_end(args.e2e, args.device, args.e2e_precision, args.e2e_episodes,
                                             args.e2e_tasks, args.arch, args.image_size), "device": name})
    slug = "cpu" if device.type == "cpu" else name.split()[-1].lower()
    out = args.out or Path(__file__).parent / "results" / f"paper_scale_{slug}.json"
    write_record("paper_scale", runs, "seconds per training episode and per evaluated task (clean, PGD-10) at the "
                 "paper's shapes; the GPU path end to end", out)


if __name__ == "__main__":
    main()
