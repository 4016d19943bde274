"""Meta-tuning speed on the embedded default: episodes per second and model FLOP utilisation (MFU).

Runs the real thing — `amt.pipeline.run_train` with `configs/embedded.yaml`'s recipe (glyph benchmark files,
shipped backbone, APQ + APSV) — for one pool member, and counts the FLOPs of one of its episodes with the
formulas of ``torch.utils.flop_counter`` (:class:`train_step.FlopCount`, fused attention off for counting).
MFU = achieved FLOP/s ÷ the peak of this machine, measured here as the FLOP/s of a large fp32 matrix product
with the same thread count (so it is a utilisation of what the CPU can do, not of a datasheet number).

    .venv/bin/python benchmarks/meta_tuning.py --label before   # writes benchmarks/results/meta_tuning.json
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


def episode_flops(cfg, member: int) -> float:
    """FLOPs of one meta-tuning episode of pool member ``member`` on a real training episode."""
    model, params = build(cfg.backbone.arch, cfg.backbone.image_size, cfg.lora.rank)
    set_fused_attention(model, False)
    train = domain_dataset(cfg, cfg.train_domain, train=True)
    sampler = FixedSampler(train.indices_by_class(), cfg.train.n_way, cfg.train.n_shot, cfg.train.n_query,
                           torch.Generator().manual_seed(0), train.name, train.class_names)
    episode = load_episode(train, sampler.sample())
    g = torch.Generator().manual_seed(0)
    attack = member_attack(cfg.pool, member, g)
    scale = torch.nn.Parameter(torch.tensor(cfg.head.scale))
    with FlopCount() as counter:
        training_step(model, episode, scale, params, attack, PerturbConfig(), cfg.train.lambda_adv, g)
    return float(counter.flops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="current", help="name of this measurement (e.g. before / after)")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--member", type=int, default=2, help="pool member trained (its ε)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "meta_tuning.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = resolve(load_config(ROOT / "configs" / "embedded.yaml"))
    n = args.episodes
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, episodes_per_epoch=n, val_every=10 * n,
                                                             checkpoint_every=10 * n))
    flops = episode_flops(cfg, args.member)
    peak = matmul_peak()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = run_train(cfg, tmp, members=[args.member])
        wall = time.perf_counter() - t0
    member = manifest["members"][0]
    eps_per_s = member["episodes"] / member["seconds"]
    run = {"label": args.label, "member": args.member, "eps_255": cfg.pool.eps[args.member] * 255,
           "episodes": member["episodes"], "seconds_training": member["seconds"], "seconds_wall": wall,
           "episodes_per_s": eps_per_s, "gflops_per_episode": flops / 1e9,
           "achieved_gflops_per_s": eps_per_s * flops / 1e9, "matmul_peak_gflops_per_s": peak / 1e9,
           "mfu": eps_per_s * flops / peak, "threads": torch.get_num_threads()}
    log.info("%s", json.dumps(run))
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.is_file() else []
    runs = [r for r in runs if r.get("label") != args.label] + [run]
    write_record("meta_tuning", runs, "episodes/s and MFU of meta-tuning on the embedded default, before/after", out)


if __name__ == "__main__":
    main()
