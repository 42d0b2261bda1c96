"""Samplers for STDiT: upstream IDDPM and the few-step DDIM / DPM-Solver++.

The pipeline uses one interface for all of them:

    sampler = make_sampler(name, num_inference_steps, cfg_scale, cfg_channel)
    x0 = sampler.sample(model, z, y_cond, y_null, mask, generators, callback=None, should_cancel=None)

- model(x [2n,C,T,H,W], t [2n] int64, y [2n,1,L,Cy], mask=[2n,L]|None) -> [2n,2C,T,H,W] (STDiT.forward);
  a model with `prepare_condition(y, mask)` (STDiT) gets it called once per run, and every step is then
  passed its result as y with mask=None (the caption work is done once per video, not once per step);
- z [n,C,T,H,W] float32 initial noise (draw it with `randn(shape, generators, device)`);
- y_cond, y_null [n,1,L,Cy]; mask [n,L] (the null rows reuse prompt j's mask, as upstream);
- generators: None (global RNG), one torch.Generator (upstream's single-stream order) or a list of n
  generators (row i depends only on generators[i]);
- callback(step_index, total_steps, timestep) after each step; should_cancel() checked before each step
  (raises model.errors.Interrupted); a non-finite latent raises model.errors.NumericalError.
"""

from __future__ import annotations

from typing import Protocol

from model.errors import InvalidInput
from model.schedulers.fast import FastSampler
from model.schedulers.iddpm import IDDPM, IDDPMSampler, randn

SAMPLERS = ("iddpm", "ddim", "dpm-solver++")


class Sampler(Protocol):
    name: str

    def sample(self, model, z, y_cond, y_null, mask, generators=None, callback=None, should_cancel=None): ...


def make_sampler(
    name: str, num_inference_steps: int, cfg_scale: float = 7.0, cfg_channel: int | None = 3
) -> Sampler:
    """Build the sampler `name` (one of SAMPLERS); invalid values raise model.errors.InvalidInput."""
    if name == "iddpm":
        return IDDPMSampler(num_inference_steps, cfg_scale, cfg_channel)
    if name in ("ddim", "dpm-solver++"):
        return FastSampler(name, num_inference_steps, cfg_scale, cfg_channel)
    raise InvalidInput(f"unknown sampler {name!r}; expected one of {SAMPLERS}")


__all__ = ["IDDPM", "SAMPLERS", "FastSampler", "IDDPMSampler", "Sampler", "make_sampler", "randn"]
