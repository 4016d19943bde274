"""Per-layer singular-value spectra of an evaluated method's weights against the pre-trained weights (paper
Figs. 2–3: APSV changes the top singular values of the FFN and attention-projection layers, more so in later blocks).

For every block ``i`` and layer ``mlp.fc1``, ``mlp.fc2``, ``attn.proj`` of the ViT, the top ``k`` singular values
σ_1 ≥ … ≥ σ_k of the layer's effective weight W (``[out, in]``, what its forward multiplies by) are recorded next to
those of the pre-trained weight W₀ of the same layer. A pool's weight is its uniform merge
W = W_res + (1/P) Σᵢ ΔWᵢ: the pool's average member, the same for every task (the per-task merge of Algorithm 2
depends on the support set). A method without adapters (PM, PMF) is measured as it is: PM gives W = W₀ exactly.
Singular values are computed in float64 on the CPU; units are those of the weights.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from amt.lora import merged
from amt.lora_layer import LoRALinear

SPECTRA_LAYERS = ("mlp.fc1", "mlp.fc2", "attn.proj")  # the FFN layers (Fig. 2) and the MHA projection (Fig. 3)
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.(.+)$")


def effective_weight(module: nn.Module) -> Tensor:
    """The ``[out, in]`` matrix a linear layer's forward multiplies by: an ``nn.Linear``'s weight; a
    :class:`~amt.lora_layer.LoRALinear`'s weight (W_res, or the merged weight while merged) plus the active adapter's
    ΔW when one is active and nothing is merged."""
    if isinstance(module, LoRALinear):
        weight = module.weight.detach()
        if not module.merged and module.active_adapter is not None:
            weight = weight + module.delta_weight(module.active_adapter).detach().to(weight.dtype)
        return weight
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def top_singular_values(weight: Tensor, k: int) -> list[float]:
    """The ``k`` largest singular values of ``weight`` ``[out, in]``, descending (float64 on the CPU)."""
    with torch.no_grad():
        return torch.linalg.svdvals(weight.detach().to("cpu", torch.float64))[:k].tolist()


def block_layers(model: nn.Module, kinds: Sequence[str] = SPECTRA_LAYERS) -> dict[str, tuple[int, str]]:
    """Qualified name → (block index, layer kind) of the linear layers of ``kinds`` in ``model``'s blocks."""
    out = {}
    for name, module in model.named_modules():
        match = _BLOCK.search(name)
        if match and match[2] in kinds and isinstance(module, (nn.Linear, LoRALinear)):
            out[name] = (int(match[1]), match[2])
    return out


def layer_spectra(model: nn.Module, reference: nn.Module, top: int,
                  kinds: Sequence[str] = SPECTRA_LAYERS) -> dict[str, dict]:
    """Per block layer of ``kinds``: ``{"block", "kind", "pretrained": [σ_1..σ_k of W₀], "tuned": [σ_1..σ_k of W]}``
    with W the layer's current :func:`effective_weight` in ``model`` and W₀ the same layer of ``reference`` (the
    pre-trained backbone, same architecture)."""
    if top < 1:
        raise ValueError(f"eval.spectra_top={top}: record at least one singular value per layer")
    ref = dict(reference.named_modules())
    out = {}
    for name, (block, kind) in block_layers(model, kinds).items():
        if name not in ref:
            raise ValueError(f"layer {name} of the method has no counterpart in the pre-trained backbone")
        out[name] = {"block": block, "kind": kind, "pretrained": top_singular_values(effective_weight(ref[name]), top),
                     "tuned": top_singular_values(effective_weight(model.get_submodule(name)), top)}
    return out


def method_spectra(model: nn.Module, pool_names: Sequence[str], reference: nn.Module, top: int) -> dict:
    """The spectra record of one evaluated method: ``{"weights": what was measured, "top": k, "layers":
    :func:`layer_spectra`}``; a pool (``pool_names``) is measured at its uniform merge, restored afterwards."""
    if not pool_names:
        return {"weights": "as loaded", "top": top, "layers": layer_spectra(model, reference, top)}
    with merged(model, {n: 1.0 / len(pool_names) for n in pool_names}):
        layers = layer_spectra(model, reference, top)
    return {"weights": f"uniform merge of {len(pool_names)} pool members", "top": top, "layers": layers}

