"""FLOPs and speed of one meta-tuning episode: `amt.train.training_step` against the authors' schedule.

The authors' schedule (``../shared/reference/authors-code-digest.md`` §1.2, §1.5) is emulated here with the
same modules and the same mathematics, pass for pass: support features at w kept with their graph; K
attack iterations that each forward the adversarial *and* the clean queries (the clean logits are
recomputed with a graph every iteration); a deep copy of the model as the weight-adversary proxy, its
clean + adversarial forward and backward, the per-tensor relative-norm direction; the final clean +
adversarial query forward at the perturbed weights reusing the support graph from w; backward. Their
in-place perturbation under a live support graph raises in fp32 (defect D11), so the perturbed forward
is done with ``torch.func.functional_call`` — same FLOPs. That is 2K+5 forward and K+2 backward passes.

FLOPs come from the formulas of ``torch.utils.flop_counter`` (deterministic, see :class:`FlopCount`) with timm's
fused attention switched off, since the counter sees no FLOPs in CPU fused attention. Timings use the fused path.

    .venv/bin/python benchmarks/train_step.py            # writes benchmarks/results/train_step.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from amt.backbone import Backbone, build_vit
from amt.config import AttackConfig, LoRAConfig, PerturbConfig
from amt.data.episodes import Episode
from amt.head import cosine_logits, prototypes
from amt.lora import adapter_parameters, inject_lora, mark_trainable, set_active_adapter
from amt.train import training_step
from record import write_record

log = logging.getLogger("benchmarks.train_step")


def authors_step(model, episode: Episode, scale, params, attack: AttackConfig, eta: float, lambda_adv: float,
                 generator: torch.Generator) -> torch.Tensor:
    """The authors' per-episode schedule (2K+5 forwards, K+2 backwards, one model copy); leaves ``.grad``."""
    proxy = copy.deepcopy(model)  # engine.py: a fresh proxy every episode
    s, q, y = episode.support_images, episode.query_images, episode.query_labels
    supp = model(s)  # graph kept for the final loss
    protos = prototypes(supp, episode.support_labels, episode.n_way)
    delta = (torch.rand(q.shape, generator=generator) * 2 - 1) * attack.eps
    for _ in range(attack.steps):
        delta.requires_grad_(True)
        adv_logits = cosine_logits(model((q + delta).clamp(0, 1)), protos, scale)
        clean_logits = cosine_logits(model(q), protos, scale)  # recomputed with a graph every iteration
        kl = F.kl_div(F.log_softmax(adv_logits, -1), F.softmax(clean_logits, -1), reduction="sum")
        (grad,) = torch.autograd.grad(kl, [delta])
        delta = (delta.detach() + attack.step_size * grad.sign()).clamp(-attack.eps, attack.eps)
    x_adv = (q + delta).clamp(0, 1).detach()
    # weight adversary on the proxy: clean + adversarial forward with detached support features, backward
    proxy_protos = prototypes(supp.detach(), episode.support_labels, episode.n_way)
    pc = cosine_logits(proxy(q), proxy_protos, scale.detach())
    pa = cosine_logits(proxy(x_adv), proxy_protos, scale.detach())
    proxy_loss = F.cross_entropy(pc, y) + lambda_adv * F.kl_div(F.log_softmax(pa, -1), F.softmax(pc, -1),
                                                                reduction="batchmean")
    names = [n for n, p in model.named_parameters() if any(p is t for t in params)]
    proxy_params = dict(proxy.named_parameters())
    grads = torch.autograd.grad(proxy_loss, [proxy_params[n] for n in names])
    perturbed = {}
    for n, p, g in zip(names, params, grads):
        perturbed[n] = p + eta * p.detach().norm() * g / (g.norm() + 1e-20)
    # final loss at w + v; the support graph is the one recorded at w
    fc = cosine_logits(functional_call(model, perturbed, (q,)), protos, scale)
    fa = cosine_logits(functional_call(model, perturbed, (x_adv,)), protos, scale)
    loss = F.cross_entropy(fc, y) + lambda_adv * F.kl_div(F.log_softmax(fa, -1), F.softmax(fc, -1),
                                                          reduction="batchmean")
    loss.backward()
    return loss.detach()


