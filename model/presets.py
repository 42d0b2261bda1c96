"""Named model set-ups: `bora` (upstream's inference settings), `tiny` (random weights for CPU and tests) and
`demo` (a small model trained on synthetic clips, shipped in `demo/weights/`).

A preset fixes the STDiT architecture and the generation defaults. `make_tiny` writes a complete pipeline
folder from fixed seeds with no download, so `make run` and the tests have a real model to serve.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class GenerationDefaults:
    """What a request gets when it leaves a field out; also the shape the weights were trained on."""

    num_frames: int
    height: int
    width: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    cfg_channel: int | None
    sampler: str = "iddpm"
    # Pyramid attention broadcast (spatial, temporal, cross: recompute every n steps), None = off; see
    # model/attention_broadcast.py. A default of the model because its effect on quality is measured per model.
    attention_broadcast: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.attention_broadcast is not None:  # JSON gives a list
            object.__setattr__(self, "attention_broadcast", tuple(self.attention_broadcast))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GenerationLimits:
    """Bounds of a request, per preset. The service's table (service/jobs/models.py) is the one source: the
    worker and `bora generate` build these from it and hand them to `BoraPipeline(..., limits=...)`. Used as a
    library, the pipeline falls back to `LIBRARY_LIMITS`. Shape multiples are not here: they follow from the
    loaded model (VAE factor × patch size) and the pipeline always checks them."""

    max_frames: int
    min_side: int
    max_side: int
    max_steps: dict[str, int]  # per sampler
    max_guidance: float


# What the pipeline accepts when no preset's limits are passed: generous, only to keep a library call from
# asking for something absurd (memory, not quality, is the bound).
LIBRARY_LIMITS = GenerationLimits(
    max_frames=128, min_side=16, max_side=1024,
    max_steps={"iddpm": 1000, "ddim": 1000, "dpm-solver++": 1000}, max_guidance=50.0,
)


# Bora's STDiT-XL/2 as its configs build it (reference README, `stdit_xl2_keys.json`).
BORA_STDIT = dict(
    input_size=(40, 32, 32), in_channels=4, patch_size=(1, 2, 2), hidden_size=1152, depth=28, num_heads=16,
    mlp_ratio=4.0, class_dropout_prob=0.1, pred_sigma=True, drop_path=0.0, no_temporal_pos_emb=False,
    caption_channels=4096, model_max_length=120, space_scale=0.5, time_scale=1.0,
)
# Upstream's sample config: 40×256×256 at 8 fps, IDDPM 100 steps, CFG 7 on the first 3 eps channels.
BORA_DEFAULTS = GenerationDefaults(
    num_frames=40, height=256, width=256, fps=8, num_inference_steps=100, guidance_scale=7.0, cfg_channel=3,
)

TINY_T5_DIM = 32
TINY_STDIT = dict(
    input_size=(16, 8, 8), in_channels=4, patch_size=(1, 2, 2), hidden_size=64, depth=2, num_heads=4,
    mlp_ratio=4.0, class_dropout_prob=0.1, pred_sigma=True, drop_path=0.0, no_temporal_pos_emb=False,
    caption_channels=TINY_T5_DIM, model_max_length=120, space_scale=0.5, time_scale=1.0,
)
TINY_DEFAULTS = GenerationDefaults(
    num_frames=16, height=64, width=64, fps=8, num_inference_steps=10, guidance_scale=7.0, cfg_channel=3,
)

# The demo model (`demo/`, trained on procedural clips in about an hour on 2 CPU cores): 16 frames of 64×64,
# an 8× VAE with 4 latent channels (latents 16×8×8), a random 2-layer T5 of width 64, v-prediction.
DEMO_T5_DIM = 64
DEMO_STDIT = dict(
    input_size=(16, 8, 8), in_channels=4, patch_size=(1, 2, 2), hidden_size=128, depth=4, num_heads=4,
    mlp_ratio=4.0, class_dropout_prob=0.1, pred_sigma=True, drop_path=0.0, no_temporal_pos_emb=False,
    caption_channels=DEMO_T5_DIM, model_max_length=120, space_scale=1.0, time_scale=1.0,
)
DEMO_DEFAULTS = GenerationDefaults(
    num_frames=16, height=64, width=64, fps=8, num_inference_steps=15, guidance_scale=4.0, cfg_channel=None,
    sampler="dpm-solver++",  # picked by bench/sampler_quality.py (README: Speed)
)

PRESETS = {"bora": BORA_DEFAULTS, "tiny": TINY_DEFAULTS, "demo": DEMO_DEFAULTS}


def make_tiny(path: str | Path, seed: int = 0) -> Path:
    """Write the `tiny` pipeline folder: random STDiT, T5, tokenizer and VAE from fixed seeds, offline."""
    import torch

    from model.pipeline import BoraPipeline
    from model.stdit import STDiT
    from model.text_encoder import T5TextEncoder
    from model.tiny import build_tiny_t5, build_tiny_tokenizer, build_tiny_vae
    from model.vae import VideoVAE

    path = Path(path)
    parts = path / ".parts"
    build_tiny_tokenizer(parts / "tokenizer")
    build_tiny_t5(parts / "text_encoder", d_model=TINY_T5_DIM, seed=seed)
    build_tiny_vae(parts / "vae", seed=seed)

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = STDiT(**TINY_STDIT)
    # Upstream zero-initialises the modulation, cross-attention and final projections; a tiny random model
    # would then output zeros, so draw them like the reference vectors do and the video shows structure.
    with torch.no_grad():
        for tensor in transformer.parameters():
            if not tensor.any():
                tensor.normal_(0.0, 0.05, generator=generator)
    pipe = BoraPipeline(
        transformer=transformer.eval(),
        text_encoder=T5TextEncoder.from_pretrained(parts / "text_encoder", parts / "tokenizer"),
        vae=VideoVAE.from_pretrained(parts / "vae"),
        defaults=TINY_DEFAULTS,
        name="tiny",
    )
    pipe.save_pretrained(path)
    _remove_tree(parts)
    return path


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def assemble_bora(checkpoint: str | Path, vae_dir: str | Path, t5_dir: str | Path, out: str | Path,
                  stdit_config: dict | None = None) -> Path:
    """Build a `bora` pipeline folder from the three downloads users have: the Bora checkpoint (any format
    `load_state_dict` reads), the `sd-vae-ft-ema` folder (config.json + diffusion_pytorch_model.safetensors or
    .bin) and the `t5-v1_1-xxl` folder (config.json, `spiece.model`, weights as pytorch_model.bin, shards +
    index, or safetensors; full T5ForConditionalGeneration or encoder-only). Every part is checked and loaded
    before anything is written; a mismatch raises CheckpointError. The folder keeps T5's encoder only and
    the tokenizer as `tokenizer.json`, so loading it later needs no sentencepiece."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import T5EncoderModel

    from model.errors import CheckpointError
    from model.loading import load_stdit
    from model.pipeline import BoraPipeline
    from model.text_encoder import T5TextEncoder, load_tokenizer
    from model.vae import VideoVAE

    config = dict(stdit_config or BORA_STDIT)
    vae_dir, t5_dir = Path(vae_dir), Path(t5_dir)
    vae_config = _read_config(vae_dir, "VAE")
    if (vae_config.get("latent_channels") != config["in_channels"]
            or len(vae_config.get("block_out_channels", ())) != 4):
        raise CheckpointError(f"{vae_dir} is not an SD VAE with {config['in_channels']} latent channels and 8× "
                              f"spatial downsampling (like sd-vae-ft-ema); its config.json has "
                              f"latent_channels={vae_config.get('latent_channels')}")
    t5_config = _read_config(t5_dir, "T5")
    if t5_config.get("model_type") != "t5" or t5_config.get("d_model") != config["caption_channels"]:
        raise CheckpointError(f"{t5_dir} is a {t5_config.get('model_type')!r} model with "
                              f"d_model={t5_config.get('d_model')} but the STDiT expects a T5 with "
                              f"caption_channels={config['caption_channels']} (t5-v1_1-xxl has 4096)")
    tokenizer = load_tokenizer(t5_dir)
    if len(tokenizer) > t5_config.get("vocab_size", 0):
        raise CheckpointError(f"{t5_dir}: the tokenizer has {len(tokenizer)} tokens but T5's embedding only "
                              f"{t5_config.get('vocab_size')}")

    transformer = load_stdit(checkpoint, config, device="cpu", dtype=torch.float32)
    t5 = _load_complete(T5EncoderModel, t5_dir, "T5 encoder", dtype=torch.float32)
    vae = _load_complete(AutoencoderKL, vae_dir, "VAE", torch_dtype=torch.float32)
    pipe = BoraPipeline(
        transformer=transformer,
        text_encoder=T5TextEncoder(t5, tokenizer, device="cpu"),
        vae=VideoVAE(vae),
        defaults=BORA_DEFAULTS,
        name="bora",
    )
    pipe.save_pretrained(out)
    return Path(out)


def _read_config(folder: Path, label: str) -> dict:
    import json

    from model.errors import CheckpointError

    if not folder.is_dir():
        raise CheckpointError(f"{label} folder {folder} does not exist")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{label} folder {folder} has no config.json")
    return json.loads(config_file.read_text())


def _load_complete(model_class, folder: Path, label: str, **kwargs):
    """`model_class.from_pretrained(folder)`, refusing what transformers/diffusers only warn about: weights
    missing from the files (they would be left random). Weights the class does not use (T5's decoder) are
    skipped."""
    from model.errors import CheckpointError

    try:
        model, info = model_class.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                                  **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{label} folder {folder}: cannot load its weights ({e})") from e
    missing = sorted(info["missing_keys"])
    if missing:
        more = f", ... ({len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{label} folder {folder}: {len(missing)} weights missing from its files: "
                              f"{', '.join(missing[:5])}{more}")
    return model.eval()
