"""Pyramid attention broadcast (PAB, Zhao et al. 2024, arXiv 2408.12588): reuse attention outputs across steps.

Within the middle of a sampling run an attention's output changes little from one step to the next, and the
less so the coarser its role: cross-attention least, temporal next, spatial most. PAB recomputes each kind
only every `*_every` steps while the timestep lies in `timestep_range` and reuses ("broadcasts") its last
output in between; the residual gates and the MLP still run every step with the current timestep. Training
free and off by default: `BoraPipeline.enable_attention_broadcast(AttentionBroadcastConfig())`.

`bench/sampler_quality.py` measures what it costs in quality (`bora eval`) and gains in time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

KINDS = ("spatial", "temporal", "cross")


@dataclass(frozen=True)
class AttentionBroadcastConfig:
    """Recompute each attention kind every n steps inside `timestep_range` (model timesteps, 0..999)."""

    spatial_every: int = 2
    temporal_every: int = 3
    cross_every: int = 5
    timestep_range: tuple[int, int] = (100, 800)

    def __post_init__(self) -> None:
        for kind in KINDS:
            if getattr(self, f"{kind}_every") < 1:
                raise ValueError(f"{kind}_every={getattr(self, f'{kind}_every')} must be ≥ 1")
        low, high = self.timestep_range
        if not 0 <= low <= high:
            raise ValueError(f"timestep_range={self.timestep_range} must be (low, high) with 0 ≤ low ≤ high")

    def every(self, kind: str) -> int:
        return getattr(self, f"{kind}_every")


class AttentionBroadcast:
    """The state of one sampling run: which kinds this step recomputes, and the outputs kept for reuse.

    `begin_step(t, shape)` is called once per model call (a step's guidance pair is one call). Outputs are
    forgotten when the latent shape changes (a job leaving a batched run, another video size), and `reset()`
    starts a new video.
    """

    def __init__(self, config: AttentionBroadcastConfig) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        self._shape: tuple[int, ...] | None = None
        self._outputs: dict[tuple[str, int], torch.Tensor] = {}
        self._steps_since = dict.fromkeys(KINDS, 0)
        self._reuse = dict.fromkeys(KINDS, False)
        self.computed = dict.fromkeys(KINDS, 0)  # attention calls run, per kind (for tests and benchmarks)
        self.reused = dict.fromkeys(KINDS, 0)

    def begin_step(self, timestep: int, shape: tuple[int, ...]) -> None:
        if shape != self._shape:
            self.reset()
            self._shape = shape
        low, high = self.config.timestep_range
        inside = low <= timestep <= high
        for kind in KINDS:
            self._steps_since[kind] += 1
            self._reuse[kind] = inside and self._steps_since[kind] < self.config.every(kind)

    def attend(self, kind: str, block: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The attention output of `kind` in `block`: the kept one when this step reuses it, else `compute()`."""
        key = (kind, block)
        kept = self._outputs.get(key)
        if self._reuse[kind] and kept is not None:
            self.reused[kind] += 1
            return kept
        out = compute()
        self._outputs[key] = out
        self._steps_since[kind] = 0
        self.computed[kind] += 1
        return out
