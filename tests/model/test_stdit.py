"""STDiT against the upstream reference vectors (shared/reference/README.md), plus its own contracts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from model.errors import InvalidInput
from model.loading import load_stdit
from model.stdit import STDiT
from tests.model import reference_tolerances

TOL = reference_tolerances.FORWARD  # cross-machine; test_tolerance_catches_exact_gelu shows it stays sharp
MASKS = {"out_mask": "mask", "out_nomask": None, "out_mask_holes": "mask_holes"}


def _config(reference_dir, cfg: str) -> dict:
    config = json.loads((reference_dir / f"stdit_{cfg}.json").read_text())["config"]
    return {k: v for k, v in config.items() if not k.startswith("enable_")}  # upstream-only switches


def _rebuilt(model: STDiT, **changes) -> STDiT:
    """A fresh STDiT with the model's config changed (diffusers' private `_*` config keys dropped)."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    return STDiT.from_config({**config, **changes})


@pytest.fixture(scope="module", params=["A", "B"])
def cfg(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def vectors(reference_dir, cfg) -> dict[str, torch.Tensor]:
    return load_file(reference_dir / f"forward_{cfg}.safetensors")


@pytest.fixture(scope="module")
def model(reference_dir, cfg) -> STDiT:
    return load_stdit(reference_dir / f"stdit_{cfg}.safetensors", _config(reference_dir, cfg))


@pytest.mark.reference
@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_forward_matches_upstream_for_every_mask(reference_dir, cfg, vectors, suffix):
    model = load_stdit(reference_dir / f"stdit_{cfg}.{suffix}", _config(reference_dir, cfg))
    with torch.no_grad():
        for out_key, mask_key in MASKS.items():
            mask = vectors[mask_key] if mask_key else None
            out = model(vectors["x"], vectors["timestep"], vectors["y"], mask)
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, vectors[out_key], **TOL, msg=lambda m, k=out_key: f"{k}: {m}")


@pytest.mark.reference
def test_float64_forward_matches_upstream_float64(model, vectors):
    """In fp64 (same fp32 sin/cos tables and timestep frequencies) only the final fp32 cast and the fp32
    timestep sinusoids differ; the latter carry the other CPU's rounding, hence the same cross-machine TOL."""
    model64 = _rebuilt(model).double().eval()
    model64.load_state_dict(model.state_dict())
    with torch.no_grad():
        for out_key, mask_key in MASKS.items():
            mask = vectors[mask_key] if mask_key else None
            out = model64(vectors["x"].double(), vectors["timestep"], vectors["y"].double(), mask)
            torch.testing.assert_close(out.double(), vectors[f"{out_key}_fp64"], **TOL)


@pytest.mark.reference
def test_tolerance_catches_exact_gelu(model, vectors):
    """The cross-machine tolerance stays sharp: exact GELU instead of upstream's tanh GELU is a real mistake
    (1.2e-4 / 1.6e-4 on A / B here) and must fail the comparison by a wide margin."""
    exact = _rebuilt(model).eval()
    exact.load_state_dict(model.state_dict())
    for block in exact.blocks:
        block.mlp.act.approximate = "none"
    with torch.no_grad():
        out = exact(vectors["x"], vectors["timestep"], vectors["y"], vectors["mask"])
    assert (out - vectors["out_mask"]).abs().max().item() > 4 * TOL["atol"]


@pytest.mark.reference
def test_intermediates_match_upstream(model, vectors):
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda module, args, out: captured.__setitem__(name, out)

    modules = {
        "x_embedder": model.x_embedder,
        "t": model.t_embedder,
        "t0": model.t_block,
        "y_embedder": model.y_embedder,
        "final_layer": model.final_layer,
    }
    modules |= {f"block{i}": block for i, block in enumerate(model.blocks)}
    handles = [m.register_forward_hook(keep(name)) for name, m in modules.items()]
    try:
        with torch.no_grad():
            model(vectors["x"], vectors["timestep"], vectors["y"], vectors["mask"])
    finally:
        for handle in handles:
            handle.remove()
    for name, value in captured.items():
        torch.testing.assert_close(value, vectors[f"inter.{name}"], **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.reference
def test_config_grid_tables_equal_the_checkpoint_buffers(reference_dir, cfg, model):
    """Our sin/cos formula is upstream's (README: 3e-8); not bitwise, as float64 sin/cos round per CPU too."""
    recorded = load_file(reference_dir / f"stdit_{cfg}.safetensors")
    torch.testing.assert_close(model.pos_embed, recorded["pos_embed"], atol=1e-6, rtol=0)
    torch.testing.assert_close(model.pos_embed_temporal, recorded["pos_embed_temporal"], atol=1e-6, rtol=0)


def test_mask_none_equals_all_ones_bitwise(model, vectors):
    ones = torch.ones_like(vectors["mask"])
    with torch.no_grad():
        a = model(vectors["x"], vectors["timestep"], vectors["y"], None)
        b = model(vectors["x"], vectors["timestep"], vectors["y"], ones)
    assert torch.equal(a, b)


def test_short_mask_is_repeated_for_the_null_half(model, vectors):
    """IDDPM passes n mask rows for 2n captions; STDiT repeats them (README item 8)."""
    x = torch.cat([vectors["x"], vectors["x"]])
    t = torch.cat([vectors["timestep"], vectors["timestep"]])
    null = model.y_embedder.y_embedding[None, None].expand_as(vectors["y"])  # [n, 1, L, Cy]
    y = torch.cat([vectors["y"], null])
    with torch.no_grad():
        short = model(x, t, y, vectors["mask"])
        explicit = model(x, t, y, vectors["mask"].repeat(2, 1))
        all_ones = model(x, t, y, torch.ones(4, y.shape[2], dtype=torch.long))
    assert torch.equal(short, explicit)
    assert not torch.allclose(short[2:], all_ones[2:])  # the null rows really are truncated


def test_other_grids_use_rebuilt_tables(model, cfg, vectors):
    """A grid other than input_size behaves exactly like a model configured for that grid."""
    x = vectors["x"][:, :, :2, :4, :6]  # [B, C, 2, 4, 6]: patch grid 2×2×3
    other = _rebuilt(model, input_size=[2, 4, 6]).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("pos_embed")}
    other.load_state_dict(state, strict=False)
    with torch.no_grad():
        out = model(x, vectors["timestep"], vectors["y"], vectors["mask"])
        expected = other(x, vectors["timestep"], vectors["y"], vectors["mask"])
    assert out.shape == (2, 8, 2, 4, 6)
    assert torch.equal(out, expected)
    spatial, temporal = model.pos_embeds((2, 2, 3), torch.device("cpu"), torch.float32)
    assert torch.equal(spatial, other.pos_embed) and torch.equal(temporal, other.pos_embed_temporal)
    config_grid = model._config_grid
    spatial, temporal = model.pos_embeds(config_grid, torch.device("cpu"), torch.float32)
    assert torch.equal(spatial, model.pos_embed) and torch.equal(temporal, model.pos_embed_temporal)


