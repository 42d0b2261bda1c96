"""The lean step: a prepared caption condition, valid-token cross-attention (folded or not) and guidance
pairs give the same outputs as the plain forward on the upstream reference model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from model.errors import InvalidInput
from model.loading import load_stdit
from tests.model import reference_tolerances


@pytest.fixture(scope="module")
def model(reference_dir):
    config = json.loads((reference_dir / "stdit_B.json").read_text())["config"]
    config = {k: v for k, v in config.items() if not k.startswith("enable_")}
    return load_stdit(reference_dir / "stdit_B.safetensors", config)


@pytest.fixture(scope="module")
def vectors(reference_dir):
    return load_file(reference_dir / "forward_B.safetensors")


@pytest.mark.reference
@pytest.mark.parametrize("mask_key", ["mask", "mask_holes", None])
@pytest.mark.parametrize("fold", [True, False])
def test_prepared_condition_matches_upstream_in_both_cross_attention_forms(model, vectors, mask_key, fold):
    mask = vectors[mask_key] if mask_key else None
    out_key = {"mask": "out_mask", "mask_holes": "out_mask_holes", None: "out_nomask"}[mask_key]
    with torch.no_grad():
        condition = model.prepare_condition(vectors["y"], mask, fold=fold)
        assert all(kv.folded is fold for kv in condition.blocks)
        out = model(vectors["x"], vectors["timestep"], condition)
    torch.testing.assert_close(out, vectors[out_key], **reference_tolerances.FORWARD)


def test_samples_with_different_caption_lengths_attend_in_separate_groups(model, vectors):
    with torch.no_grad():
        condition = model.prepare_condition(vectors["y"], vectors["mask"])  # 5 and 8 kept tokens
    kv = condition.blocks[0]
    assert kv.lengths == [5, 8] and [r.tolist() for r in kv.rows] == [[0], [1]]
    with torch.no_grad():
        same = model.prepare_condition(vectors["y"], vectors["mask"][:1])  # repeated: one group, no gather
    assert same.blocks[0].rows is None and same.blocks[0].lengths == [5]


def test_guidance_pairs_share_block_zero_and_equal_the_doubled_batch(model, vectors):
    x, t = vectors["x"][:1], vectors["timestep"][:1]
    y = torch.cat([vectors["y"][:1], model.y_embedder.y_embedding[None, None]])  # [cond; null]
    mask = vectors["mask"][:1]
    with torch.no_grad():
        condition = model.prepare_condition(y, mask)
        doubled = model(torch.cat([x, x]), torch.cat([t, t]), y, mask)
        paired = model(x, torch.cat([t, t]), condition)
    assert paired.shape == doubled.shape
    torch.testing.assert_close(paired, doubled, atol=1e-6, rtol=1e-6)


def test_condition_batch_must_fit_the_latents(model, vectors):
    with torch.no_grad():
        condition = model.prepare_condition(vectors["y"], vectors["mask"])
        with pytest.raises(InvalidInput, match="caption condition for a batch of 2, latents for 3"):
            model(torch.cat([vectors["x"], vectors["x"][:1]]), torch.zeros(3), condition)
        with pytest.raises(InvalidInput, match="already holds its mask"):
            model(vectors["x"], vectors["timestep"], condition, vectors["mask"])
        with pytest.raises(InvalidInput, match="at least one token"):
            model.prepare_condition(vectors["y"], torch.zeros_like(vectors["mask"]))


def test_caption_work_runs_once_per_sampling_run(model, vectors):
    from model.schedulers import make_sampler

    calls = []
    handle = model.y_embedder.register_forward_hook(lambda *a: calls.append(1))
    try:
        y_null = model.y_embedder.y_embedding[None, None]
        z = torch.randn(1, 4, 6, 8, 12, generator=torch.Generator().manual_seed(0))
        make_sampler("ddim", 4).sample(model, z, vectors["y"][:1], y_null, vectors["mask"][:1])
    finally:
        handle.remove()
    assert len(calls) == 1


@pytest.mark.slow
def test_forward_on_a_prepared_condition_compiles_without_graph_breaks(model, vectors):
    """`torch.compile` traces the whole step as one graph (dynamo only; no inductor build here)."""
    with torch.no_grad():
        condition = model.prepare_condition(vectors["y"], vectors["mask"])  # two caption-length groups
        explanation = torch._dynamo.explain(model)(vectors["x"], vectors["timestep"], condition)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
