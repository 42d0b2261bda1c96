"""One table of request bounds (service/jobs/models.py): a request at each bound of each preset is accepted by
the API's checks, the pipeline and `bora generate` alike; one past it is refused by all three, naming the
field and the limit. The pipeline and CLI get the preset's bounds through worker/limits.py."""

from __future__ import annotations

import json
import shutil

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from model.errors import InvalidInput
from model.pipeline import BoraPipeline
from service.jobs.errors import InvalidRequest
from service.jobs.inputs import normalize
from service.jobs.models import ENVELOPE, MODELS, SIZE_MULTIPLE
from service.jobs.schemas import VideoCreate
from worker.cli import app
from worker.limits import generation_limits

# The smallest request each preset accepts; each case changes one field of it.
SMALL = {"num_frames": 1, "num_inference_steps": 1, "guidance_scale": 0.0}


def cases(name: str) -> list[tuple[str, dict, dict, str]]:
    """(label, at the bound, one past it, the field the refusal must name) for preset `name`."""
    spec = MODELS[name]
    low, high = spec.min_side, spec.max_side
    small = {**SMALL, "height": low, "width": low, "sampler": spec.default_sampler}
    found = [
        ("max frames", {"num_frames": spec.max_frames}, {"num_frames": spec.max_frames + 1}, "num_frames"),
        ("min height", {"height": low}, {"height": low - SIZE_MULTIPLE}, "height"),
        ("max height", {"height": high}, {"height": high + SIZE_MULTIPLE}, "height"),
        ("max width", {"width": high}, {"width": high + SIZE_MULTIPLE}, "width"),
        ("max guidance", {"guidance_scale": spec.max_guidance}, {"guidance_scale": spec.max_guidance + 0.5},
         "guidance_scale"),
    ]
    found += [(f"max steps {sampler}", {"sampler": sampler, "num_inference_steps": steps},
               {"sampler": sampler, "num_inference_steps": steps + 1}, "num_inference_steps")
              for sampler, steps in spec.max_steps.items()]
    return [(label, {**small, **at}, {**small, **past}, field) for label, at, past, field in found]


CASES = [(name, *case) for name in MODELS for case in cases(name)]
IDS = [f"{name}-{label}" for name, label, *_ in CASES]


def api_check(name: str, request: dict) -> None:
    """What POST /v1/videos does before anything is stored: the contract's static bounds, then the model's."""
    body = VideoCreate.model_validate({"prompt": "a beating heart", **request})
    normalize(body, MODELS[name], 0, max_prompt_chars=2000, max_metadata_bytes=4096)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    return BoraPipeline.from_pretrained(tiny_model_dir, device="cpu")


def pipeline_check(pipe: BoraPipeline, name: str, request: dict) -> None:
    pipe.check_inputs(request["num_frames"], request["height"], request["width"], request["num_inference_steps"],
                      request["guidance_scale"], request["sampler"], generation_limits(name))


@pytest.fixture(scope="module")
def preset_dirs(tiny_model_dir, tmp_path_factory):
    """The tiny weights under each preset's name: `bora generate` applies the bounds of the preset a folder
    names (real Bora weights cannot be downloaded here)."""
    dirs = {}
    for name in MODELS:
        folder = tmp_path_factory.mktemp("presets") / name
        shutil.copytree(tiny_model_dir, folder)
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, "name": name}))
        dirs[name] = folder
    return dirs


def generate(folder, request: dict, out) -> object:
    args = ["generate", "x", "--out", str(out), "--model", str(folder), "--device", "cpu", "--seed", "1",
            "--frames", str(request["num_frames"]), "--height", str(request["height"]),
            "--width", str(request["width"]), "--steps", str(request["num_inference_steps"]),
            "--guidance-scale", str(request["guidance_scale"]), "--sampler", request["sampler"]]
    return CliRunner().invoke(app, args)


def test_the_contract_bounds_are_the_envelope_of_the_table():
    schema = VideoCreate.model_json_schema()["properties"]

    def bound(field: str, key: str):
        return next(option[key] for option in schema[field]["anyOf"] if key in option)

    assert bound("num_frames", "maximum") == ENVELOPE.max_frames == max(s.max_frames for s in MODELS.values())
    assert bound("height", "minimum") == ENVELOPE.min_side == min(s.min_side for s in MODELS.values())
    assert bound("width", "maximum") == ENVELOPE.max_side == max(s.max_side for s in MODELS.values())
    assert bound("num_inference_steps", "maximum") == ENVELOPE.max_steps
    assert bound("guidance_scale", "maximum") == ENVELOPE.max_guidance


@pytest.mark.parametrize("name, label, at, past, field", CASES, ids=IDS)
def test_api_and_pipeline_agree_at_and_past_each_bound(tiny_pipe, name, label, at, past, field):
    api_check(name, at)
    pipeline_check(tiny_pipe, name, at)

    with pytest.raises((InvalidRequest, ValidationError)) as refused:
        api_check(name, past)
    assert field in str(refused.value)
    with pytest.raises(InvalidInput, match=rf"^{field}=") as refused_by_pipeline:
        pipeline_check(tiny_pipe, name, past)
    limit = str(at[field]) if field != "height" or label == "max height" else str(MODELS[name].min_side)
    assert limit in str(refused_by_pipeline.value)


@pytest.mark.parametrize("name, label, at, past, field", CASES, ids=IDS)
def test_bora_generate_refuses_past_each_bound(preset_dirs, tmp_path, name, label, at, past, field):
    result = generate(preset_dirs[name], past, tmp_path / "v.mp4")
    assert result.exit_code != 0
    assert f"{field}=" in result.output and not (tmp_path / "v.mp4").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name, label, at, past, field", CASES, ids=IDS)
def test_bora_generate_accepts_each_bound(preset_dirs, tmp_path, name, label, at, past, field):
    result = generate(preset_dirs[name], at, tmp_path / "v.mp4")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "v.mp4").stat().st_size > 0


def test_a_library_call_without_limits_keeps_the_pipeline_fallback(tiny_pipe):
    tiny_pipe.check_inputs(128, 1024, 1024, 1000, 50.0, "ddim")  # LIBRARY_LIMITS: above every preset
    with pytest.raises(InvalidInput, match="num_frames=129"):
        tiny_pipe.check_inputs(129, 64, 64, 10, 7.0, "ddim")