def test_latents_not_divisible_by_the_patch_are_rejected(model, vectors):
    with pytest.raises(InvalidInput, match="not divisible"):
        model(vectors["x"][..., :7], vectors["timestep"], vectors["y"], None)


@pytest.mark.parametrize("cfg_channel", [3, None])
def test_forward_with_cfg_guides_only_the_first_channels(model, vectors, cfg_channel):
    n, scale = 2, 7.0
    null = model.y_embedder.y_embedding[None, None].expand_as(vectors["y"])
    y = torch.cat([vectors["y"], null])
    x = torch.cat([vectors["x"], torch.randn_like(vectors["x"])])  # second half must be ignored
    t = torch.cat([vectors["timestep"], vectors["timestep"]])
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, y, vectors["mask"], scale, cfg_channel)
        raw = model(torch.cat([x[:n], x[:n]]), t, y, vectors["mask"])
    c = 4 if cfg_channel is None else cfg_channel
    mixed = raw[n:, :c] + scale * (raw[:n, :c] - raw[n:, :c])
    assert torch.equal(guided[:n, :c], mixed) and torch.equal(guided[n:, :c], mixed)
    assert torch.equal(guided[:, c:], raw[:, c:])


def test_training_mode_caption_dropout_runs_on_the_tensor_device(model, vectors):
    """Upstream calls .cuda() here; ours draws on the caption's device. p=1 drops every caption."""
    dropping = _rebuilt(model, class_dropout_prob=1.0)
    dropping.load_state_dict(model.state_dict())
    null = model.y_embedder.y_embedding[None, None].expand_as(vectors["y"])
    with torch.no_grad():
        out = dropping.train()(vectors["x"], vectors["timestep"], vectors["y"], None)
        expected = model(vectors["x"], vectors["timestep"], null, None)
    assert torch.equal(out, expected)


def test_save_pretrained_round_trip(model, vectors, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["input_size"] == list(model.input_size) and config["_class_name"] == "STDiT"
    loaded = STDiT.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a = model(vectors["x"], vectors["timestep"], vectors["y"], vectors["mask"])
        b = loaded(vectors["x"], vectors["timestep"], vectors["y"], vectors["mask"])
    assert torch.equal(a, b)


def test_state_dict_layout_matches_upstream_order(reference_dir, cfg, model):
    listing = json.loads((reference_dir / f"stdit_{cfg}.json").read_text())["state_dict"]
    assert [(e["key"], e["shape"]) for e in listing] == [
        (k, list(v.shape)) for k, v in model.state_dict().items()
    ]
    buffers = {name for name, _ in model.named_buffers()}
    assert buffers == {e["key"] for e in listing if e["kind"] == "buffer"}


def test_stdit_xl2_builds_on_meta_with_upstream_keys(reference_dir):
    listing = json.loads((reference_dir / "stdit_xl2_keys.json").read_text())
    config = {k: v for k, v in listing["config"].items() if not k.startswith("enable_")}
    with torch.device("meta"):
        model = STDiT(**config)
    state = model.state_dict()
    assert [(e["key"], e["shape"]) for e in listing["keys"]] == [(k, list(v.shape)) for k, v in state.items()]
    assert len(state) == 550
    assert sum(p.numel() for p in model.parameters()) == 759_620_768 == listing["num_parameters"]
    assert {name for name, _ in model.named_buffers()} == {
        "pos_embed",
        "pos_embed_temporal",
        "y_embedder.y_embedding",
    }
    assert model.x_embedder.proj.weight.is_meta
