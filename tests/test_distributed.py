"""2 CPU processes (gloo) against one: data-parallel meta-tuning trains the same weights as one process
averaging the same episodes; sharded evaluation gives the same numbers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.multiprocessing as mp

from amt.config import HeadConfig, PerturbConfig
from amt.distributed import close_distributed
from amt.lora import adapter_state_dict
from amt.train import MemberSpec, MetaTuning, train_member

import test_train as tt
from conftest import write_image_folder


def _train(model, data, out, world_rank=None):
    cfg = dataclasses.replace(tt.TINY, episodes_per_step=2, keep="last")
    spec = MemberSpec(0, "member0", Path(out))
    train_member(model, spec, data[0], data[1], MetaTuning(cfg, tt.POOL, PerturbConfig(), HeadConfig()))
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
        close_distributed()


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


# ---- sharded evaluation ----------------------------------------------------------------------


def _eval_run(root: str) -> dict:
    """PM, an AMT pool (merge parameters tuned on validation tasks) and PM+FT (lr tuned), clean + PGD +
    one corruption, on 5 tasks: an odd count, so the two ranks get different numbers of tasks."""
    from amt.config import (
        AttackConfig,
        AugmentConfig,
        DataConfig,
        DomainConfig,
        EvalConfig,
        FinetuneConfig,
        MergeConfig,
    )
    from amt.data.domains import load_domain
    from amt.data.transforms import build_transform
    from amt.evaluate import evaluate
    from amt.lora import lora_layers
    from amt.methods import BackboneMethod, FinetunedMethod, PoolMethod
    from amt.rundir import LoadedPool

    names = ("member0", "member1", "member2")
    pool_model = tt._model(names)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # members that differ
        for layer in lora_layers(pool_model).values():
            for n in names:
                layer.lora_B[n].add_(0.05 * torch.randn(layer.lora_B[n].shape, generator=g))
    merge = MergeConfig(lambda_grid=(0.0, 1.0), beta_grid=(4.0,), rho_grid=(1.0, 0.5), trim_group_grid=("mlp",))
    augment = AugmentConfig(pseudo_per_image=2, hflip=False)
    methods = {"PM": BackboneMethod(tt._model(()), 10.0),
               "AMT": PoolMethod(pool_model, LoadedPool(names, (9.0, 10.0, 11.0)), "ttm", merge, augment),
               "PM+FT": FinetunedMethod(BackboneMethod(tt._model(()), 10.0),
                                        FinetuneConfig(steps=2, lr_grid=(0.0, 0.01)), augment)}
    domain = DomainConfig(name="d", path=root)
    data = DataConfig(resize_ratio=1.0)
    dataset = load_domain(domain, data, build_transform(tt.SIZE, data, augment, train=False))
    cfg = EvalConfig(n_tasks=5, shots=(1,), n_query=3, adv_tasks=3, eps_sweep=(), l2_eps=(),
                     corruptions=("gaussian_noise",), severities=(2,), corruption_tasks=4, val_tasks=3)
    attack = AttackConfig(eps=8 / 255, step_size=2 / 255, steps=3)
    out = evaluate(methods, [(domain, dataset)], cfg, attack)  # no validation classes: held-out images
    out.pop("seconds")
    return json.loads(json.dumps(out))  # as written to results.json


def _eval_worker(rank: int, store: str, root: str, result: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        out = _eval_run(root)
        Path(f"{result}.{rank}").write_text(json.dumps(out))
    finally:
        close_distributed()


def test_two_gloo_processes_evaluate_the_same_numbers_as_one(tmp_path):
    root = str(write_image_folder(tmp_path / "data", n_classes=6, per_class=6, size=tt.SIZE))
    single = _eval_run(root)
    result = str(tmp_path / "eval.json")
    mp.spawn(_eval_worker, args=(str(tmp_path / "store"), root, result), nprocs=2)
    for rank in (0, 1):  # every rank ends with the full, identical results
        sharded = json.loads(Path(f"{result}.{rank}").read_text())
        assert sharded == single
    rows = {(r["method"], r["condition"]): r for r in single["results"]}
    assert len(rows[("AMT", "clean")]["accuracies"]) == 5 and len(rows[("AMT", "adversarial")]["accuracies"]) == 3
    assert len(rows[("PM+FT", "corruption")]["accuracies"]) == 4
    assert "chosen" in single["tuning"]["AMT"]["d"]["1"] and "finetune" in single["tuning"]["PM+FT"]["d"]["1"]
    assert len(single["tuning"]["AMT"]["d"]["1"]["coefficients"]) == 5
