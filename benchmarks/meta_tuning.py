"""Meta-tuning speed on the embedded default: episodes per second and model FLOP utilisation (MFU).

Runs the real thing — `amt.pipeline.run_train` with `configs/embedded.yaml`'s recipe (glyph benchmark files,
shipped backbone, APQ + APSV) — for one pool member, and counts the FLOPs of one of its episodes with the
formulas of ``torch.utils.flop_counter`` (:class:`train_step.FlopCount`, fused attention off for counting).
MFU = model FLOP/s (LoRA terms counted in their factored form, the fewest FLOPs) ÷ the peak of this
machine, measured here as the FLOP/s of a large fp32 matrix product with the same thread
count (so it is a utilisation of what the CPU can do, not of a datasheet number).

    .venv/bin/python benchmarks/meta_tuning.py   # writes benchmarks/results/meta_tuning.json

"before" and "after" are measured in the same run (alternated rounds, best of each): the LoRA layers' adapter term
computed factored, B (A x) — the code before commit "fold the adapter into the weight" — and folded into the
weight, x (W_res + ΔW)ᵀ (``LoRALinear.fold``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from amt.config import PerturbConfig, load_config
from amt.data.episodes import FixedSampler, load_episode
from amt.lora import lora_layers
from amt.lora_layer import LoRALinear
from amt.pipeline import domain_dataset, resolve, run_train
from amt.train import member_attack, training_step
from record import write_record
from train_step import FlopCount, build, set_fused_attention

log = logging.getLogger("benchmarks.meta_tuning")
ROOT = Path(__file__).resolve().parents[1]


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an fp32 n×n matrix product (the machine's practical peak at this thread count)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def episode_flops(cfg, member: int, fold: bool) -> float:
    """FLOPs of one meta-tuning episode of pool member ``member`` on a real training episode.

    ``fold=False`` counts the model's FLOPs (LoRA terms in the factored form B(Ax), the fewest FLOPs; MFU uses
    this count so that before/after compare the same work); ``fold=True`` counts what the folded forward
    executes (it also forms each adapted layer's full weight gradient in the backward).
    """
    model, params = build(cfg.backbone.arch, cfg.backbone.image_size, cfg.lora.rank)
    set_fused_attention(model, False)
    for layer in lora_layers(model).values():
        layer.fold = fold
    train = domain_dataset(cfg, cfg.train_domain, train=True)
    sampler = FixedSampler(
        train.indices_by_class(),
        cfg.train.n_way,
        cfg.train.n_shot,
        cfg.train.n_query,
        torch.Generator().manual_seed(0),
        train.name,
        train.class_names,
    )
    episode = load_episode(train, sampler.sample())
    g = torch.Generator().manual_seed(0)
    attack = member_attack(cfg.pool, member, g)
    scale = torch.nn.Parameter(torch.tensor(cfg.head.scale))
    with FlopCount() as counter:
        training_step(model, episode, scale, params, attack, PerturbConfig(), cfg.train.lambda_adv, g)
    return float(counter.flops)


def batch_scaling(cfg, batches: tuple[int, ...] = (30, 60, 150), repeats: int = 20) -> dict[str, float]:
    """Milliseconds per image of one forward + backward of the glyph ViT with a LoRA member, per batch size.

    What training the pool's members in one batched forward (5 episodes of 30 images at once) could gain at most
    on the model's share of an episode.
    """
    model, _ = build(cfg.backbone.arch, cfg.backbone.image_size, cfg.lora.rank)
    out = {}
    for b in batches:
        x = torch.rand(
            b, 3, cfg.backbone.image_size, cfg.backbone.image_size, generator=torch.Generator().manual_seed(0)
        )
        for _ in range(3):
            model(x).sum().backward()
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x).sum().backward()
        out[str(b)] = 1000 * (time.perf_counter() - t0) / repeats / b
    return out


def train_speed(cfg, member: int, fold: bool) -> dict:
    """Meta-tune ``member`` for the configured episodes with ``LoRALinear.fold`` set; training seconds and eps/s."""
    LoRALinear.fold = fold
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            manifest = run_train(cfg, tmp, members=[member])
            wall = time.perf_counter() - t0
    finally:
        LoRALinear.fold = True
    done = manifest["members"][0]
    return {
        "episodes": done["episodes"],
        "seconds_training": done["seconds"],
        "seconds_wall": wall,
        "episodes_per_s": done["episodes"] / done["seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="before/after pairs, alternated (the best of each)")
    parser.add_argument("--member", type=int, default=2, help="pool member trained (its ε)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "meta_tuning.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = resolve(load_config(ROOT / "configs" / "embedded.yaml"))
    n = args.episodes
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, episodes_per_epoch=n, val_every=10 * n, checkpoint_every=10 * n)
    )
    flops = episode_flops(cfg, args.member, fold=False)
    peak = matmul_peak()
    variants = (("before: factored LoRA forward", False), ("after: folded LoRA forward", True))
    timings: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.rounds):  # alternated, so that a slow spell of this shared machine hits both
        for _, fold in variants:
            timings[fold].append(train_speed(cfg, args.member, fold))
    runs = []
    for label, fold in variants:
        best = max(timings[fold], key=lambda t: t["episodes_per_s"])
        runs.append(
            {
                "label": label,
                "member": args.member,
                "eps_255": cfg.pool.eps[args.member] * 255,
                **best,
                "episodes_per_s_rounds": [t["episodes_per_s"] for t in timings[fold]],
                "gflops_per_episode": flops / 1e9,
                "gflops_per_episode_executed": episode_flops(cfg, args.member, fold=fold) / 1e9,
                "achieved_gflops_per_s": best["episodes_per_s"] * flops / 1e9,
                "matmul_peak_gflops_per_s": peak / 1e9,
                "mfu": best["episodes_per_s"] * flops / peak,
                "threads": torch.get_num_threads(),
            }
        )
        log.info("%s", json.dumps(runs[-1]))
    speedup = runs[1]["episodes_per_s"] / runs[0]["episodes_per_s"]
    log.info("speed-up (episodes/s, after / before, same run): %.2fx", speedup)
    write_record(
        "meta_tuning",
        runs,
        "episodes/s and MFU of meta-tuning on the embedded default, before/after",
        Path(args.out),
        speedup=speedup,
        ms_per_image_forward_backward_by_batch=batch_scaling(cfg),
    )


if __name__ == "__main__":
    main()
