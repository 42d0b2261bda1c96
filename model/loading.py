"""STDiT checkpoints: find them, read them safely, check their keys, build the model from them.

Formats (a file, or a folder holding one of them):
- PyTorch pickles (`.pt`, `.pth`, `.bin`, `.ckpt`) read with `torch.load(weights_only=True)`, memory-mapped
  when the file allows. Plain state dicts (upstream's `ema.pt`) or wrapped in `{"ema"|"state_dict"|
  "model"|"module": ...}`; `module.` / `_orig_mod.` prefixes (DDP, torch.compile) are stripped.
- `.safetensors`, single or sharded with a `*.index.json` (`weight_map`).
- Folders, looked up in this order: diffusers `diffusion_pytorch_model.safetensors` (+ index), upstream's
  training output (`<folder>/model/` with shards and an index: what upstream's loader reads from a folder),
  a single index, a single `.safetensors`, `ema.pt`, a single `.pt`/`.pth`/`.bin`.

Upstream names are kept. As upstream's loader does, `pos_embed` and `pos_embed_temporal` are never taken
from a checkpoint: the model rebuilds them from its config (README item 3).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model.errors import CheckpointError
from model.layers import get_1d_sincos_pos_embed, get_2d_sincos_pos_embed
from model.stdit import STDiT

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WRAPPER_KEYS = ("ema", "state_dict", "model", "module")  # tried in this order
KEY_PREFIXES = ("module.", "_orig_mod.")
DERIVED_BUFFERS = ("pos_embed", "pos_embed_temporal")  # rebuilt from the config, never loaded
BUFFER_KEYS = (*DERIVED_BUFFERS, "y_embedder.y_embedding")  # state-dict entries that are not parameters
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_LISTED_KEYS = 5  # how many key names an error message quotes


@dataclass(frozen=True)
class CheckpointFiles:
    """Where a checkpoint's tensors are: `format` names the layout, `files` are read and merged."""

    format: str
    files: tuple[Path, ...]


# ---------------------------------------------------------------------------------------------------
# Finding and reading
# ---------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> CheckpointFiles:
    """Find the weight files of a checkpoint file or folder (see the module docstring for the order)."""
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _sharded(path)
        if path.suffix == ".safetensors":
            return CheckpointFiles("safetensors", (path,))
        if path.suffix in PICKLE_SUFFIXES:
            return CheckpointFiles("pytorch", (path,))
        raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors, .pt, .pth, .bin)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")

    if (path / DIFFUSERS_WEIGHTS).is_file():
        return CheckpointFiles("diffusers", (path / DIFFUSERS_WEIGHTS,))
    if (path / f"{DIFFUSERS_WEIGHTS}.index.json").is_file():
        return _sharded(path / f"{DIFFUSERS_WEIGHTS}.index.json", "diffusers-sharded")
    if (path / "model").is_dir():
        inner = resolve_checkpoint(path / "model")
        return CheckpointFiles(f"training-folder/{inner.format}", inner.files)
    indexes = sorted(path.glob("*.index.json"))
    if len(indexes) == 1:
        return _sharded(indexes[0])
    safetensors = sorted(path.glob("*.safetensors"))
    if not indexes and len(safetensors) == 1:
        return CheckpointFiles("safetensors", (safetensors[0],))
    if (path / "ema.pt").is_file():
        return CheckpointFiles("pytorch", (path / "ema.pt",))
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not indexes and not safetensors and len(pickles) == 1:
        return CheckpointFiles("pytorch", (pickles[0],))
    found = sorted(p.name for p in path.iterdir())
    raise CheckpointError(
        f"{path}: cannot tell which weights to load; found {found[:10]}"
        + (" ..." if len(found) > 10 else "")
        + " (expected one index, one .safetensors, ema.pt, one .pt/.pth/.bin, or a model/ folder)"
    )


def _sharded(index_path: Path, format_name: str | None = None) -> CheckpointFiles:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: unreadable shard index ({e})") from e
    shards = tuple(index_path.parent / name for name in dict.fromkeys(weight_map.values()))
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path}: shards listed in the index are missing: {missing[:_LISTED_KEYS]}"
        )
    if format_name is None:
        kind = "safetensors" if all(s.suffix == ".safetensors" for s in shards) else "pytorch"
        format_name = f"{kind}-sharded"
    return CheckpointFiles(format_name, shards)


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read it as a PyTorch state dict with weights_only=True "
            f"(only tensors and plain containers are accepted): {e}"
        ) from e
    return _unwrap(obj, path)


