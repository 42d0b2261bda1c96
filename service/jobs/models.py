"""The models this service can serve, known without torch: bounds for validation and request defaults.

Mirrors model/presets.py's generation defaults (that package needs torch to build anything);
tests/model/test_model_specs.py checks the two agree. A request may ask for a shape other than
the one the weights were trained on, within bounds: it is served, with an `untrained_shape` warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from service.jobs.errors import InvalidRequest
from service.jobs.schemas import SAMPLERS, JobWarning, VideoCreate, VideoInput

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
        default_sampler="ddim",
        default_steps=25,
        default_guidance=4.0,
    ),
}


def normalize(
    body: VideoCreate, spec: ModelSpec, seed: int, *, max_prompt_chars: int, max_metadata_bytes: int
) -> tuple[VideoInput, list[JobWarning]]:
    """Check a request against the served model and fill its defaults. Raises InvalidRequest (422)."""
    if body.model is not None and body.model != spec.name:
        raise InvalidRequest(
            f"model {body.model!r} is not served here; this server serves {spec.name!r}",
            code="model_not_served",
            param="body.model",
        )
    if not body.prompt.strip():
        raise InvalidRequest("prompt must not be blank", param="body.prompt")
    if len(body.prompt) > max_prompt_chars:
        raise InvalidRequest(f"prompt is longer than {max_prompt_chars} characters", param="body.prompt")
    if body.metadata is not None:
        size = len(json.dumps(body.metadata, ensure_ascii=False).encode())
        if size > max_metadata_bytes:
            raise InvalidRequest(
                f"metadata is {size} bytes as JSON; the limit is {max_metadata_bytes}", param="body.metadata"
            )
    frames, height, width = spec.trained
    num_frames = body.num_frames if body.num_frames is not None else frames
    height = body.height if body.height is not None else height
    width = body.width if body.width is not None else width
    sampler = body.sampler or spec.default_sampler
    steps = body.num_inference_steps if body.num_inference_steps is not None else spec.default_steps
    guidance = body.guidance_scale if body.guidance_scale is not None else spec.default_guidance

    if not 1 <= num_frames <= spec.max_frames:
        raise InvalidRequest(f"num_frames must be 1..{spec.max_frames} for {spec.name}", param="body.num_frames")
    for name, value in (("height", height), ("width", width)):
        if not spec.min_side <= value <= spec.max_side or value % SIZE_MULTIPLE:
            raise InvalidRequest(
                f"{name} must be a multiple of {SIZE_MULTIPLE} in {spec.min_side}..{spec.max_side} for {spec.name}",
                param=f"body.{name}",
            )
    if sampler not in spec.samplers:
        raise InvalidRequest(f"sampler must be one of {', '.join(spec.samplers)}", param="body.sampler")
    if not 1 <= steps <= spec.max_steps[sampler]:
        raise InvalidRequest(
            f"num_inference_steps must be 1..{spec.max_steps[sampler]} for {spec.name} with {sampler}",
            param="body.num_inference_steps",
        )
    if not 0.0 <= guidance <= spec.max_guidance:
        raise InvalidRequest(f"guidance_scale must be 0..{spec.max_guidance}", param="body.guidance_scale")

    warnings: list[JobWarning] = []
    if (num_frames, height, width) != spec.trained:
        warnings.append(
            JobWarning(
                code="untrained_shape",
                message=(
                    f"{num_frames}×{height}×{width} differs from the {spec.trained[0]}×{spec.trained[1]}×"
                    f"{spec.trained[2]} {spec.name} was trained on; expect lower quality"
                ),
            )
        )
    normalized = VideoInput(
        prompt=body.prompt,
        num_frames=num_frames,
        height=height,
        width=width,
        fps=body.fps if body.fps is not None else spec.fps,
        num_inference_steps=steps,
        guidance_scale=float(guidance),
        sampler=sampler,  # type: ignore[arg-type]
        seed=seed,
    )
    return normalized, warnings
