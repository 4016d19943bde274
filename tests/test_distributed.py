"""Data-parallel meta-tuning with 2 CPU processes (gloo) equals one process averaging the same episodes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.multiprocessing as mp

from amt.config import HeadConfig, PerturbConfig
from amt.lora import adapter_state_dict
from amt.train import MemberSpec, train_member

import test_train as tt


def _train(model, data, out, world_rank=None):
    cfg = dataclasses.replace(tt.TINY, episodes_per_step=2, keep="last")
    spec = MemberSpec(0, "member0", Path(out))
    train_member(model, spec, data[0], data[1], cfg, tt.POOL, PerturbConfig(), HeadConfig())
    return adapter_state_dict(model, "member0")


def _worker(rank: int, store: str, root: str, out: str, result: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        data = tt.load_data(root)
        state = _train(tt._model(), data, out)
        if rank == 0:
            torch.save(state, result)
    finally:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_train_the_same_weights_as_one(tmp_path):
    root = tt.write_data(tmp_path / "data")
    single = _train(tt._model(), tt.load_data(root), tmp_path / "single")
    result = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(root), str(tmp_path / "ddp"), str(result)), nprocs=2)
    ddp = torch.load(result, weights_only=True)
    assert single.keys() == ddp.keys()
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=1e-6, rtol=1e-5)
    assert (tmp_path / "ddp" / "weights.safetensors").is_file()
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == tt.TINY.episodes_per_epoch  # written once, by rank 0
