"""CUDA graphs for the STDiT step: one captured forward per fixed shape, replayed every step.

A sampling step at Bora's shape launches a few thousand small kernels; replaying a captured graph removes
their launch cost. A graph is keyed by the latent shape and the caption condition's structure (batch, kept
token counts, folded or not); the first call with a new key warms up on a side stream and captures, later
calls copy the inputs into the graph's static tensors and replay. Needs CUDA; the pipeline enables it with
`BoraPipeline.accelerate(cuda_graphs=True)`. Not exercised in CI (no GPU there): tests/model/test_cuda.py
(gpu marker) compares it with the eager model.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict

import torch

from model.errors import InvalidInput
from model.stdit import CaptionCondition, STDiT

MAX_GRAPHS = 8  # each holds its own activation memory; one per (shape, caption length) in use


def _structure(condition: CaptionCondition) -> tuple:
    return (condition.batch,) + tuple(
        (kv.folded, tuple(kv.lengths), None if kv.rows is None else tuple(len(r) for r in kv.rows))
        for kv in condition.blocks)


def _tensors(condition: CaptionCondition) -> list[torch.Tensor]:
    out = []
    for kv in condition.blocks:
        out += [*kv.keys, *kv.values, *kv.key_bias, *(kv.rows or [])]
    return out


def _clone(condition: CaptionCondition) -> CaptionCondition:
    blocks = [dataclasses.replace(
        kv, keys=[k.clone() for k in kv.keys], values=[v.clone() for v in kv.values],
        key_bias=[b.clone() for b in kv.key_bias], rows=None if kv.rows is None else [r.clone() for r in kv.rows],
    ) for kv in condition.blocks]
    return CaptionCondition(batch=condition.batch, blocks=blocks)


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    timestep: torch.Tensor
    condition: CaptionCondition
    out: torch.Tensor
    source: weakref.ref | None = None  # the condition last copied in


class CUDAGraphSTDiT:
    """Callable like `STDiT` for prepared conditions (what the samplers pass); anything else runs eagerly."""

    def __init__(self, model: STDiT, warmup_steps: int = 2):
        if model.device.type != "cuda":
            raise InvalidInput(f"CUDA graphs need the model on a CUDA device, not {model.device}")
        self.model = model
        self.warmup_steps = warmup_steps
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()

    def prepare_condition(self, y, mask=None, fold=None) -> CaptionCondition:
        return self.model.prepare_condition(y, mask, fold)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, y, mask=None) -> torch.Tensor:
        if mask is not None or not isinstance(y, CaptionCondition):
            return self.model(x, timestep, y, mask)
        x = x.to(self.model.dtype)
        key = (tuple(x.shape), tuple(timestep.shape), timestep.dtype, _structure(y))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key, x, timestep, y)
        self._graphs.move_to_end(key)
        entry.x.copy_(x)
        entry.timestep.copy_(timestep)
        if entry.source is None or entry.source() is not y:
            for static, fresh in zip(_tensors(entry.condition), _tensors(y), strict=True):
                static.copy_(fresh)
            entry.source = weakref.ref(y)
        entry.graph.replay()
        return entry.out.clone()

    def _capture(self, key: tuple, x: torch.Tensor, timestep: torch.Tensor, y: CaptionCondition) -> _Graph:
        if len(self._graphs) >= MAX_GRAPHS:
            self._graphs.popitem(last=False)
        static_x, static_t, static_y = x.clone(), timestep.clone(), _clone(y)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):  # allocator pools, cuBLAS handles, cached tables
                self.model(static_x, static_t, static_y)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model(static_x, static_t, static_y)
        entry = _Graph(graph, static_x, static_t, static_y, out, source=weakref.ref(y))
        self._graphs[key] = entry
        return entry
