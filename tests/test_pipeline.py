"""End to end through the `amt` command: real glyph benchmark files, the shipped backbone, results on disk."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from amt.backbone import Backbone, build_vit
from amt.checkpoints import fingerprint, load_checkpoint
from amt.cli import main
from amt.config import AugmentConfig, ConfigError, DataConfig, DomainConfig, MethodConfig, PretrainConfig
from amt.data.domains import load_domain
from amt.data.transforms import build_transform
from amt.pipeline import embedded_asset
from amt.pretrain import pretrain
from amt.rundir import MANIFEST_FILE

from conftest import write_image_folder

TRAIN = ["--set", "train.episodes_per_epoch=4", "--set", "train.warmup_epochs=0.5", "--set", "train.val_every=2",
         "--set", "train.val_tasks=2", "--set", "train.n_query=2", "--set", "train.checkpoint_every=2",
         "--set", "pool.eps=[0.004, 0.03]"]
SMALL = ["--set", "glyphs.max_source_classes=40", "--set", "glyphs.max_classes_per_domain=34",
         "--set", "glyphs.samples_per_class=8", "--set", "eval.n_tasks=3", "--set", "eval.n_query=3",
         "--set", "eval.adv_tasks=2", "--set", "eval.sweep_tasks=1", "--set", "eval.eps_sweep=[0.03]",
         "--set", "eval.l2_eps=[0.5]", "--set", "eval.corruption_tasks=1", "--set", "eval.val_tasks=2",
         "--set", "eval.corruptions=[gaussian_noise, fog]", "--set", "eval.severities=[1, 5]",
         "--set", "merge.lambda_grid=[0.5]", "--set", "merge.beta_grid=[6]", "--set", "merge.rho_grid=[1.0, 0.5]",
         "--set", "merge.trim_group_grid=[mlp]", "--set", "augment.pseudo_per_image=1",
         "--set", "autoattack.steps=2", "--set", "masking.many_steps=6", "--set", "masking.square_queries=5",
         "--set", "attack.steps=3"]


def test_shipped_backbone_loads_strictly_and_matches_its_record():
    info = json.loads(embedded_asset("glyph_vit.json").read_text())
    vit = build_vit(info["arch"], info["image_size"])
    load_checkpoint(vit, embedded_asset("glyph_vit.safetensors"))
    assert fingerprint(vit) == info["fingerprint"]
    assert "amt pretrain" in info["command"]
    keys = load_file(str(embedded_asset("glyph_vit.safetensors")))
    assert any(k.endswith("attn.qkv.weight") for k in keys) and any(k.endswith("mlp.fc2.weight") for k in keys)


def test_demo_end_to_end_writes_results_config_and_table(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["demo", "--out", str(out), "--set", f"cache_dir={tmp_path / 'cache'}", *SMALL, *TRAIN,
            "--set", "demo.train_episodes=4", "--set", "demo.train_member=0"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    domains = {r["domain"] for r in results["results"]}
    assert len(domains) >= 5 and {r["n_shot"] for r in results["results"]} == {1, 5}
    expected = {"clean": 3, "adversarial": 2, "corruption": 1, "autoattack": 1, "gradient": 1}
    for r in results["results"]:
        n = 1 if r["condition"] == "adversarial" and not r["attack"]["headline"] else expected[r["condition"]]
        assert len(r["accuracies"]) == n == r["n_tasks"], r
    assert {r["method"] for r in results["results"]} == {"PM", "AMT"}
    conditions = {(r["condition"], (r.get("corruption") or {}).get("name")) for r in results["results"]}
    assert conditions == {("clean", None), ("adversarial", None), ("corruption", "gaussian_noise"),
                          ("corruption", "fog"), ("autoattack", None), ("gradient", None)}
    assert {r["method"] for r in results["results"] if r["condition"] == "autoattack"} == {"PM", "AMT"}
    headline = next(r for r in results["results"] if r["condition"] == "adversarial" and r["attack"]["headline"])
    assert headline["attack"]["restarts"] == 2 and headline["attack"]["eps"] == pytest.approx(8 / 255, rel=1e-4)
    assert set(results["masking"]) == {"PM", "AMT"}  # every method is checked
    assert all(set(info["flags"]) >= {"rises_with_eps", "zero_gradients"} for per in results["masking"].values()
               for per_shot in per.values() for info in per_shot.values())
    tuning = results["tuning"]["AMT"]["latin"]
    assert set(tuning) == {"1", "5"}  # tuned per shot
    assert tuning["1"]["validation_tasks"] == "validation classes" and set(tuning["1"]["chosen"]) >= {"lambda", "rho"}
    shipped = json.loads((embedded_asset("glyph_pool") / MANIFEST_FILE).read_text())
    n_members = len(shipped["members"])
    assert all(abs(sum(z) - 1) < 1e-5 and len(z) == n_members for z in tuning["1"]["coefficients"])
    assert len(tuning["5"]["coefficients"]) == 3
    assert (out / "report" / "report.md").is_file() and (out / "report" / "accuracy_vs_eps.png").is_file()
    assert (out / "config.yaml").is_file() and "amt_glyph_vit" in (out / "config.yaml").read_text()
    printed = capsys.readouterr().out
    assert "AMT" in printed and "PGD" in printed
    assert "| Δ AMT − PM | 5w1s |" in printed and "AA OOD" in printed  # paired differences in the main table
    # the short meta-tuning run: one member of the recipe, trained and validated; the shipped pool's table too
    assert "a short run of member 0" in printed and "The evaluated AMT pool" in printed
    short = json.loads((out / "short_run" / "pool.json").read_text())
    assert [m["index"] for m in short["members"]] == [0] and short["members"][0]["finished"]
    assert short["members"][0]["episodes"] == 4 and short["members"][0]["best"]["val_acc"] > 20
    (out / "report" / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report" / "report.md").is_file()  # from results.json alone
    assert main(["report", str(tmp_path / "nothing")]) == 2
    layers = results["spectra"]["AMT"]["layers"]  # fc1, fc2 and proj of every block, top-k descending
    assert {(v["block"], v["kind"]) for v in layers.values()} == {
        (b, k) for b in range(len(layers) // 3) for k in ("mlp.fc1", "mlp.fc2", "attn.proj")}
    assert all(a >= b for v in layers.values() for sv in (v["tuned"], v["pretrained"]) for a, b in zip(sv, sv[1:]))
    assert all(v["tuned"] == v["pretrained"] for v in results["spectra"]["PM"]["layers"].values())
    # a failed run into the same directory leaves the earlier results untouched
    before = (out / "results.json").read_bytes()
    rc = main(["evaluate", "--out", str(out), "--set", "benchmark=custom",
               "--set", f"domains=[{{name: x, path: {tmp_path / 'missing'}}}]"])
    assert rc == 2 and (out / "results.json").read_bytes() == before


def test_demo_without_a_shipped_pool_meta_tunes_the_whole_pool_and_reuses_it(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["demo", "--out", str(out), "--set", f"cache_dir={tmp_path / 'cache'}", *SMALL, *TRAIN,
            "--set", "demo.pool=null", "--set", "glyphs.eval_domains=[latin, greek]", "--set", "eval.shots=[1]",
            "--set", "autoattack.version=none", "--set", "masking.n_tasks=0", "--set", "eval.corruptions=[]"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Meta-tuning the AMT pool" in printed
    assert "| member1 | 7.65 |" in printed and "| member0 | 1.02 |" in printed
    pool = json.loads((out / "amt" / "pool.json").read_text())
    assert len(pool["members"]) == 2 and all(m["finished"] for m in pool["members"])
    results = json.loads((out / "results.json").read_text())
    assert all(len(z) == 2 for z in results["tuning"]["AMT"]["latin"]["1"]["coefficients"])
    weights = (out / "amt" / "member1" / "weights.safetensors").read_bytes()
    # a second run with the same settings reuses the finished pool
    assert main(["train", "--out", str(out / "amt"), "--resume", *args[3:]]) == 0
    assert (out / "amt" / "member1" / "weights.safetensors").read_bytes() == weights


def test_shipped_pool_loads_onto_the_shipped_backbone_and_matches_its_export_record():
    from amt.config import load_config
    from amt.pipeline import build_methods, resolve
    from amt.rundir import check_export

    path = embedded_asset("glyph_pool")
    check_export(path)  # every file with its recorded sha256
    record = json.loads((path / "export.json").read_text())
    assert "amt export-pool" in record["command"] and not any(f.endswith("state.pt") for f in record["files"])
    cfg = load_config("configs/embedded.yaml")
    assert cfg.demo.pool == "embedded:glyph_pool"
    cfg = resolve(dataclasses.replace(cfg, benchmark="custom", domains=(DomainConfig("x", "."),),
                                      methods=(MethodConfig("AMT", pool=cfg.demo.pool),)))
    methods, _ = build_methods(cfg)  # backbone and W_res fingerprints checked, every member loaded strictly
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert methods["AMT"].pool_names == tuple(m["name"] for m in manifest["members"])
    assert len(manifest["members"]) == len(manifest["config"]["pool"]["eps"]) >= 4


def test_a_damaged_export_is_refused_naming_the_file(tmp_path):
    import shutil

    from amt.rundir import check_export

    copy = tmp_path / "pool"
    shutil.copytree(embedded_asset("glyph_pool"), copy)
    check_export(copy)
    weights = copy / "member1" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ConfigError, match="member1/weights.safetensors"):
        check_export(copy)


def test_shipped_backbone_is_far_above_random_init(tmp_path):
    """Few-shot accuracy of the shipped backbone vs the same architecture at random init, on colour-free data:
    Greek glyph test classes through the embedded pipeline's loaders."""
    from amt.config import EvalConfig, GlyphConfig
    from amt.data.glyphs import build_glyph_benchmark, glyph_domains
    from amt.evaluate import evaluate
    from amt.methods import BackboneMethod

    root = build_glyph_benchmark(GlyphConfig(max_source_classes=14, max_classes_per_domain=12), tmp_path)
    _, domains = glyph_domains(root)
    greek = [d for d in domains if d.name == "greek"][0]
    data = DataConfig(resize_ratio=1.0)
    ds = load_domain(greek, data, build_transform(32, data, AugmentConfig(), train=False))
    info = json.loads(embedded_asset("glyph_vit.json").read_text())
    trained = Backbone(build_vit("amt_glyph_vit", 32), info["mean"], info["std"])
    load_checkpoint(trained.vit, embedded_asset("glyph_vit.safetensors"))
    torch.manual_seed(0)
    random = Backbone(build_vit("amt_glyph_vit", 32), info["mean"], info["std"])
    res = evaluate({"trained": BackboneMethod(trained, 10.0), "random": BackboneMethod(random, 10.0)},
                   [(greek, ds)], EvalConfig(n_tasks=20, shots=(1,), n_query=5, corruptions=()))
    acc = {r["method"]: r["mean"] for r in res["results"]}
    assert acc["trained"] > acc["random"] + 20.0


