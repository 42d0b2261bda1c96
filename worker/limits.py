"""A served preset's request bounds, from the service's one table, in the form the pipeline checks."""

from __future__ import annotations

from model.presets import GenerationLimits
from service.jobs.models import MODELS


def generation_limits(model: str) -> GenerationLimits | None:
    """The bounds of preset `model` (service/jobs/models.py); None for a model the table does not know
    (a custom pipeline folder): the pipeline then applies its library limits."""
    spec = MODELS.get(model)
    if spec is None:
        return None
    return GenerationLimits(
        max_frames=spec.max_frames,
        min_side=spec.min_side,
        max_side=spec.max_side,
        max_steps=dict(spec.max_steps),
        max_guidance=spec.max_guidance,
    )
