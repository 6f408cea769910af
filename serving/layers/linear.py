"""Linear layers at the oneDNN rate on CPU: weights packed once, re-packed when they change.

torch's default fp32 CPU matmul reaches about half of what oneDNN does over a weight reordered once
into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, then `_linear_pointwise`); in bf16
the packed call is also the faster one at every batch size measured. A `PackedLinear` computes one or
more linear layers that read the same input (q/k/v, gate/up) as ONE such call over the concatenation
of their weights, and returns each layer's output as a view of the one result.

The parameters stay what they are (HF names and shapes, what weight pushes write and LoRA reads); the
packed matrix is a derived copy. It follows the parameters: every call of a packed layer compares their
identity and version counters (bumped by any in-place write) with those it was packed from and re-packs
when they differ, so a stale packed weight can never be served (a layer on the plain path reads its
modules themselves and skips that check: 13 us a call, 2% of a TinyStories step).
`CausalLM.after_weights_changed()` re-packs eagerly, so the cost lands in the weight swap rather than in
the first step after it.

Where packing does not pay (or oneDNN cannot) the plain path runs: on CUDA, for fp16, for bf16 on a CPU
without AVX-512 BW/VL/DQ or AVX-NE-CONVERT, for a module that is not a plain
linear layer (tensor parallelism's RowParallel, which all-reduces), for fp32 matrices under
MIN_PACKED_FP32 elements or with under MIN_PACKED_FP32_IN inputs, and for fp32 single-row inputs
(oneDNN's per-call overhead dominates there).
"""

from __future__ import annotations

import os

import torch
from torch import nn

MIN_PACKED_FP32 = 512 * 256      # fp32 matrices smaller than this were as fast or faster unpacked
MIN_PACKED_FP32_IN = 256         # ...and so were fp32 ones with fewer inputs (TinyStories' 128)
PACK_BATCH_HINT = 64             # the row count oneDNN tunes the packed layout for
ENABLED = os.environ.get("TANDEM_PACKED_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available()


def _bf16_packs() -> bool:
    """oneDNN's bf16 linear needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; without them (an AVX2-only CPU)
    bf16 layers take the plain path instead of failing at the first pack."""
    if not ENABLED:
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), PACK_BATCH_HINT)
    except RuntimeError:
        return False
    return True


PACKED_DTYPES = (torch.float32, torch.bfloat16) if _bf16_packs() else (torch.float32,)


class Conv1D(nn.Module):
    """HF GPT-2's linear layer: y = x @ weight + bias with weight [in, out]."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


class PackedLinear:
    """y_i = x @ W_i^T + b_i for the named linear layers of `owner`, computed in one packed call.

    `names` are attributes of `owner` (looked up at pack time, so a module replaced after construction,
    e.g. by tensor parallelism, is seen). `transposed`: the weights are stored [in, out] (GPT-2 Conv1D).
    Calling returns one tensor for one layer, else a tuple of views, one per layer."""

    def __init__(self, owner: nn.Module, names: tuple[str, ...], transposed: bool = False):
        self.owner = owner
        self.names = tuple(names)
        self.transposed = transposed
        self.packed: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.sizes: list[int] = []
        self._key: tuple | None = None

    def modules(self) -> list[nn.Module]:
        return [getattr(self.owner, name) for name in self.names]

    def _state(self, modules: list[nn.Module]) -> tuple:
        key = []
        for m in modules:
            key.append(id(m))
            key.append(id(m.weight))
            key.append(m.weight._version)
            if m.bias is not None:
                key.append(id(m.bias))
                key.append(m.bias._version)
        return tuple(key)

    def _packable(self, modules: list[nn.Module]) -> bool:
        kind = Conv1D if self.transposed else nn.Linear
        if not ENABLED or not all(type(m) is kind for m in modules):
            return False
        w = modules[0].weight
        if w.device.type != "cpu" or w.dtype not in PACKED_DTYPES:
            return False
        if any(m.weight.dtype != w.dtype or (m.bias is not None and m.bias.dtype != w.dtype) for m in modules):
            return False
        if (modules[0].bias is None) != (modules[-1].bias is None) or \
                len({m.bias is None for m in modules}) != 1:
            return False
        numel = sum(m.weight.numel() for m in modules)
        in_features = w.shape[0] if self.transposed else w.shape[1]
        return w.dtype != torch.float32 or (numel >= MIN_PACKED_FP32 and in_features >= MIN_PACKED_FP32_IN)

    @torch.no_grad()
    def repack(self) -> None:
        """Pack the current weights (or note that the plain path is used); idempotent."""
        modules = self.modules()
        self._key = self._state(modules)
        if not self._packable(modules):
            self.packed, self.bias, self.sizes = None, None, []
            return
        weights = [m.weight.t() if self.transposed else m.weight for m in modules]
        weight = weights[0].contiguous() if len(weights) == 1 else torch.cat(weights, 0)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        biases = [m.bias for m in modules]
        self.bias = None if biases[0] is None else torch.cat(biases).contiguous()
        self.sizes = [w.shape[0] for w in weights]

    def is_stale(self) -> bool:
        return self._key != self._state(self.modules())

    def __call__(self, x: torch.Tensor):
        modules = self.modules()
        if self._key is None or (self.packed is not None and self._key != self._state(modules)):
            self.repack()   # (the plain path reads the modules themselves: nothing of it can be stale)
        packed = self.packed
        if packed is None or (x.dtype == torch.float32 and x.shape[0] < 2) or x.dtype != packed.dtype:
            outs = [m(x) for m in modules]
            return outs[0] if len(outs) == 1 else tuple(outs)
        y = torch.ops.mkldnn._linear_pointwise(x if x.is_contiguous() else x.contiguous(), packed, self.bias,
                                               "none", [], "")
        if len(self.sizes) == 1:
            return y
        return tuple(y.split(self.sizes, dim=-1))


def packed_linears(model: nn.Module) -> list[PackedLinear]:
    """Every PackedLinear held by a module of `model`."""
    found, seen = [], set()
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, PackedLinear) and id(value) not in seen:
                seen.add(id(value))
                found.append(value)
    return found


def repack_stale(model: nn.Module) -> int:
    """Re-pack every PackedLinear of `model` whose weights changed since it was packed; returns how many."""
    stale = [p for p in packed_linears(model) if p.is_stale()]
    for p in stale:
        p.repack()
    return len(stale)