def _unwrap(obj: object, source: Path) -> dict[str, torch.Tensor]:
    """Descend through `{"ema"|"state_dict"|"model"|"module": ...}` wrappers to the tensors."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            keys = sorted(str(k) for k in obj)[:10]
            raise CheckpointError(f"{source}: no state dict found (top-level keys: {keys})")
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a state dict, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in KEY_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _read(checkpoint: CheckpointFiles) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for path in checkpoint.files:
        for key, tensor in _read_file(path).items():
            state_dict[_strip_prefixes(key)] = tensor
    if not state_dict:
        raise CheckpointError(f"{checkpoint.files[0]}: the checkpoint holds no tensors")
    return state_dict


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file or folder, on the CPU, under upstream names."""
    return _read(resolve_checkpoint(path))


# ---------------------------------------------------------------------------------------------------
# Building STDiT
# ---------------------------------------------------------------------------------------------------


def load_stdit(
    path: str | Path,
    config: dict | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> STDiT:
    """Build an eval-mode STDiT from a checkpoint without allocating random weights first.

    `config` is STDiT's constructor keywords; without it a folder's `config.json` (diffusers
    `save_pretrained`) is used, else the config is inferred from the weights (`infer_stdit_config`).
    Raises CheckpointError when keys are missing, unexpected, or of the wrong shape.
    """
    checkpoint = resolve_checkpoint(path)
    state_dict = _read(checkpoint)
    if config is None:
        config_file = Path(path) / "config.json"
        if Path(path).is_dir() and config_file.is_file():
            config = json.loads(config_file.read_text())
        else:
            config = infer_stdit_config(state_dict)
            logger.warning("no STDiT config given for %s; inferred %s", path, config)

    with torch.device("meta"):
        model = STDiT.from_config(config)  # no weights allocated; the pos-embed tables are real (CPU)
    state_dict = {k: v for k, v in state_dict.items() if k not in DERIVED_BUFFERS}
    _check_keys(model, state_dict, path)
    state_dict.update({name: getattr(model, name) for name in DERIVED_BUFFERS})  # from the config
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device).eval()


