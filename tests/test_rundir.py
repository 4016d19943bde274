"""The run directory: atomic writes, member files and the checks `load_pool` makes before a pool goes onto a
backbone (fingerprint, every configured member present and finished, the frozen W_res unchanged)."""

from __future__ import annotations

import json

import pytest
import torch

from amt.checkpoints import fingerprint
from amt.config import ConfigError, ExperimentConfig, PoolConfig, to_dict
from amt.lora import adapter_state_dict, inject_lora, lora_layers, residual_fingerprint
from amt.rundir import (
    MEMBER_RECORD_FILE,
    WEIGHTS_FILE,
    atomic_dir,
    atomic_write,
    load_pool,
    member_dir,
    member_tensors,
    save_weights,
    write_json,
    write_manifest,
    write_text,
)

from conftest import gen, tiny_backbone

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
SCALES = (8.5, 11.25)


def _write_pool(run, members=(0, 1), eps=(1 / 255, 4 / 255), residual=True, finished=True):
    """A run directory as `amt train` writes it: trained-looking members with their own logit scales."""
    model = tiny_backbone()
    fp = fingerprint(model.vit)
    cfg = to_dict(ExperimentConfig(pool=PoolConfig(eps=eps)))
    cfg["lora"].update(rank=4, targets=list(TARGETS))
    names = [f"member{i}" for i in range(len(eps))]
    inject_lora(model.vit, TARGETS, names, rank=4)
    header = {"backbone_fingerprint": fp, "mode": "lora", "config": cfg}
    if residual:
        header["residual_fingerprint"] = residual_fingerprint(model.vit)
    g = gen(1)
    for i in members:
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B[names[i]].add_(0.1 * torch.randn(layer.lora_B[names[i]].shape, generator=g))
        out = member_dir(run, i)
        out.mkdir(parents=True)
        save_weights(out / WEIGHTS_FILE, member_tensors(model, names[i], torch.tensor(SCALES[i])), {})
        write_json(out / MEMBER_RECORD_FILE, {"index": i, "name": names[i], "dir": out.name, "finished": finished})
    write_manifest(run, header)
    return model, fp


def test_a_pool_loads_with_its_members_trained_scales_and_factors(tmp_path):
    trained, fp = _write_pool(tmp_path)
    model = tiny_backbone()
    pool = load_pool(model, tmp_path, fp)
    assert pool.names == ("member0", "member1") and pool.scales == SCALES
    for name in pool.names:
        want, got = adapter_state_dict(trained, name), adapter_state_dict(model, name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_pool_with_fewer_members_than_its_configuration_is_refused(tmp_path):
    _, fp = _write_pool(tmp_path, members=(0,))
    with pytest.raises(ConfigError, match=r"member\(s\) \['member1'\] of the 2 in its configuration"):
        load_pool(tiny_backbone(), tmp_path, fp)


def test_an_unfinished_pool_is_refused(tmp_path):
    _, fp = _write_pool(tmp_path, finished=False)
    with pytest.raises(ConfigError, match="--resume"):
        load_pool(tiny_backbone(), tmp_path, fp)


def test_a_pool_on_another_backbone_is_refused(tmp_path):
    _write_pool(tmp_path)
    with pytest.raises(ConfigError, match="trained from backbone"):
        load_pool(tiny_backbone(seed=1), tmp_path, fingerprint(tiny_backbone(seed=1).vit))


def test_a_changed_frozen_residual_is_refused(tmp_path):
    _, fp = _write_pool(tmp_path)
    manifest = json.loads((tmp_path / "pool.json").read_text())
    layer = sorted(manifest["residual_fingerprint"])[3]
    manifest["residual_fingerprint"][layer][0] *= 1.01  # the W_res recomputed at load no longer matches
    write_json(tmp_path / "pool.json", manifest)
    with pytest.raises(ConfigError, match=layer.replace(".", r"\.")):
        load_pool(tiny_backbone(), tmp_path, fp)


def test_a_pool_without_a_residual_fingerprint_loads_with_a_warning(tmp_path, caplog):
    _, fp = _write_pool(tmp_path, residual=False)
    assert load_pool(tiny_backbone(), tmp_path, fp).names == ("member0", "member1")
    assert "cannot check" in caplog.text


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "results.json"
    write_text(path, "old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and len(list(tmp_path.iterdir())) == 1


def test_atomic_dir_replaces_the_folder_only_when_filling_it_succeeds(tmp_path):
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_dir(dest) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("disk full")
    assert [p.name for p in dest.iterdir()] == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["export"]
    with atomic_dir(dest) as tmp:
        assert not any(tmp.iterdir())
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in dest.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["export"]


class _Payload:
    """A pickled object that is not a tensor or plain value (what a malicious state.pt would hold)."""


def test_damaged_files_are_named_and_never_loaded_unsafely(tmp_path):
    from amt.rundir import load_state, load_weights, save_state

    _, fp = _write_pool(tmp_path)
    weights = tmp_path / "member1" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ConfigError, match=str(weights)):
        load_pool(tiny_backbone(), tmp_path, fp)
    for text in ("", '{"members": ['):  # empty, truncated
        (tmp_path / "pool.json").write_text(text)
        with pytest.raises(ConfigError, match=r"pool\.json: the pool manifest cannot be read"):
            load_pool(tiny_backbone(), tmp_path, fp)
    state = tmp_path / "state.pt"
    torch.save({"episode": 3, "payload": _Payload()}, state)
    with pytest.raises(ConfigError, match="refused") as info:
        load_state(state)
    assert str(state) in str(info.value) and "weights_only" not in str(info.value)
    save_state(state, {"episode": 3, "weights": {"a": torch.ones(2)}})
    assert load_state(state)["episode"] == 3
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(ConfigError, match="cannot be read"):
        load_state(state)
    model = tiny_backbone()
    inject_lora(model.vit, TARGETS, ["member0"], rank=4)
    nan = member_tensors(model, "member0", torch.tensor(10.0))
    next(v for k, v in nan.items() if "lora_A" in k).view(-1)[0] = float("nan")
    save_weights(tmp_path / "nan.safetensors", nan, {})
    with pytest.raises(ConfigError, match="NaN or infinite"):
        load_weights(model, "member0", tmp_path / "nan.safetensors")


def test_a_run_directory_has_one_writer_and_a_dead_holders_lock_is_taken_over(tmp_path):
    import subprocess
    import sys
    import time

    from amt.rundir import LOCK_FILE, run_lock

    code = ("import sys, time; from amt.rundir import run_lock\n"
            "with run_lock(sys.argv[1], 'amt train'):\n    print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by process {holder.pid} on .*amt train"), \
                run_lock(tmp_path, "amt evaluate"):
            pass
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # the holder's lock is intact
    finally:
        holder.kill()  # dies without releasing: a stale lock
        holder.wait()
    assert (tmp_path / LOCK_FILE).exists()
    start = time.perf_counter()
    with run_lock(tmp_path, "amt evaluate"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] != holder.pid
    assert not (tmp_path / LOCK_FILE).exists() and time.perf_counter() - start < 5
