"""Singular-value trimming of every merged layer of ViT-S/16 (48 layers, ρ = 0.5): which way is fastest where.

Per variant, the seconds to trim all 48 merged weights once (median of ``--repeats``), and the largest
relative difference from the float64 SVD reference:

- ``gram_loop``: one float64 Gram ``eigh`` per layer (the implementation before batching);
- ``gram``, ``svd``: ``amt.merge.trim_weight`` on the layers stacked by shape (4 calls): the float64 Gram
  eigendecomposition on the weights' device, or the exact SVD;
- ``gram_cpu``: the batched Gram computed on the device, its eigendecomposition on the host CPU.

    .venv/bin/python benchmarks/trim.py --device cpu     # writes benchmarks/results/trim_cpu.json
    python3 benchmarks/trim.py --device cuda              # on a GPU machine
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from amt.merge import trim_weight
from record import write_record

log = logging.getLogger("benchmarks.trim")
# ViT-S/16: per block qkv [1152, 384], proj [384, 384], fc1 [1536, 384], fc2 [384, 1536]
SHAPES = [(1152, 384), (384, 384), (1536, 384), (384, 1536)] * 12


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(s, generator=g) / s[1] ** 0.5).to(device) for s in SHAPES]
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault(tuple(w.shape), []).append(i)
    stacks = {s: torch.stack([weights[i] for i in idx]) for s, idx in groups.items()}
    reference = [trim_weight(w.cpu(), args.rho, "svd") for w in weights]

    def batched(method):
        def run():
            out = [None] * len(weights)
            for s, idx in groups.items():
                for i, t in zip(idx, trim_weight(stacks[s], args.rho, method)):
                    out[i] = t
            return out
        return run

    def gram_cpu():
        out = [None] * len(weights)
        for s, idx in groups.items():
            wide = s[0] < s[1]
            w = (stacks[s].mT if wide else stacks[s]).double()
            vecs = torch.linalg.eigh((w.mT @ w).cpu())[1][..., -math.ceil(args.rho * w.shape[-1]):].to(device)
            low = (w @ vecs) @ vecs.mT
            for i, t in zip(idx, (low.mT if wide else low).float()):
                out[i] = t
        return out

    variants = {"gram_loop": lambda: [trim_weight(w, args.rho, "gram") for w in weights],
                "gram": batched("gram"), "gram_cpu": gram_cpu, "svd": batched("svd")}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    runs = []
    for variant, fn in variants.items():
        seconds = median_seconds(fn, device, args.repeats)
        err = max(float((a.cpu() - b).norm() / b.norm()) for a, b in zip(fn(), reference))
        runs.append({"variant": variant, "device": name, "layers": len(weights), "rho": args.rho,
                     "seconds": seconds, "max_rel_diff_vs_svd": err})
        log.info("%-10s %8.4f s  rel diff %.1e", variant, seconds, err)
    slug = "cpu" if device.type == "cpu" else name.split()[-1].lower()
    out = args.out or Path(__file__).parent / "results" / f"trim_{slug}.json"
    write_record("trim", runs, "fastest exact trimming of the 48 merged ViT-S layers per task", out)


if __name__ == "__main__":
    main()