def build(arch: str, image_size: int, rank: int) -> tuple[Backbone, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    model = Backbone(build_vit(arch, image_size), mean=(0.5,) * 3, std=(0.5,) * 3).eval()
    inject_lora(model.vit, LoRAConfig().targets, ["member0"], rank=rank)
    mark_trainable(model, ["member0"])
    set_active_adapter(model, "member0")
    return model, adapter_parameters(model, "member0")


def synthetic_episode(n_way: int, n_shot: int, n_query: int, image_size: int, seed: int) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        support_images=torch.rand(n_way * n_shot, 3, image_size, image_size, generator=g),
        support_labels=torch.arange(n_way).repeat_interleave(n_shot),
        query_images=torch.rand(n_way * n_query, 3, image_size, image_size, generator=g),
        query_labels=torch.arange(n_way).repeat_interleave(n_query),
        class_ids=torch.arange(n_way),
    )


class FlopCount(TorchDispatchMode):
    """Total FLOPs of the aten ops run inside, by the formulas of ``FlopCounterMode`` (its ``flop_registry``).

    ``FlopCounterMode`` itself cannot be used: its module tracker's backward hooks make
    ``torch.autograd.grad`` with respect to a leaf (the attack's input gradient) raise.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def set_fused_attention(model: torch.nn.Module, fused: bool) -> None:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


def run_one(step: str, model, params, episode, attack, seed: int) -> torch.Tensor:
    scale = torch.nn.Parameter(torch.tensor(10.0))
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(seed)
    if step == "ours":
        return training_step(model, episode, scale, params, attack, PerturbConfig(), 6.0, g)[0]
    return authors_step(model, episode, scale, params, attack, PerturbConfig().eta, 6.0, g)


def measure(arch: str, image_size: int, steps: int, n_query: int, repeats: int, rank: int) -> dict:
    model, params = build(arch, image_size, rank)
    episode = synthetic_episode(5, 1, n_query, image_size, 0)
    attack = AttackConfig(eps=8 / 255, step_size=2 / 255, steps=steps, objective="kl")
    out: dict = {"arch": arch, "image_size": image_size, "attack_steps": steps, "n_way": 5, "n_shot": 1,
                 "n_query_per_class": n_query, "lora_rank": rank}
    set_fused_attention(model, False)
    for step in ("ours", "authors"):
        with FlopCount() as counter:
            run_one(step, model, params, episode, attack, 0)
        out[f"{step}_gflops"] = counter.flops / 1e9
    set_fused_attention(model, True)
    for step in ("ours", "authors"):
        run_one(step, model, params, episode, attack, 0)  # warm-up
        t0 = time.perf_counter()
        for r in range(repeats):
            run_one(step, model, params, episode, attack, r)
        out[f"{step}_episodes_per_s"] = repeats / (time.perf_counter() - t0)
    n_s, n_q = 5, 5 * n_query
    out["ours_forward_images"] = 2 * n_s + (steps + 4) * n_q
    out["authors_forward_images"] = n_s + (2 * steps + 4) * n_q
    out["flop_ratio_ours_over_authors"] = out["ours_gflops"] / out["authors_gflops"]
    out["speedup_ours_over_authors"] = out["ours_episodes_per_s"] / out["authors_episodes_per_s"]
    log.info("%s", json.dumps(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    parser.add_argument("--repeats", type=int, default=3, help="timed episodes per configuration")
    parser.add_argument("--skip-vit-s", action="store_true", help="only the embedded backbone (fast)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runs = [measure("amt_glyph_vit", 32, k, 15, args.repeats, 8) for k in (10, 2)]
    if not args.skip_vit_s:
        runs += [measure("vit_small_patch16_224", 128, k, 15, 1, 8) for k in (10, 2)]
    write_record("train_step", runs, "ours_gflops <= 0.6 x authors_gflops at K = 10", args.out)


if __name__ == "__main__":
    main()
