"""FiLM and Adapter pools: the paper's Table 17 alternatives to LoRA, as pools of named members like LoRA's.

Each pool layer is a child module of the timm module it adapts, applied by a forward hook on that module, so
the backbone's own module and parameter names are untouched (``blocks.0.norm1.weight`` stays) and the pool's
parameters are ``<host>.peft.members.<name>.<tensor>``:

- :class:`FiLMPool` after every ``nn.LayerNorm`` of the ViT (each block's ``norm1`` and ``norm2`` and the final
  ``norm``/``fc_norm``): y ↦ γ ⊙ y + β per channel, γ = 1 and β = 0 at initialisation (the identity);
- :class:`AdapterPool` beside every block's MLP (AdaptFormer): mlp(x) ↦ mlp(x) + s·(ReLU(x W_downᵀ + b_down)
  W_upᵀ + b_up), fed the MLP's own (LayerNorm-ed) input, bottleneck ``adapter_bottleneck``, s =
  ``adapter_scale``; W_down is drawn like ``nn.Linear``'s default (from the given generator), W_up = 0 and the
  biases 0 (the identity at initialisation).

The pool protocol is :class:`amt.lora_layer.LoRALinear`'s (``adapter_names``, ``add_adapter``,
``set_active_adapter``, ``adapter_parameters``, ``adapter_tensors``, ``merge``/``unmerge``, ``merged``), so
:mod:`amt.lora`'s model-level functions (activate, mark trainable, state dicts, merge) work on these pools as
they do on LoRA pools. Merging is a weight average: every tensor of the merged module is Σ wᵢ θᵢ (for FiLM it is
exact, the module being linear in its parameters; for the Adapter it is the weight-space merge of a nonlinear
module, as FLUTE blends its FiLM members). ``merge`` stores the merged tensors and ``unmerge`` drops them: the
members' parameters and the host module are never written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from amt.config import PEFTConfig

log = logging.getLogger(__name__)

PEFT_MODES = ("film", "adapter")


class MemberPool(nn.Module):
    """A pool of named members of one small module; subclasses define the tensors (:meth:`_new_member`) and
    the function (:meth:`apply`)."""

    def __init__(self) -> None:
        super().__init__()
        self.members = nn.ModuleDict()
        self.active_adapter: str | None = None
        self._merged: dict[str, Tensor] | None = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.members.keys())

    @property
    def merged(self) -> bool:
        return self._merged is not None

    def _check_name(self, name: str) -> None:
        if name not in self.members:
            raise KeyError(f"no member named {name!r} in this {type(self).__name__}; members are {self.adapter_names}")

    def _new_member(self, generator: torch.Generator | None) -> dict[str, Tensor]:
        raise NotImplementedError

    def add_adapter(self, name: str, init: str = "identity", generator: torch.Generator | None = None) -> None:
        """Add member ``name``, initialised to the identity (``init`` is accepted for LoRA's signature)."""
        if name in self.members:
            raise ValueError(f"member {name!r} exists already")
        self.members[name] = nn.ParameterDict({k: nn.Parameter(v) for k, v in self._new_member(generator).items()})

    def remove_adapter(self, name: str) -> None:
        self._check_name(name)
        del self.members[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active_adapter(self, name: str | None) -> None:
        if name is not None:
            self._check_name(name)
        self.active_adapter = name

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """The member's tensors by name (what its state dict stores)."""
        self._check_name(name)
        return dict(self.members[name].items())

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.adapter_tensors(name).values())

    @torch.no_grad()
    def merge(self, weights: Mapping[str, float | Tensor]) -> None:
        """The module used by the forward becomes Σ wᵢ θᵢ, tensor by tensor, until :meth:`unmerge`."""
        if self.merged:
            raise RuntimeError("members are already merged; call unmerge() before merging again")
        for name in weights:
            self._check_name(name)
        first = self.members[self.adapter_names[0]]
        merged = {k: torch.zeros_like(v) for k, v in first.items()}
        for name, w in weights.items():
            w = w.detach().to(first[next(iter(first))]) if isinstance(w, Tensor) else float(w)
            for k, v in self.members[name].items():
                merged[k] += w * v
        self._merged = merged

    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("unmerge() called on a pool that is not merged")
        self._merged = None

    def current(self) -> Mapping[str, Tensor] | None:
        """The tensors the forward uses: merged, else the active member's, else None (the host alone)."""
        if self._merged is not None:
            return self._merged
        return None if self.active_adapter is None else self.members[self.active_adapter]

    def apply(self, inputs: Tensor, output: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def hook(self, _module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        params = self.current()
        return output if params is None else self.apply(args[0], output, params)


class FiLMPool(MemberPool):
    """Per-channel scale γ and shift β of a LayerNorm's output ``[..., C]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def _new_member(self, generator: torch.Generator | None) -> dict[str, Tensor]:
        return {"scale": torch.ones(self.channels), "shift": torch.zeros(self.channels)}

    def apply(self, inputs: Tensor, output: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return output * params["scale"] + params["shift"]


class AdapterPool(MemberPool):
    """A bottleneck MLP beside an MLP: ``[..., C] → [..., C]`` added to the MLP's output, scaled by ``scale``."""

    def __init__(self, channels: int, bottleneck: int, scale: float) -> None:
        super().__init__()
        self.channels, self.bottleneck, self.scale = channels, bottleneck, scale

    def _new_member(self, generator: torch.Generator | None) -> dict[str, Tensor]:
        bound = 1 / math.sqrt(self.channels)  # nn.Linear's default init of the down projection
        down = (torch.rand(self.bottleneck, self.channels, generator=generator) * 2 - 1) * bound
        return {"down": down, "down_bias": torch.zeros(self.bottleneck),
                "up": torch.zeros(self.channels, self.bottleneck), "up_bias": torch.zeros(self.channels)}

    def apply(self, inputs: Tensor, output: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        h = torch.relu(nn.functional.linear(inputs, params["down"], params["down_bias"]))
        return output + self.scale * nn.functional.linear(h, params["up"], params["up_bias"])


def _hosts(vit: nn.Module, mode: str) -> list[tuple[str, nn.Module, int]]:
    """(qualified name, module, channels) of the modules a ``mode`` pool attaches to."""
    if mode == "film":
        return [(n, m, m.normalized_shape[-1]) for n, m in vit.named_modules()
                if isinstance(m, nn.LayerNorm) and m.normalized_shape]
    if mode == "adapter":
        return [(n, m, m.fc2.out_features) for n, m in vit.named_modules()
                if n.endswith("mlp") and hasattr(m, "fc1") and hasattr(m, "fc2")]
    raise ValueError(f"unknown PEFT mode {mode!r}; choose one of {PEFT_MODES}")


def inject_peft(vit: nn.Module, mode: str, names: list[str], cfg: PEFTConfig,
                generator: torch.Generator | None = None) -> list[str]:
    """Attach a ``mode`` ("film" | "adapter") pool with members ``names`` (``names[0]`` active) to every host
    module of ``vit``, in place; returns the hosts' qualified names. Load the backbone's weights first."""
    if not names:
        raise ValueError("inject_peft needs at least one member name")
    hosts = _hosts(vit, mode)
    if not hosts:
        raise ValueError(f"{type(vit).__name__} has no module a {mode} pool attaches to")
    for _, module, channels in hosts:
        if hasattr(module, "peft"):
            raise ValueError("this model already carries a FiLM/Adapter pool")
        pool = FiLMPool(channels) if mode == "film" else AdapterPool(channels, cfg.adapter_bottleneck,
                                                                    cfg.adapter_scale)
        for name in names:
            pool.add_adapter(name, generator=generator)
        pool.set_active_adapter(names[0])
        module.add_module("peft", pool)
        module.register_forward_hook(pool.hook)
    log.info("%s pool on %d modules, members %s", mode, len(hosts), names)
    return [n for n, _, _ in hosts]


def peft_layers(model: nn.Module) -> dict[str, MemberPool]:
    """Qualified name → :class:`MemberPool`, in ``named_modules`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MemberPool)}
