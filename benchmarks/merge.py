"""Per-task cost of test-time merging and singular-value trimming against the clean forward of the queries.

For one 5-way 1-shot task with 15 queries per class, a pool of 4 rank-8 members on every qkv/proj/fc1/fc2:

- ``query_forward_s``: the clean forward of the 75 query images (what every method pays to classify);
- ``merge_s``: W' = W_res + Σ ζᵢ BᵢAᵢ (top-2) in every layer and the exact restore;
- ``merge_trim_s[group][method]``: merge + trimming of the layer group (ρ = 0.5) with the Gram-eigh or SVD method;
- ``scores_s``: the member scores of Algorithm 2 (4 forwards of support + 4 pseudo-queries per image);
and their ratios to the query forward. Target: (merge + trim) / query forward ≤ 0.5.

    .venv/bin/python benchmarks/merge.py            # writes benchmarks/results/merge.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from amt.backbone import Backbone, build_vit
from amt.config import AugmentConfig, LoRAConfig, MergeConfig
from amt.lora import inject_lora, lora_layers, merged
from amt.merge import trim_weight, trimmed_layers
from amt.methods import PoolMethod
from amt.rundir import LoadedPool
from record import write_record

log = logging.getLogger("benchmarks.merge")
NAMES = ["member0", "member1", "member2", "member3"]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def measure(arch: str, image_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = Backbone(build_vit(arch, image_size), mean=(0.5,) * 3, std=(0.5,) * 3).eval().requires_grad_(False)
    inject_lora(model.vit, LoRAConfig().targets, NAMES, rank=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # members that differ, as after training
        for layer in lora_layers(model).values():
            for name in NAMES:
                layer.lora_B[name].add_(0.01 * torch.randn(layer.lora_B[name].shape, generator=g))
    queries = torch.rand(75, 3, image_size, image_size, generator=g)
    support = torch.rand(5, 3, image_size, image_size, generator=g)
    labels = torch.arange(5)
    coeffs = {"member0": 0.6, "member2": 0.4}

    def forward():
        with torch.no_grad():
            model(queries)

    def merge_only():
        with merged(model, coeffs):
            pass

    def merge_trim(group: str, method: str):
        def run():
            with merged(model, coeffs):
                for layer in trimmed_layers(model, group).values():
                    layer.weight.copy_(trim_weight(layer.weight, 0.5, method))
        return run

    pool = PoolMethod(model, LoadedPool(tuple(NAMES), (10.0,) * len(NAMES)), "ttm", MergeConfig(),
                      AugmentConfig(pseudo_per_image=4, hflip=False))
    out: dict = {"arch": arch, "image_size": image_size, "n_queries": 75, "pool": len(NAMES), "rank": 8,
                 "lora_layers": len(lora_layers(model)), "trim_rho": 0.5}
    out["query_forward_s"] = timed(forward, repeats)
    out["merge_s"] = timed(merge_only, repeats)
    out["scores_s"] = timed(lambda: pool.scores(support, labels, 5, torch.Generator().manual_seed(0)), repeats)
    out["merge_trim_s"] = {grp: {m: timed(merge_trim(grp, m), max(1, repeats // 2)) for m in ("gram", "svd")}
                           for grp in ("mlp", "attn", "all")}
    q = out["query_forward_s"]
    out["ratio_merge_over_forward"] = out["merge_s"] / q
    out["ratio_merge_trim_over_forward"] = {grp: {m: t / q for m, t in v.items()}
                                            for grp, v in out["merge_trim_s"].items()}
    out["ratio_scores_over_forward"] = out["scores_s"] / q
    log.info("%s", json.dumps(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "merge.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-vit-s", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runs = [measure("amt_glyph_vit", 32, args.repeats)]
    if not args.skip_vit_s:
        runs.append(measure("vit_small_patch16_224", 128, max(1, args.repeats // 2)))
    write_record("merge", runs, "(merge + trim) / query forward <= 0.5", args.out)


if __name__ == "__main__":
    main()
