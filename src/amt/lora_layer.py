"""The LoRA pool layer: named low-rank adapters on a shared frozen residual, SVD init, exact merging.

One :class:`LoRALinear` replaces one ``nn.Linear`` of the backbone and holds every member of the
adapter pool (docs/method.md, "Model"): member ``name`` owns ``lora_A[name]`` and ``lora_B[name]`` and the
layer computes, for the *active* member,

    y = x W_resᵀ + b + scaling · B (A x)          x: [..., in], y: [..., out]

without ever materialising ΔW = scaling · B A. Shapes follow PEFT: ``lora_A`` is ``[splits·rank, in]``,
``lora_B`` is ``[out, rank]``. ``splits`` is 1 for an ordinary linear and 3 for timm's fused ``attn.qkv``,
where the q, k and v row blocks each get their own rank-``rank`` pair: output block j (rows
``j·out/3 : (j+1)·out/3``) uses ``A[j·r:(j+1)·r]`` and ``B[j·out/3:(j+1)·out/3]``, so ΔW is block-structured,
ΔW_j = scaling · B_j A_j (as in the authors' code).

SVD (PiSSA-style) initialisation, per block: W = U diag(S) Vᵀ (computed in float64),
B = U[:, :r]·diag(√(S[:r]/scaling)), A = diag(√(S[:r]/scaling))·Vᵀ[:r], W_res = W − scaling·B A.
With the paper's scaling 1 this is exactly the rule of docs/method.md ("Model"); dividing S by the scaling
(as PEFT's PiSSA does) keeps W_res + scaling·B A = W for any positive scaling. The residual is shared by
every member of the pool: the first SVD adapter turns the weight into W_res, every later one gets the same
initial A, B.

Test-time merging (docs/method.md, "Test-time merging") uses :meth:`LoRALinear.merge`: the weight becomes
W_res + Σ wᵢ ΔWᵢ and is restored bit-for-bit from a saved copy (never by subtraction) on unmerge.
Model-level operations (injection, activation, merging every layer, state dicts) are in :mod:`amt.lora`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INIT_MODES = ("svd", "standard")

__all__ = ["INIT_MODES", "LoRALinear"]


class LoRALinear(nn.Module):
    """A frozen linear layer (the shared residual) plus a pool of named LoRA adapters.

    Attributes:
        weight: frozen residual W_res, ``[out, in]`` (``requires_grad=False``); while merged it holds
            W_res + Σ wᵢ ΔWᵢ.
        bias: frozen bias ``[out]`` or ``None``.
        lora_A: ``name → [splits·rank, in]`` trainable factors.
        lora_B: ``name → [out, rank]`` trainable factors.
        rank, scaling, splits, in_features, out_features: as in the module docstring.
        active_adapter: the adapter used by :meth:`forward`, or ``None`` for the residual alone.
        init_mode: ``None`` before the first adapter, then ``"svd"`` (weight is W − principal part; stays
            so even when every adapter is removed) or ``"standard"`` (weight is the pre-trained W).
        merged: whether :meth:`merge` is in effect.
    """

    fold: bool = True  # fold the adapter term into the weight when that is cheaper (see forward); per layer or class

    def __init__(self, base: nn.Linear, rank: int, scaling: float = 1.0, splits: int = 1) -> None:
        """Wrap ``base`` (its weight and bias are copied and frozen; ``base`` itself is not kept)."""
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        out_features, in_features = base.weight.shape
        if splits < 1 or out_features % splits:
            raise ValueError(
                f"splits={splits} must be a positive divisor of out_features={out_features} "
                "(3 for a fused qkv projection, 1 otherwise)"
            )
        max_rank = min(in_features, out_features // splits)
        if not 1 <= rank <= max_rank:
            raise ValueError(
                f"rank={rank} is invalid for a linear of shape [out={out_features}, in={in_features}] "
                f"with splits={splits}: need 1 <= rank <= min(in, out/splits) = {max_rank}; lower LoRAConfig.rank"
            )
        if scaling == 0:
            raise ValueError("scaling=0 would switch every adapter off; use a non-zero LoRA scaling")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.scaling = float(scaling)
        self.splits = splits
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        # SVD-init factors of the pool (identical for every member); derived from W at injection time.
        self.register_buffer("svd_A", None, persistent=False)
        self.register_buffer("svd_B", None, persistent=False)
        self.active_adapter: str | None = None
        self.init_mode: str | None = None
        self._saved_weight: Tensor | None = None

    # ------------------------------------------------------------------ adapters
    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters in insertion order."""
        return list(self.lora_A.keys())

    @property
    def merged(self) -> bool:
        """True while :meth:`merge` is in effect (until :meth:`unmerge`)."""
        return self._saved_weight is not None

    def _check_name(self, name: str) -> None:
        if name not in self.lora_A:
            raise KeyError(f"no LoRA adapter named {name!r} in this layer; adapters are {self.adapter_names}")

    def _check_not_merged(self, what: str) -> None:
        if self.merged:
            raise RuntimeError(f"cannot {what} while adapters are merged into the weight; call unmerge() first")

    def add_adapter(self, name: str, init: str = "svd", generator: torch.Generator | None = None) -> None:
        """Add adapter ``name`` initialised by ``init``.

        ``"svd"``: A, B are the principal factors of W (per q/k/v block); the first SVD adapter turns the
        weight into W_res, later ones get identical A, B and leave W_res untouched.
        ``"standard"``: A ~ kaiming-uniform(a=√5) (bound 1/√in, as PEFT), drawn from ``generator`` (the
        global RNG when ``None``) on the generator's device, B = 0; the weight stays W.
        A pool uses one mode: mixing raises, because the two modes need different residuals.
        """
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
        if init not in INIT_MODES:
            raise ValueError(f"unknown LoRA init {init!r}; choose one of {INIT_MODES}")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists; adapters are {self.adapter_names}")
        self._check_not_merged("add an adapter")
        if self.init_mode is not None and self.init_mode != init:
            raise ValueError(
                f"cannot add a {init!r}-initialised adapter {name!r} to a pool initialised with "
                f"{self.init_mode!r} (the residual weight differs between the modes); a pool uses one init mode"
            )
        if init == "svd":
            if self.svd_A is None:
                self._svd_residual()
            lora_A, lora_B = self.svd_A.clone(), self.svd_B.clone()
        else:
            lora_A = self._kaiming_A(generator)
            lora_B = torch.zeros(self.out_features, self.rank, dtype=self.weight.dtype, device=self.weight.device)
        self.init_mode = init
        self.lora_A[name] = nn.Parameter(lora_A)
        self.lora_B[name] = nn.Parameter(lora_B)

    @torch.no_grad()
    def _svd_residual(self) -> None:
        """PiSSA init per row block (float64 SVD); sets ``svd_A``/``svd_B`` and weight ← W − scaling·B A."""
        if self.scaling <= 0:
            raise ValueError(f"SVD init needs a positive scaling (it takes √(S/scaling)), got {self.scaling}")
        r, block = self.rank, self.out_features // self.splits
        w = self.weight.detach().to(torch.float64)
        residual = torch.empty_like(w)
        factors_A, factors_B = [], []
        for j in range(self.splits):
            w_j = w[j * block : (j + 1) * block]
            u, s, vh = torch.linalg.svd(w_j, full_matrices=False)
            root = torch.sqrt(s[:r] / self.scaling)
            factors_B.append(u[:, :r] * root)  # [block, r]
            factors_A.append(root[:, None] * vh[:r])  # [r, in]
            residual[j * block : (j + 1) * block] = w_j - (u[:, :r] * s[:r]) @ vh[:r]
        dtype = self.weight.dtype
        self.svd_A = torch.cat(factors_A).to(dtype)
        self.svd_B = torch.cat(factors_B).to(dtype)
        self.weight.copy_(residual.to(dtype))

    def _kaiming_A(self, generator: torch.Generator | None) -> Tensor:
        """Random ``[splits·rank, in]`` A, kaiming-uniform with a=√5 (bound 1/√in), in float32 then cast."""
        device = generator.device if generator is not None else self.weight.device
        a = torch.empty(self.splits * self.rank, self.in_features, dtype=torch.float32, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        return a.to(device=self.weight.device, dtype=self.weight.dtype)

    def remove_adapter(self, name: str) -> None:
        """Delete adapter ``name`` (deactivating it if active). An SVD residual stays W_res."""
        self._check_name(name)
        self._check_not_merged("remove an adapter")
        del self.lora_A[name]
        del self.lora_B[name]
        if self.active_adapter == name:
            self.active_adapter = None
        if not self.lora_A and self.init_mode == "standard":
            self.init_mode = None  # the weight is the untouched W again

    def set_active_adapter(self, name: str | None) -> None:
        """Select the adapter used by :meth:`forward` (``None``: residual only)."""
        if name is not None:
            self._check_name(name)
        self.active_adapter = name

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """``[lora_A[name], lora_B[name]]``."""
        self._check_name(name)
        return [self.lora_A[name], self.lora_B[name]]

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """``{"lora_A": lora_A[name], "lora_B": lora_B[name]}`` (what a member's state dict stores per layer)."""
        self._check_name(name)
        return {"lora_A": self.lora_A[name], "lora_B": self.lora_B[name]}

    # ------------------------------------------------------------------ compute
    def delta_weight(self, name: str) -> Tensor:
        """ΔW = scaling · blockwise B A, ``[out, in]``; differentiable w.r.t. A and B."""
        self._check_name(name)
        r, block, s = self.rank, self.out_features // self.splits, self.splits
        lora_A = self.lora_A[name].view(s, r, self.in_features)
        lora_B = self.lora_B[name].view(s, block, r)
        return torch.bmm(lora_B, lora_A).reshape(self.out_features, self.in_features) * self.scaling

    def lora_output(self, x: Tensor, name: str) -> Tensor:
        """scaling · ΔW x computed as B (A x) block by block, ``[..., in] → [..., out]``."""
        self._check_name(name)
        h = F.linear(x, self.lora_A[name])  # [..., splits·r]
        lora_B = self.lora_B[name]
        if self.splits == 1:
            return F.linear(h, lora_B) * self.scaling
        s, r = self.splits, self.rank
        h = h.view(*h.shape[:-1], s, r)
        out = torch.einsum("...sr,sor->...so", h, lora_B.view(s, self.out_features // s, r))
        return out.reshape(*out.shape[:-2], self.out_features) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in] → [..., out]``: x W_resᵀ + b (+ the active adapter's term unless merged).

        The adapter's term is computed the cheaper of two equal ways: for T input rows (tokens), x (W_res + ΔW)ᵀ
        costs r·in·out extra multiply-adds to form ΔW, the factored B (A x) costs T·r·(in + out); the first wins
        once T ≥ in·out / (in + out) (48 rows for a 96 × 96 layer, 288 for DINO ViT-S's 384 × 1152 qkv), which
        is every training batch — one large matrix product instead of three small ones (about 15% more
        meta-tuning episodes per second on the embedded default, ``benchmarks/meta_tuning.py``, although the
        backward then also forms the [out, in] gradient of the folded weight). ``fold = False`` always takes
        the factored form (the benchmark counts the model's FLOPs that way).
        """
        if self.merged or self.active_adapter is None:
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // max(1, self.in_features)
        if self.fold and rows * (self.in_features + self.out_features) >= self.in_features * self.out_features:
            weight = self.weight + self.delta_weight(self.active_adapter).to(self.weight.dtype)
            return F.linear(x, weight, self.bias)
        return F.linear(x, self.weight, self.bias) + self.lora_output(x, self.active_adapter)

    # ------------------------------------------------------------------ merging
    @torch.no_grad()
    def merge(self, weights: Mapping[str, float | Tensor]) -> None:
        """weight ← W_res + Σ wᵢ ΔWᵢ (accumulated in at least float32); an exact copy of W_res is kept.

        While merged, :meth:`forward` uses the merged weight and ignores ``active_adapter``; the weight may
        be edited further in place (e.g. singular-value trimming) — :meth:`unmerge` restores W_res anyway.
        An empty mapping merges nothing (forward = residual only).
        """
        if self.merged:
            raise RuntimeError("adapters are already merged into this layer; call unmerge() before merging again")
        for name in weights:
            self._check_name(name)
        saved = self.weight.detach().clone()
        acc_dtype = torch.promote_types(self.weight.dtype, torch.float32)
        acc = saved.to(acc_dtype)
        for name, w in weights.items():
            w = w.detach().to(device=acc.device, dtype=acc_dtype) if isinstance(w, Tensor) else float(w)
            acc = acc + w * self.delta_weight(name).to(acc_dtype)
        self.weight.copy_(acc)
        self._saved_weight = saved

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W_res bit-for-bit from the copy saved by :meth:`merge`."""
        if not self.merged:
            raise RuntimeError("unmerge() called on a layer that is not merged")
        self.weight.copy_(self._saved_weight)
        self._saved_weight = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"scaling={self.scaling}, splits={self.splits}, init={self.init_mode}, "
            f"adapters={self.adapter_names}, active={self.active_adapter!r}, merged={self.merged}"
        )
