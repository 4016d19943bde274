"""A trained pool as PEFT LoRA adapters, one per member, for the unmodified timm backbone, plus a model card.

`amt export --pool RUN --format peft --out DIR` writes::

    DIR/README.md                             model card: backbone, threat model per member, training, results
    DIR/<member>/adapter_config.json          PEFT LoraConfig (peft_type LORA, per-module ranks)
    DIR/<member>/adapter_model.safetensors    base_model.model.<module>.lora_A.weight / .lora_B.weight

Why the ranks double. An amt pool shares one frozen residual W_res = W − ΔW₀ (:mod:`amt.lora_layer`: the SVD
init removes the principal part ΔW₀ = scaling·B₀A₀ of the pre-trained weight W, blockwise for the fused qkv), and
member m adapts it to W_res + ΔW_m with ΔW_m = scaling·B_m A_m. PEFT adds a LoRA to the *pre-trained* W, so a
member is exported as W + (ΔW_m − ΔW₀), one LoRA of twice the rank per block:

    A' = [A_m; A₀]                 [2·splits·r, in]
    B' = scaling·[B_m, −B₀]        [out, 2·splits·r]   (qkv, splits 3: block-diagonal, written densely)

so that B'A' = Σ_j scaling·(B_m,j A_m,j − B₀,j A₀,j) placed in row block j. With standard (non-SVD) init W_res = W
and the rank stays splits·r. Each module's ``lora_alpha`` equals its rank, so PEFT's scaling alpha/r is 1 (the
amt scaling is folded into B'). Nothing here imports ``peft``: the files are written with safetensors and json.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

from amt.backbone import ARCHS, build_backbone
from amt.checkpoints import fingerprint
from amt.config import BackboneConfig, ConfigError
from amt.lora import lora_layers
from amt.lora_layer import LoRALinear
from amt.pipeline import pool_path
from amt.report import condition_table
from amt.results import cell_label, load_results, select, shots_of
from amt.rundir import WEIGHTS_FILE, atomic_dir, load_pool, read_manifest, write_json, write_text

log = logging.getLogger(__name__)

FORMATS = ("peft",)
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for an adapter saved from PeftModel(timm model)
CONFIG_NAME = "adapter_config.json"  # peft.utils.constants.CONFIG_NAME
WEIGHTS_NAME = "adapter_model.safetensors"  # peft.utils.constants.SAFETENSORS_WEIGHTS_NAME
CARD_NAME = "README.md"
CHECK_RTOL = 1e-4  # largest |W + B'A' − (W_res + ΔW_m)| accepted, relative to max |W| of the layer


# ---------------------------------------------------------------------------------------------- factors


@torch.no_grad()
def peft_factors(layer: LoRALinear, name: str) -> tuple[Tensor, Tensor]:
    """Member ``name`` of ``layer`` as one LoRA on the pre-trained weight W: ``(A' [R, in], B' [out, R])``.

    R = 2·splits·r for SVD init (the member's term and minus the init term, see the module docstring), splits·r
    for standard init; ``layer.scaling`` is folded into B'. Assembled in float64, returned in the layer's dtype.
    """
    s, r, block = layer.splits, layer.rank, layer.out_features // layer.splits
    a = layer.lora_A[name].detach().double()  # [s·r, in]
    b = layer.lora_B[name].detach().double()  # [out, r]
    parts = [(a, b)]
    if layer.init_mode == "svd":
        if layer.svd_A is None:
            raise RuntimeError(f"{layer}: SVD-initialised but its init factors are gone; rebuild the pool")
        parts.append((layer.svd_A.double(), -layer.svd_B.double()))
    lora_a = torch.cat([p[0] for p in parts])  # [len(parts)·s·r, in]
    lora_b = torch.zeros(layer.out_features, len(parts) * s * r, dtype=torch.float64, device=a.device)
    for k, (_, factor_b) in enumerate(parts):
        for j in range(s):  # row block j of the output uses columns j·r:(j+1)·r of part k
            cols = slice((k * s + j) * r, (k * s + j + 1) * r)
            lora_b[j * block : (j + 1) * block, cols] = layer.scaling * factor_b[j * block : (j + 1) * block]
    dtype = layer.weight.dtype
    return lora_a.to(dtype).contiguous(), lora_b.to(dtype).contiguous()


@torch.no_grad()
def factor_error(layer: LoRALinear, name: str, weight: Tensor, lora_a: Tensor, lora_b: Tensor) -> float:
    """max |W + B'A' − (W_res + ΔW_name)| / max |W| in float64 (W: the pre-trained ``weight`` [out, in])."""
    peft = weight.double() + lora_b.double() @ lora_a.double()
    amt = layer.weight.double() + layer.delta_weight(name).double()
    return float((peft - amt).abs().max() / weight.double().abs().max().clamp_min(1e-30))


def member_adapter(layers: dict[str, LoRALinear], name: str, weights: dict[str, Tensor]
                   ) -> tuple[dict[str, Tensor], dict[str, int]]:
    """PEFT tensors (keys ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, CPU) and the rank of each
    module, for member ``name``; every layer is checked against the pre-trained ``weights`` (module → W)."""
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    worst = 0.0
    for module, layer in layers.items():
        lora_a, lora_b = peft_factors(layer, name)
        err = factor_error(layer, name, weights[module], lora_a, lora_b)
        if not err <= CHECK_RTOL:  # also NaN
            raise RuntimeError(f"{module}: the exported LoRA of {name} differs from amt's weight by {err:.3g} of "
                               f"max |W| (tolerance {CHECK_RTOL:g}); this is a bug in amt.export")
        worst = max(worst, err)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = lora_a.cpu()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = lora_b.cpu()
        ranks[module] = lora_a.shape[0]
    log.info("%s: %d modules, W + B'A' matches amt's adapted weight to %.2g of max |W|", name, len(ranks), worst)
    return tensors, ranks


def adapter_config(ranks: dict[str, int], base: str | None = None) -> dict:
    """PEFT ``LoraConfig`` fields (those that exist in every peft >= 0.12, so older versions load it too).

    ``r``/``lora_alpha`` are the most common rank; ``rank_pattern``/``alpha_pattern`` give every module its own
    (full module names, which PEFT matches as ``(.*\\.)?name$``), always with alpha = rank: scaling 1.
    """
    common = Counter(ranks.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "revision": None,
        "inference_mode": True, "r": common, "lora_alpha": common, "target_modules": list(ranks),
        "rank_pattern": dict(ranks), "alpha_pattern": dict(ranks), "lora_dropout": 0.0, "fan_in_fan_out": False,
        "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None,
    }


# ---------------------------------------------------------------------------------------------- model card


def _eps(attack: dict) -> str:
    return f"{attack['eps'] * 255:.3g}/255" if attack.get("norm", "linf") == "linf" else f"{attack['eps']:.3g} (ℓ2)"


def _threat(member: dict, cfg: dict) -> list[str]:
    """ε, norm, steps, step, objective, restarts of a member's meta-tuning attack (member.json ``attack``)."""
    attack = member.get("attack")
    if attack is None or not cfg["train"]["apq"]:
        return ["none (clean)", "—", "—", "—", "—", "—"]
    if attack.get("strategy") == "random":
        template = cfg["pool"]["attack"]
        eps = ", ".join(_eps({"norm": template["norm"], "eps": e}) for e in attack["eps"])
        return [f"drawn per episode from {{{eps}}}", template["norm"], str(template["steps"]),
                f"{cfg['pool']['step_ratio']:g}·ε", template["objective"], str(template["restarts"])]
    step = _eps({**attack, "eps": attack["step_size"]})
    return [_eps(attack), attack["norm"], str(attack["steps"]), step, attack["objective"], str(attack["restarts"])]


def _members_table(manifest: dict) -> list[str]:
    cfg = manifest["config"]
    lines = ["| member | ε | norm | attack steps | step size | objective | restarts | seed | episodes "
             "| kept: val acc % (episode) | logit scale |", "|" + "---|" * 11]
    for m in sorted(manifest["members"], key=lambda m: m["index"]):
        kept = m.get("kept") or {}
        kept_s = f"{kept['val_acc']:.2f} ({kept['episode']})" if "val_acc" in kept else "—"
        lines.append("| " + " | ".join([m["name"], *_threat(m, cfg), str(m.get("seed", "—")),
                                        str(m.get("episodes", "—")), kept_s, f"{m.get('scale', float('nan')):.3g}"])
                     + " |")
    return lines


def _rank_lines(ranks: dict[str, int], lora: dict, splits: dict[str, int]) -> list[str]:
    """One line per target suffix: how many modules, amt's rank and blocks, the PEFT rank."""
    lines = []
    for target in lora["targets"]:
        mods = [m for m in ranks if m == target or m.endswith("." + target)]
        if mods:
            peft = sorted({ranks[m] for m in mods})
            lines.append(f"  - `{target}` ({len(mods)} modules): amt rank {lora['rank']} × {splits[mods[0]]} "
                         f"row block(s) → PEFT rank {'/'.join(map(str, peft))}")
    return lines


def _training_lines(manifest: dict) -> list[str]:
    cfg = manifest["config"]
    t, lora, pool, perturb = cfg["train"], cfg["lora"], cfg["pool"], cfg.get("perturb", {})
    domain = (cfg.get("train_domain") or {}).get("name", "—")
    apsv = (f"on (η = {perturb.get('eta', '?')}, {perturb.get('mode', '?')} steps on A and B)" if t["apsv"]
            else "off")
    return [
        f"- Training domain: `{domain}`; episodes {t['n_way']}-way {t['n_shot']}-shot, {t['n_query']} queries per "
        f"class; {t['epochs']} epoch(s) × {t['episodes_per_epoch']} episodes per member "
        f"({t['episodes_per_step']} per step).",
        f"- Optimiser: SGD, lr {t['lr']:g} (cosine to {t['min_lr']:g} after {t['warmup_epochs']:g} warm-up epochs "
        f"from {t['warmup_lr']:g}), momentum {t['momentum']:g}, weight decay {t['weight_decay']:g}; weights kept: "
        f"`{t['keep']}`; logit scale trained: {t['train_scale']}.",
        f"- APQ (adversarial query perturbation): {'on' if t['apq'] else 'off'}; loss CE + {t['lambda_adv']:g}·KL"
        f"(clean ‖ adversarial); pool strategy `{pool['strategy']}`, attack step = {pool['step_ratio']:g}·ε.",
        f"- APSV (adversarial perturbation of the LoRA factors): {apsv}.",
        f"- LoRA: rank {lora['rank']}, scaling {lora['scaling']:g}, init `{lora['init']}`, targets "
        f"{', '.join(f'`{x}`' for x in lora['targets'])}; precision {cfg.get('precision', 'fp32')}.",
    ]


def _usage(backbone: BackboneConfig, fp: str, example: str, targets: list[str]) -> list[str]:
    arch_note = ("an amt architecture (`amt.backbone.ARCHS`), built by amt" if backbone.arch in ARCHS else
                 f"the timm model `timm.create_model({backbone.arch!r}, pretrained=False, num_classes=0, "
                 f"img_size={backbone.image_size})`, which `build_vit` below builds too")
    return [
        f"The adapters apply to the unmodified `{backbone.arch}`, {arch_note}, with the pre-trained weights of "
        f"fingerprint `{fp}` (`amt.checkpoints.fingerprint(vit)`); `PeftModel.from_pretrained` then changes "
        f"the `{'`, `'.join(targets)}` layers of every block as amt's pool member does. The model maps "
        "*normalised* images to features; amt's `Backbone` normalises first, so do the same:",
        "", "```python", "import torch", "from peft import PeftModel", "from amt.backbone import build_vit",
        "from amt.checkpoints import load_checkpoint", "",
        f"vit = build_vit({backbone.arch!r}, {backbone.image_size})   # timm VisionTransformer, num_classes=0",
        f"load_checkpoint(vit, {Path(backbone.checkpoint or 'CHECKPOINT').name!r})   # the pre-trained weights",
        f"model = PeftModel.from_pretrained(vit, \"DIR/{example}\").eval()",
        f"mean = torch.tensor({list(backbone.mean)}).view(1, 3, 1, 1)",
        f"std = torch.tensor({list(backbone.std)}).view(1, 3, 1, 1)",
        f"images = torch.rand(4, 3, {backbone.image_size}, {backbone.image_size})   # pixels in [0, 1]",
        "features = model((images - mean) / std)   # [4, embed_dim]", "```", "",
        "Features are classified few-shot by cosine similarity to class prototypes (mean support feature) at the "
        "member's logit scale (stored in each adapter's safetensors metadata, `amt_logit_scale`). amt's test-time "
        "merging of the members per task (AMT, rule `ttm`) is not part of PEFT: use `amt.classify.FewShotClassifier` "
        "with the original pool for that.",
    ]


def _results_lines(results: dict, source: str) -> list[str]:
    """Clean, headline-attack and corruption tables per shot (:func:`amt.report.condition_table`)."""
    proto = results["protocol"]
    methods = ", ".join(f"{m['name']} ({'pool ' + str(m['pool']) if m.get('pool') else 'backbone'}, "
                        f"rule {m.get('rule', '?')})" for m in results.get("methods", []))
    lines = [f"From `{source}`: {proto['n_way']}-way episodes, {proto.get('n_query', '?')} queries per class; "
             "accuracy in %, ± the 95% confidence interval over tasks."]
    if methods:
        lines.append(f"Methods: {methods}.")
    if results.get("partial"):
        lines.append(f"PARTIAL results: {results['partial']}.")
    titles = {"clean": "Clean", "adversarial": "Robust (headline attack)", "corruption": "Corrupted"}
    for shot in shots_of(results["results"]):  # a variable-way run has one cell, "vwvs"
        for cond, title in titles.items():
            if select(results, cond, shot):
                lines += ["", f"### {title}, {cell_label(proto['n_way'], shot)}", "",
                          condition_table(results, cond, shot)]
    return lines


def model_card(manifest: dict, ref: str, backbone: BackboneConfig, ranks: dict[str, int], splits: dict[str, int],
               results: dict | None = None, results_source: str = "") -> str:
    """The Markdown model card (README.md) of an exported pool."""
    names = [m["name"] for m in sorted(manifest["members"], key=lambda m: m["index"])]
    fp = manifest["backbone_fingerprint"]
    lines = [
        "---", "library_name: peft", "tags: [lora, adversarial-robustness, few-shot, vision-transformer, amt]", "---",
        "", f"# AMT LoRA pool `{ref}` as PEFT adapters", "",
        f"{len(names)} LoRA adapters ({', '.join(f'`{n}`' for n in names)}), one per member of an adversarially "
        "meta-tuned pool (AMT), each in PEFT's LoRA format for the unmodified backbone below. Made by "
        "`amt export --format peft`.", "",
        "## Backbone", "",
        f"- Architecture: `{backbone.arch}` (timm `VisionTransformer`, no classifier), input "
        f"{backbone.image_size}×{backbone.image_size} RGB, pixels in [0, 1].",
        f"- Pre-trained weights: fingerprint `{fp}` (recorded in the pool's `pool.json`); checkpoint "
        f"`{Path(backbone.checkpoint).name if backbone.checkpoint else 'random init, seed 0'}`.",
        f"- Normalisation before the ViT: mean {list(backbone.mean)}, std {list(backbone.std)}.",
        "- Adapted modules and ranks (SVD init: a member is W + B'A' with the init term removed, so the PEFT rank "
        "is twice amt's; `lora_alpha` = rank, scaling 1):" if manifest["config"]["lora"]["init"] == "svd" else
        "- Adapted modules and ranks (`lora_alpha` = rank, scaling 1):",
        *_rank_lines(ranks, manifest["config"]["lora"], splits), "",
        "## Threat model and radii", "",
        "Each member was meta-tuned against its own attack on the query images (pixel units of [0, 1] images; "
        "ℓ∞ ε shown ×255):", "", *_members_table(manifest), "",
        "## Training", "", *_training_lines(manifest), "",
        "## Loading a member with PEFT", "",
        *_usage(backbone, fp, names[-1], manifest["config"]["lora"]["targets"]), "",
        "## Evaluation", "",
        *(_results_lines(results, results_source) if results is not None else
          ["No evaluation results were given to `amt export` (`--results RUN/results.json` of `amt evaluate` or "
           "`amt demo` adds clean, robust and corrupted accuracy per domain and shot)."]),
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- export


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder; nothing is overwritten: give a new "
                          "folder (or delete this one first)")


def _results(path: str | Path | None, fp: str) -> dict | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--results {path}: no such file; give the results.json of `amt evaluate`/`amt demo`")
    results = load_results(path)
    theirs = (results.get("backbone") or {}).get("fingerprint")
    if theirs is not None and theirs != fp:
        raise ConfigError(f"--results {path} was computed on backbone {theirs}, the pool on {fp}; give the results "
                          "of an evaluation of this pool")
    return results


def export_peft(pool: str | Path, out: str | Path, backbone: BackboneConfig, results: str | Path | None = None,
                fmt: str = "peft") -> Path:
    """Write the LoRA pool ``pool`` (a run directory or ``embedded:NAME``) to ``out`` as PEFT adapters + README.md.

    ``backbone`` is the (resolved) configuration of the pool's backbone: it is built, its fingerprint checked
    against the pool's, and the pool loaded onto it (:func:`amt.rundir.load_pool`). ``out`` must not exist or be
    empty; everything is written into a temporary sibling that replaces it at the end. Raises
    :class:`ConfigError` for an unknown ``fmt``, a non-empty ``out``, a run that is not a LoRA pool, or results
    of another backbone. Returns ``out``.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not supported; formats: {', '.join(FORMATS)}")
    out = Path(out)
    _check_out(out)
    ref = str(pool)
    run = Path(pool_path(ref))
    manifest = read_manifest(run)
    if manifest["mode"] != "lora":
        raise ConfigError(f"{run} is a full-backbone run (PMF), not a LoRA pool: there are no adapters to export; "
                          f"its weights are in {run}/member0/{WEIGHTS_FILE} (keys backbone.*)")
    results_data = _results(results, manifest["backbone_fingerprint"])
    model = build_backbone(backbone).eval()
    weights = {k[: -len(".weight")]: v.clone() for k, v in model.vit.state_dict().items() if k.endswith(".weight")}
    loaded = load_pool(model, run, fingerprint(model.vit))
    layers = lora_layers(model.vit)
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        ranks: dict[str, int] = {}
        for name, scale, member in zip(loaded.names, loaded.scales, sorted(manifest["members"],
                                                                           key=lambda m: m["index"])):
            tensors, ranks = member_adapter(layers, name, weights)
            (tmp / name).mkdir(parents=True)
            write_json(tmp / name / CONFIG_NAME, adapter_config(ranks))
            eps = (member.get("attack") or {}).get("eps")
            save_file(tensors, str(tmp / name / WEIGHTS_NAME), metadata={
                "format": "pt", "amt_member": name, "amt_pool": ref, "amt_logit_scale": repr(scale),
                "amt_eps": repr(eps), "amt_backbone_fingerprint": manifest["backbone_fingerprint"]})
        splits = {q: layer.splits for q, layer in layers.items()}
        write_text(tmp / CARD_NAME, model_card(manifest, ref, backbone, ranks, splits, results_data, str(results)))
        _check_out(out)  # still empty: nothing appeared there meanwhile (atomic_dir replaces an empty folder)
    log.info("exported %d PEFT adapters of %s to %s", len(loaded.names), ref, out)
    return out