def _check_keys(model: STDiT, state_dict: dict[str, torch.Tensor], source: str | Path) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in DERIVED_BUFFERS}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{k} {list(state_dict[k].shape)} != {list(expected[k])}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k]
    )
    if not (missing or unexpected or wrong_shape):
        return
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            more = f", ... ({len(keys) - _LISTED_KEYS} more)" if len(keys) > _LISTED_KEYS else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:_LISTED_KEYS])}{more}")
    raise CheckpointError(f"{source} does not match the STDiT config: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------
# Config inference
# ---------------------------------------------------------------------------------------------------


def infer_stdit_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """STDiT constructor keywords read off upstream-named weights.

    Exact: in_channels, patch_size, hidden_size (x_embedder), depth (blocks.N), mlp_ratio (mlp.fc1),
    caption_channels and model_max_length (y_embedding), pred_sigma (final_layer width).
    From the pos-embed tables when present: input_size (the grid; the column half of the spatial table
    repeats every Wp tokens), space_scale and time_scale (from the lowest-frequency sine).
    Not in the weights at all: num_heads. Rule: head_dim 72 when hidden % 72 == 0 (STDiT-XL: 1152 -> 16
    heads), else head_dim 64 when hidden % 64 == 0 (DiT-S/B/L), else 1 head. Pass a config when unsure.
    Training-only settings (class_dropout_prob, drop_path) keep their defaults.
    """
    return _infer(state_dict)[0]


def _infer(state_dict: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """(config, names of the values that are guesses rather than read off the weights)."""
    required = ("x_embedder.proj.weight", "y_embedder.y_embedding", "final_layer.linear.weight")
    absent = [k for k in required if k not in state_dict]
    if absent:
        raise CheckpointError(f"not an STDiT state dict: missing {absent}")
    hidden, in_channels, *patch = state_dict["x_embedder.proj.weight"].shape  # [D, C, pt, ph, pw]
    patch_size = [int(p) for p in patch]
    token_num, caption_channels = state_dict["y_embedder.y_embedding"].shape  # [L, Cy]
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // math.prod(patch_size)
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(
            f"final layer predicts {out_channels} channels for {in_channels} input channels"
        )
    block_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    guessed = ["num_heads"]
    if hidden % 72 == 0:
        num_heads = hidden // 72
    elif hidden % 64 == 0:
        num_heads = hidden // 64
    else:
        num_heads = 1

    config = {
        "input_size": [1, 32, 32],
        "in_channels": int(in_channels),
        "patch_size": patch_size,
        "hidden_size": int(hidden),
        "depth": max(block_ids) + 1 if block_ids else 0,
        "num_heads": num_heads,
        "mlp_ratio": fc1.shape[0] / hidden if fc1 is not None else 4.0,
        "class_dropout_prob": 0.1,
        "pred_sigma": out_channels == 2 * in_channels,
        "drop_path": 0.0,
        "no_temporal_pos_emb": False,
        "caption_channels": int(caption_channels),
        "model_max_length": int(token_num),
        "space_scale": 1.0,
        "time_scale": 1.0,
    }
    spatial = state_dict.get("pos_embed")
    temporal = state_dict.get("pos_embed_temporal")
    if spatial is None or temporal is None:
        return config, [*guessed, "input_size", "space_scale", "time_scale"]

    spatial = spatial.reshape(-1, hidden).double().numpy()  # [S, D]
    temporal = temporal.reshape(-1, hidden).double().numpy()  # [Nt, D]
    grid_h, grid_w = _spatial_grid(spatial)
    config["input_size"] = [temporal.shape[0] * patch_size[0], grid_h * patch_size[1], grid_w * patch_size[2]]
    # lowest-frequency sine of position 1: sin(ω/scale), ω = 10000^(-(d/2-1)/(d/2)), d the table width
    if grid_w > 1 or grid_h > 1:
        d = hidden // 2
        value = spatial[1, d // 2 - 1] if grid_w > 1 else spatial[grid_w, d + d // 2 - 1]
        config["space_scale"] = _scale_from_sine(value, d)
    else:
        guessed.append("space_scale")
    if temporal.shape[0] > 1:
        config["time_scale"] = _scale_from_sine(temporal[1, hidden // 2 - 1], hidden)
    else:
        guessed.append("time_scale")

    rebuilt_s = get_2d_sincos_pos_embed(hidden, (grid_h, grid_w), config["space_scale"])
    rebuilt_t = get_1d_sincos_pos_embed(hidden, temporal.shape[0], config["time_scale"])
    if np.abs(rebuilt_s - spatial).max() > 1e-4 or np.abs(rebuilt_t - temporal).max() > 1e-4:
        logger.warning("the checkpoint's pos-embeds are not sin/cos tables of the inferred grid and scales")
        guessed += ["input_size", "space_scale", "time_scale"]
    return config, guessed


def _spatial_grid(table: np.ndarray) -> tuple[int, int]:
    """(Hp, Wp) of a spatial table: the column half first repeats the w=0 token at s = Wp (README item 1)."""
    num_tokens, dim = table.shape
    column = table[:, : dim // 2]
    for s in range(1, num_tokens):
        if np.abs(column[s] - column[0]).max() < 1e-6 and num_tokens % s == 0:
            return num_tokens // s, s
    return 1, num_tokens


def _scale_from_sine(value: float, dim: int) -> float:
    half = dim // 2
    omega = 1.0 / 10000 ** ((half - 1) / half)
    return float(f"{omega / math.asin(value):.6g}")


# ---------------------------------------------------------------------------------------------------
# Inspection and conversion
# ---------------------------------------------------------------------------------------------------


def inspect_checkpoint(path: str | Path) -> dict:
    """A JSON-able summary: format, files, key/parameter counts, dtypes, inferred config."""
    checkpoint = resolve_checkpoint(path)
    state_dict = _read(checkpoint)
    num_elements = sum(t.numel() for t in state_dict.values())
    num_buffer = sum(state_dict[k].numel() for k in BUFFER_KEYS if k in state_dict)
    summary: dict = {
        "path": str(path),
        "format": checkpoint.format,
        "files": [str(f) for f in checkpoint.files],
        "num_keys": len(state_dict),
        "num_parameters": num_elements - num_buffer,
        "num_buffer_elements": num_buffer,
        "num_elements": num_elements,
        "bytes": sum(t.numel() * t.element_size() for t in state_dict.values()),
        "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in state_dict.values())),
    }
    try:
        config, guessed = _infer(state_dict)
        summary.update(config=config, guessed=guessed)
    except CheckpointError as e:
        summary.update(config=None, guessed=[], config_error=str(e))
    return summary


def convert_to_safetensors(src: str | Path, dst: str | Path) -> Path:
    """Write a checkpoint (any format above) as one `.safetensors` file with the same names and values.

    Tensors sharing storage (tied or views) are cloned and every tensor made contiguous, as
    safetensors requires. The file is written next to `dst` and renamed into place.
    """
    dst = Path(dst)
    state_dict = load_state_dict(src)
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        storage = tensor.untyped_storage().data_ptr()
        if (tensor.numel() and storage in seen) or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        elif tensor.numel():
            seen.add(storage)
        tensors[key] = tensor
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    tmp.replace(dst)
    return dst