def test_pretraining_learns_the_training_classes(tmp_path):
    root = write_image_folder(tmp_path / "d", 6, 10, size=32)
    data = DataConfig(crop_scale=(0.8, 1.0))
    ds = load_domain(DomainConfig("d", str(root)), data, build_transform(32, data, AugmentConfig(hflip=False), True))
    torch.manual_seed(0)
    backbone = Backbone(build_vit("vit_tiny_test", 32))
    metrics = pretrain(backbone, ds, PretrainConfig(steps=60, batch_size=16, warmup_steps=5, lr=1e-3), 48)
    assert metrics["final_train_acc"] > 50.0  # chance: 16.7% and backbone.training is False


def test_bad_config_key_is_a_clear_cli_error(tmp_path, caplog):
    assert main(["evaluate", "--out", str(tmp_path / "o"), "--set", "eval.n_taks=3"]) == 2
    assert "n_taks" in caplog.text and "valid keys" in caplog.text



def test_train_cli_writes_a_pool_that_resumes_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "pool"
    common = ["--out", str(out), "--set", f"cache_dir={tmp_path / 'cache'}", *SMALL, *TRAIN]
    assert main(["train", *common, "--stop-after", "2"]) == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert [m["episodes"] for m in manifest["members"]] == [2, 2] and not manifest["members"][0]["finished"]
    assert main(["train", *common]) == 2  # a state exists: needs --resume, nothing overwritten
    assert main(["train", *common, "--resume"]) == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert [m["attack"]["eps"] for m in manifest["members"]] == [0.004, 0.03]
    assert all(m["finished"] and m["episodes"] == 4 for m in manifest["members"])
    assert manifest["backbone_fingerprint"] == json.loads(embedded_asset("glyph_vit.json").read_text())["fingerprint"]
    for i in range(2):
        lines = (out / f"member{i}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["episode"] for x in lines] == [1, 2, 3, 4]
        keys = load_file(str(out / f"member{i}" / "weights.safetensors"))
        assert "head.scale" in keys and any(k.endswith("attn.qkv.lora_A") for k in keys)
    printed = capsys.readouterr().out
    assert "| member1 | 7.65 | 4 |" in printed  # 0.03 × 255, 3 significant digits
    assert main(["train", *common, "--member", "7"]) == 2

    clean = tmp_path / "clean"
    assert main(["train", "--variant", "clean_lora", "--out", str(clean), *common[2:]]) == 0
    manifest = json.loads((clean / MANIFEST_FILE).read_text())
    assert len(manifest["members"]) == 1 and manifest["members"][0]["attack"] is None
    assert manifest["config"]["train"]["apq"] is False and manifest["config"]["train"]["apsv"] is False


def test_pmf_trains_the_full_backbone_and_evaluates_as_a_row(tmp_path):
    common = ["--set", f"cache_dir={tmp_path / 'cache'}", *SMALL, *TRAIN, "--set", "eval.shots=[1]",
              "--set", "eval.corruptions=[]", "--set", "eval.adversarial=false"]
    assert main(["train", "--variant", "pmf", "--out", str(tmp_path / "pmf"), *common]) == 0
    keys = load_file(str(tmp_path / "pmf" / "member0" / "weights.safetensors"))
    assert any(k.startswith("backbone.") for k in keys) and not any(k.startswith("lora.") for k in keys)
    methods = f"methods=[{{name: PM}}, {{name: PMF, pool: {tmp_path / 'pmf'}}}]"
    assert main(["evaluate", "--out", str(tmp_path / "ev"), *common, "--set", methods]) == 0
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())["results"]
    pm = [r["accuracies"] for r in rows if r["method"] == "PM"]
    pmf = [r["accuracies"] for r in rows if r["method"] == "PMF"]
    assert len(pm) == len(pmf) == 5  # five domains, clean only


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error(tmp_path, caplog):
    from amt.pipeline import resolve_device

    assert resolve_device("auto").type == "cpu" and resolve_device("cpu").type == "cpu"
    assert main(["evaluate", "--out", str(tmp_path / "o"), "--set", f"cache_dir={tmp_path / 'cache'}", *SMALL,
                 "--set", "device=cuda"]) == 2
    assert "CUDA is not available" in caplog.text and not (tmp_path / "o" / "results.json").exists()


