"""A request checked against the served model's bounds (service/jobs/models.py), with every default filled in."""

from __future__ import annotations

import json

from service.jobs.errors import InvalidRequest
from service.jobs.models import SIZE_MULTIPLE, ModelSpec
from service.jobs.schemas import JobWarning, VideoCreate, VideoInput


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
