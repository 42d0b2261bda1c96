"""Checkpoint formats, key checks, config inference, inspection and conversion (model/loading.py)."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.errors import CheckpointError
from model.loading import (
    convert_to_safetensors,
    infer_stdit_config,
    inspect_checkpoint,
    load_state_dict,
    load_stdit,
)
from model.stdit import STDiT
from tests.model import reference_tolerances


@pytest.fixture(scope="module")
def state_a(reference_dir) -> dict[str, torch.Tensor]:
    return load_file(reference_dir / "stdit_A.safetensors")


@pytest.fixture(scope="module")
def config_a(reference_dir) -> dict:
    config = json.loads((reference_dir / "stdit_A.json").read_text())["config"]
    return {k: v for k, v in config.items() if not k.startswith("enable_")}


def _shard(state: dict, parts: int) -> list[dict]:
    keys = list(state)
    return [{k: state[k] for k in keys[i::parts]} for i in range(parts)]


def _write_index(folder, shards: list[dict], names: list[str], index_name: str) -> None:
    weight_map = {k: name for shard, name in zip(shards, names, strict=True) for k in shard}
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _write_format(kind: str, state: dict, root, reference_dir, config: dict):
    """Write `state` in one checkpoint layout under `root`; return the path to load and its format."""
    root.mkdir(parents=True, exist_ok=True)
    if kind == "pth":
        shutil.copy(reference_dir / "stdit_A.pth", root / "w.pth")
        return root / "w.pth", "pytorch"
    if kind in ("ema", "model", "state_dict"):
        torch.save({kind: state, "step": 3}, root / "w.pt")
        return root / "w.pt", "pytorch"
    if kind == "ddp":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, root / "w.ckpt")
        return root / "w.ckpt", "pytorch"
    if kind == "legacy-pickle":
        torch.save(state, root / "w.bin", _use_new_zipfile_serialization=False)
        return root / "w.bin", "pytorch"
    if kind == "safetensors":
        save_file(state, root / "w.safetensors")
        return root / "w.safetensors", "safetensors"
    if kind == "safetensors-sharded":
        shards = _shard(state, 3)
        names = [f"model-{i:05d}-of-00003.safetensors" for i in range(1, 4)]
        for shard, name in zip(shards, names, strict=True):
            save_file(shard, root / name)
        _write_index(root, shards, names, "model.safetensors.index.json")
        return root / "model.safetensors.index.json", "safetensors-sharded"
    if kind == "training-folder":  # upstream's epochX-global_stepY/: model/ shards (+ ema.pt, optimizer...)
        (root / "model").mkdir()
        shards = _shard(state, 2)
        names = ["pytorch_model-00001.bin", "pytorch_model-00002.bin"]
        for shard, name in zip(shards, names, strict=True):
            torch.save(shard, root / "model" / name)
        _write_index(root / "model", shards, names, "pytorch_model.bin.index.json")
        (root / "running_states.json").write_text("{}")
        return root, "training-folder/pytorch-sharded"
    if kind == "folder-single-safetensors":
        save_file(state, root / "ema.safetensors")
        return root, "safetensors"
    if kind == "diffusers":
        model = STDiT.from_config(config)
        model.load_state_dict(state)
        model.save_pretrained(root)
        return root, "diffusers"
    raise AssertionError(kind)


FORMATS = [
    "pth",
    "ema",
    "model",
    "state_dict",
    "ddp",
    "legacy-pickle",
    "safetensors",
    "safetensors-sharded",
    "training-folder",
    "folder-single-safetensors",
    "diffusers",
]


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_loads_identical_tensors(kind, state_a, config_a, reference_dir, tmp_path):
    path, expected_format = _write_format(kind, state_a, tmp_path / kind, reference_dir, config_a)
    loaded = load_state_dict(path)
    assert sorted(loaded) == sorted(state_a)
    for key, tensor in state_a.items():
        assert torch.equal(loaded[key], tensor), key
    assert inspect_checkpoint(path)["format"] == expected_format


@pytest.mark.reference
@pytest.mark.parametrize("kind", ["training-folder", "diffusers", "ddp"])
def test_load_stdit_from_folders_and_wrappers_matches_reference_output(
    kind, state_a, config_a, reference_dir, tmp_path
):
    path, _ = _write_format(kind, state_a, tmp_path / kind, reference_dir, config_a)
    # the diffusers folder brings its own config.json; the others get the config passed in
    model = load_stdit(path, None if kind == "diffusers" else config_a)
    assert model.config.num_heads == 4 and not model.training
    vectors = load_file(reference_dir / "forward_A.safetensors")
    with torch.no_grad():
        out = model(vectors["x"], vectors["timestep"], vectors["y"], vectors["mask"])
    torch.testing.assert_close(out, vectors["out_mask"], **reference_tolerances.FORWARD)


def test_load_stdit_casts_and_rebuilds_pos_embeds_from_the_config(state_a, config_a, tmp_path):
    state = dict(state_a)
    state["pos_embed"] = torch.zeros_like(state["pos_embed"])  # ignored, as upstream (README item 3)
    state.pop("pos_embed_temporal")  # not needed either
    save_file(state, tmp_path / "w.safetensors")
    model = load_stdit(tmp_path / "w.safetensors", config_a, dtype=torch.bfloat16)
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    rebuilt = STDiT.from_config(config_a)  # the tables as this machine computes them from the config
    assert torch.equal(model.pos_embed, rebuilt.pos_embed.to(torch.bfloat16))
    assert torch.equal(model.pos_embed_temporal, rebuilt.pos_embed_temporal.to(torch.bfloat16))
    assert torch.equal(model.y_embedder.y_embedding, state_a["y_embedder.y_embedding"].to(torch.bfloat16))
    assert not any(t.is_meta for t in model.state_dict().values())


def test_key_mismatch_names_missing_unexpected_and_misshapen_keys(state_a, config_a, tmp_path):
    state = dict(state_a)
    del state["blocks.1.attn.qkv.weight"]
    state["blocks.7.attn.qkv.weight"] = torch.zeros(3)
    state["final_layer.linear.bias"] = torch.zeros(5)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_stdit(tmp_path / "bad.safetensors", config_a)
    message = str(err.value)
    assert "1 missing: blocks.1.attn.qkv.weight" in message
    assert "1 unexpected: blocks.7.attn.qkv.weight" in message
    assert "final_layer.linear.bias [5] != [32]" in message


def test_key_mismatch_lists_only_a_few_keys(state_a, config_a, tmp_path):
    save_file({k: v for k, v in state_a.items() if not k.startswith("blocks.")}, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"missing: .*\.\.\. \(\d+ more\)"):
        load_stdit(tmp_path / "w.safetensors", config_a)


def test_unsafe_pickles_are_refused(state_a, tmp_path):
    torch.save({"state_dict": state_a, "args": argparse.Namespace(lr=1)}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict(tmp_path / "unsafe.pt")


def test_unrecognised_inputs_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_state_dict(tmp_path / "absent.pt")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_state_dict(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="cannot tell which weights"):
        load_state_dict(tmp_path)
    torch.save({"optimizer": {"lr": torch.ones(1)}}, tmp_path / "opt.pt")
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_state_dict(tmp_path / "opt.pt")


def test_convert_to_safetensors_round_trip(reference_dir, state_a, tmp_path):
    dst = convert_to_safetensors(reference_dir / "stdit_A.pth", tmp_path / "out" / "stdit_A.safetensors")
    converted = load_file(dst)
    assert sorted(converted) == sorted(state_a)
    assert all(torch.equal(converted[k], v) for k, v in state_a.items())


def test_convert_handles_shared_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    state = {"a": base, "tied": base, "view": base[1], "transposed": base.t()}
    torch.save(state, tmp_path / "shared.pt")
    converted = load_file(convert_to_safetensors(tmp_path / "shared.pt", tmp_path / "shared.safetensors"))
    for key, tensor in state.items():
        assert torch.equal(converted[key], tensor), key


def test_inspect_reports_counts_dtypes_and_config(reference_dir, config_a):
    summary = inspect_checkpoint(reference_dir / "stdit_A.pth")
    assert summary["format"] == "pytorch"
    assert summary["num_keys"] == 56
    assert summary["num_parameters"] == 221_920
    assert summary["num_elements"] == 221_920 + 1_536
    assert summary["dtypes"] == {"float32": 56}
    assert summary["guessed"] == ["num_heads"]
    expected = {**config_a, "num_heads": 1}  # hidden 64 -> the head_dim-64 rule; the real model has 4
    assert {k: summary["config"][k] for k in expected} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()
    }
    json.dumps(summary)


@pytest.mark.parametrize("cfg", ["A", "B"])
def test_infer_config_reads_grid_and_scales_off_the_tables(reference_dir, cfg):
    config = infer_stdit_config(load_file(reference_dir / f"stdit_{cfg}.safetensors"))
    recorded = json.loads((reference_dir / f"stdit_{cfg}.json").read_text())["config"]
    for key in (
        "input_size",
        "patch_size",
        "hidden_size",
        "depth",
        "in_channels",
        "caption_channels",
        "model_max_length",
        "space_scale",
        "time_scale",
        "pred_sigma",
    ):
        assert config[key] == recorded[key], key


def test_infer_config_num_heads_rule_for_stdit_xl2(reference_dir):
    listing = json.loads((reference_dir / "stdit_xl2_keys.json").read_text())
    state = {e["key"]: torch.empty(e["shape"], device="meta") for e in listing["keys"]}
    state.pop("pos_embed")
    config = infer_stdit_config(state)
    assert (config["num_heads"], config["depth"], config["hidden_size"]) == (16, 28, 1152)
    assert (config["caption_channels"], config["model_max_length"]) == (4096, 120)