def test_bad_settings_and_unwritable_output_fail_before_any_work_or_litter(tmp_path, caplog):
    out = tmp_path / "pool"
    common = ["--set", f"cache_dir={tmp_path / 'cache'}", *SMALL, *TRAIN]
    assert main(["train", "--out", str(out), *common, "--set", "pool.eps=[-0.01, 0.03]"]) == 2
    assert "pool.eps holds [-0.01]" in caplog.text and not out.exists()  # no config.yaml, no member0/
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["evaluate", "--out", str(blocker / "run"), *common]) == 2
    assert "cannot write into" in caplog.text and "choose a writable --out" in caplog.text


def _default_sigint() -> None:
    """In the child before exec: Ctrl-C's default action, even when this test runs as a background job (whose
    shell starts it with SIGINT ignored, which Python would then keep ignoring)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_second_writer_is_refused_and_ctrl_c_checkpoints_training(tmp_path, caplog):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "pool"
    common = ["--set", f"cache_dir={tmp_path / 'cache'}", *SMALL, *TRAIN, "--set", "train.episodes_per_epoch=400",
              "--set", "train.val_every=400", "--set", "train.checkpoint_every=1000"]
    train = subprocess.Popen([sys.executable, "-m", "amt.cli", "train", "--out", str(out), *common],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"RANK": "0"},
                             preexec_fn=_default_sigint)
    metrics = out / "member0" / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.2)
        assert metrics.exists(), train.stderr.read() if train.poll() is not None else "no training started"
        assert main(["train", "--out", str(out), *common, "--resume"]) == 2  # a second writer, at once
        assert f"in use by process {train.pid}" in caplog.text
        train.send_signal(signal.SIGINT)
        _, err = train.communicate(timeout=60)
    finally:
        if train.poll() is None:
            train.kill()
    assert train.returncode == 130 and "Traceback" not in err and "interrupted" in err
    state = torch.load(out / "member0" / "state.pt", weights_only=True)
    logged = [json.loads(x)["episode"] for x in metrics.read_text().splitlines()]
    assert state["episode"] == logged[-1] >= 3 and logged == list(range(1, logged[-1] + 1))  # nothing lost
    assert not (out / ".amt.lock").exists()


def test_ctrl_c_during_evaluation_keeps_the_finished_cells_as_partial_results(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    out = tmp_path / "ev"
    args = [sys.executable, "-m", "amt.cli", "evaluate", "--out", str(out), "--set", f"cache_dir={tmp_path / 'c'}",
            *SMALL, "--set", "eval.n_tasks=40", "--set", "eval.adv_tasks=20"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"RANK": "0"}, preexec_fn=_default_sigint)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not any("PM" in ln and "greek" in ln and "clean" in ln for ln in lines):
            time.sleep(0.2)  # until the first greek cell is logged: latin's two cells and greek 1-shot are done
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=5)
    text = "".join(lines)
    assert proc.returncode == 130 and "Traceback" not in text and "interrupted" in text
    partial = json.loads((out / "results.partial.json").read_text())
    cells = {(r["domain"], r["n_shot"]) for r in partial["results"]}
    assert {("latin", 1), ("latin", 5), ("greek", 1)} <= cells and len(cells) < 10
    assert partial["partial"].startswith(f"interrupted after {len(cells)} of 10")
    assert not (out / "results.json").exists() and not (out / ".amt.lock").exists()
    assert main(["report", str(out)]) == 0 and "Partial results" in (out / "report" / "report.md").read_text()


def test_evaluate_a_users_own_folder_in_one_command(tmp_path, capsys):
    mine = write_image_folder(tmp_path / "my_photos", 6, 35, size=20)  # 7 held out per class: 5-shot validation
    out = tmp_path / "run"
    small = ["--set", "eval.n_tasks=2", "--set", "eval.n_query=2", "--set", "eval.adv_tasks=1",
             "--set", "eval.eps_sweep=[]", "--set", "eval.corruptions=[]", "--set", "eval.val_tasks=2",
             "--set", "autoattack.version=none", "--set", "masking.n_tasks=0", "--set", "attack.steps=2",
             "--set", f"cache_dir={tmp_path / 'cache'}"]
    assert main(["evaluate", "--domain", str(mine), "--pool", "embedded:glyph_pool", "--out", str(out), *small]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["domain"] for r in results["results"]} == {"my_photos"}
    assert {r["method"] for r in results["results"]} == {"PM", "AMT"}
    assert {r["n_shot"] for r in results["results"]} == {1, 5}
    tuning = results["tuning"]["AMT"]["my_photos"]["1"]
    assert tuning["validation_tasks"].startswith("held-out images")  # never the test images
    config = (out / "config.yaml").read_text()
    assert "amt_glyph_vit" in config and "glyph_pool" in config  # the preset's backbone and the shipped pool
    assert "| Δ AMT − PM |" in capsys.readouterr().out
    assert main(["evaluate", "--domain", str(tmp_path / "nope"), "--out", str(out)]) == 2
    (tmp_path / "b" / "my_photos").mkdir(parents=True)
    assert main(["evaluate", "--domain", str(mine), "--domain", str(tmp_path / "b" / "my_photos"),
                 "--out", str(out)]) == 2
