"""Memory plan for one generation: bytes per stage (T5, STDiT, VAE decode) from parameter counts and
activation sizes, and where each part should live on a device of a given size (`bora doctor`).

Weights are counted exactly by building each architecture on the `meta` device (no memory, no download).
Peak activations of inference (no autograd) are estimated from the largest tensors alive at once:
- STDiT: at the MLP of a block the residual x, the LayerNorm and modulated copies and the fc1 and GELU
  outputs (4D each) are alive: `TRANSFORMER_ACTIVATION_WIDTHS` = 11 token-widths of D, plus the prepared
  caption condition, plus the spatial attention scores where the backend materialises them (CPU).
- VAE decode (frame-wise, `VideoVAE.micro_batch_size` frames per call): the full-resolution up block,
  where a 256-channel H×W input, its GroupNorm and SiLU outputs and the 128-channel conv outputs are alive:
  `VAE_ACTIVATION_MAPS` = 6 maps of 256×H×W per frame.
- T5 encoder: 120 tokens; activations are negligible next to its weights (4.8 B parameters for XXL).
bench/memory_plan.py measures the same stages (CPU: peak RSS; CUDA: max_memory_allocated) and prints the
estimate next to the measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TRANSFORMER_ACTIVATION_WIDTHS = 11
VAE_ACTIVATION_MAPS = 6
VAE_FULL_RES_CHANNELS = 256
CUDA_CONTEXT_BYTES = 600 * 2**20  # CUDA context, cuBLAS/cuDNN workspaces: not visible to torch's allocator
HEADROOM = 0.9  # plan to use at most 90% of a device: the caching allocator fragments

# T5-XXL encoder (google/t5-v1_1-xxl) as Bora uses it
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def count_parameters(module: torch.nn.Module) -> int:
    """Parameters and buffers (the state a device must hold)."""
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())


def stdit_parameters(config: dict) -> int:
    from model.stdit import STDiT

    with torch.device("meta"):
        return count_parameters(STDiT(**config))


def t5_encoder_parameters(config: dict = T5_XXL) -> int:
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        return count_parameters(T5EncoderModel(T5Config(**config)))


def vae_decoder_parameters(config: dict | None = None) -> int:
    """The decoder half of an SD `AutoencoderKL` (post_quant_conv + decoder), default: sd-vae-ft-ema."""
    from diffusers import AutoencoderKL

    config = config or dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    return count_parameters(vae.decoder) + count_parameters(vae.post_quant_conv)


@dataclass(frozen=True)
class StageMemory:
    stage: str
    weights: int  # bytes
    activations: int  # peak bytes beyond the weights while the stage runs

    @property
    def total(self) -> int:
        return self.weights + self.activations


def transformer_memory(config: dict, batch: int, latent: tuple[int, int, int], dtype: torch.dtype,
                       caption_tokens: int = 120, materialized_scores: bool = False) -> StageMemory:
    """STDiT at `batch` rows (2 per prompt with guidance) on a latent (T, h, w).

    materialized_scores: the attention backend keeps the spatial B·T·H·S×S scores (CPU SDPA on strided
    inputs does); flash / memory-efficient CUDA kernels do not."""
    size = dtype_bytes(dtype)
    patch = config.get("patch_size", (1, 2, 2))
    hidden = config.get("hidden_size", 1152)
    tokens = 1
    for extent, p in zip(latent, patch, strict=True):
        tokens *= extent // p
    condition = config.get("depth", 28) * batch * caption_tokens * 2 * hidden  # K and V per block (or folded)
    activations = TRANSFORMER_ACTIVATION_WIDTHS * batch * tokens * hidden + condition
    if materialized_scores:
        frames = latent[0] // patch[0]
        spatial = tokens // frames
        activations += batch * frames * config.get("num_heads", 16) * spatial * spatial
    activations *= size
    return StageMemory("transformer", stdit_parameters(config) * size, activations)


def text_encoder_memory(dtype: torch.dtype, batch: int = 1, tokens: int = 120,
                        config: dict = T5_XXL) -> StageMemory:
    size = dtype_bytes(dtype)
    # hidden states, attention scores of one layer and the gated FFN of one layer
    activations = batch * tokens * (4 * config["d_model"] + config["num_heads"] * tokens + 3 * config["d_ff"])
    return StageMemory("text_encoder", t5_encoder_parameters(config) * size, activations * size)


def vae_decode_memory(dtype: torch.dtype, height: int, width: int, frames_per_call: int,
                      config: dict | None = None) -> StageMemory:
    size = dtype_bytes(dtype)
    per_frame = VAE_ACTIVATION_MAPS * VAE_FULL_RES_CHANNELS * height * width
    return StageMemory("vae_decode", vae_decoder_parameters(config) * size, frames_per_call * per_frame * size)


@dataclass
class MemoryPlan:
    device_bytes: int
    stages: list[StageMemory]
    text_encoder_on_device: bool
    fits: bool
    peak: int  # bytes on the device at the worst moment
    advice: list[str] = field(default_factory=list)


def plan(device_bytes: int, stdit_config: dict, num_frames: int, height: int, width: int, prompts: int = 1,
         dtype: torch.dtype = torch.float16, text_encoder_dtype: torch.dtype = torch.float32,
         vae_frames_per_call: int = 4, vae_factor: int = 8, t5_config: dict | None = None) -> MemoryPlan:
    """Where the parts of one batch of `prompts` videos (with guidance) go on a device of `device_bytes`.

    The DiT and the VAE stay resident (the worker keeps them loaded); T5 goes on the device only if it fits
    next to them with room for the largest activation peak, else it runs on the CPU and only its
    embeddings move (BORA_TEXT_ENCODER_DEVICE=cpu).
    """
    latent = (num_frames, height // vae_factor, width // vae_factor)
    dit = transformer_memory(stdit_config, 2 * prompts, latent, dtype)
    vae = vae_decode_memory(dtype, height, width, vae_frames_per_call)
    t5 = text_encoder_memory(text_encoder_dtype, batch=prompts,
                             config=dict(T5_XXL, **t5_config) if t5_config else T5_XXL)
    budget = int(device_bytes * HEADROOM) - CUDA_CONTEXT_BYTES
    resident = dit.weights + vae.weights
    worst_activation = max(dit.activations, vae.activations)
    t5_on_device = resident + t5.weights + max(worst_activation, t5.activations) <= budget
    peak = resident + worst_activation + (t5.weights if t5_on_device else 0)
    fits = peak <= budget
    advice = []
    if not t5_on_device:
        advice.append(f"run T5 on the CPU (BORA_TEXT_ENCODER_DEVICE=cpu): its {gib(t5.weights)} of weights "
                      f"({text_encoder_dtype}) do not fit next to the DiT and VAE")
    if not fits:
        if vae.activations > dit.activations and vae_frames_per_call > 1:
            advice.append("decode fewer frames per VAE call (VideoVAE micro_batch_size=1)")
        advice.append(f"this shape needs about {gib(peak + CUDA_CONTEXT_BYTES)} at {gib(budget)} usable: use "
                      "fewer frames, a smaller side, or a larger device")
    return MemoryPlan(device_bytes, [t5, dit, vae], t5_on_device, fits, peak, advice)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
