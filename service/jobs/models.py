"""The models this service can serve, known without torch: the one table of request bounds and defaults.

Every check of a request reads it: the API (service/jobs/inputs.py, and `VideoCreate`'s static bounds, the
envelope of this table), the worker and `bora generate` (which hand a preset's bounds to the pipeline as
`model.presets.GenerationLimits`, see worker/limits.py). Mirrors model/presets.py's generation defaults
(that package needs torch to build anything); tests/model/test_model_specs.py checks the two agree. A
request may ask for a shape other than the one the weights were trained on, within bounds: it is served,
with an `untrained_shape` warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

Sampler = Literal["iddpm", "ddim", "dpm-solver++"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
SIZE_MULTIPLE = 16  # VAE downsampling 8 × STDiT spatial patch 2


@dataclass(frozen=True)
class ModelSpec:
    name: str
    trained: tuple[int, int, int]  # frames, height, width
    fps: int
    max_frames: int
    min_side: int
    max_side: int
    max_steps: dict[str, int]  # per sampler
    default_sampler: str
    default_steps: int
    default_guidance: float
    max_guidance: float = 20.0
    samplers: tuple[str, ...] = field(default=SAMPLERS)


MODELS: dict[str, ModelSpec] = {
    "bora": ModelSpec(
        name="bora",
        trained=(40, 256, 256),
        fps=8,
        max_frames=64,
        min_side=64,
        max_side=512,
        max_steps={"iddpm": 250, "ddim": 250, "dpm-solver++": 250},
        default_sampler="iddpm",
        default_steps=100,
        default_guidance=7.0,
    ),
    "tiny": ModelSpec(
        name="tiny",
        trained=(16, 64, 64),
        fps=8,
        max_frames=32,
        min_side=32,
        max_side=256,
        max_steps={"iddpm": 100, "ddim": 100, "dpm-solver++": 100},
        default_sampler="iddpm",
        default_steps=10,
        default_guidance=7.0,
    ),
    # The demo model trained on synthetic clips (demo/weights/bora-demo), what `make run` serves.
    "demo": ModelSpec(
        name="demo",
        trained=(16, 64, 64),
        fps=8,
        max_frames=32,
        min_side=32,
        max_side=256,
        max_steps={"iddpm": 100, "ddim": 100, "dpm-solver++": 100},
        default_sampler="dpm-solver++",
        default_steps=15,
        default_guidance=4.0,
    ),
}


@dataclass(frozen=True)
class Envelope:
    """The widest bounds any served model accepts: `VideoCreate`'s static (OpenAPI) bounds."""

    max_frames: int
    min_side: int
    max_side: int
    max_steps: int
    max_guidance: float


ENVELOPE = Envelope(
    max_frames=max(spec.max_frames for spec in MODELS.values()),
    min_side=min(spec.min_side for spec in MODELS.values()),
    max_side=max(spec.max_side for spec in MODELS.values()),
    max_steps=max(steps for spec in MODELS.values() for steps in spec.max_steps.values()),
    max_guidance=max(spec.max_guidance for spec in MODELS.values()),
)
