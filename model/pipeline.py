"""`BoraPipeline`: prompt → uint8 video frames with Bora's STDiT, T5, SD VAE and a diffusion sampler.

diffusers-style: `from_pretrained(dir)` / `save_pretrained(dir)` over a folder of parts
(`transformer/ text_encoder/ tokenizer/ vae/ scheduler/ model_index.json`), `check_inputs` first, then one
method per step (`encode_prompt`, `prepare_latents`, the sampler, `decode_latents`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.attention_broadcast import AttentionBroadcast, AttentionBroadcastConfig
from model.errors import CheckpointError, InvalidInput
from model.loading import load_stdit
from model.presets import LIBRARY_LIMITS, GenerationDefaults, GenerationLimits
from model.schedulers import SAMPLERS, make_sampler
from model.stdit import STDiT
from model.text_encoder import T5TextEncoder
from model.training.objective import epsilon_from_v
from model.vae import VideoVAE

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
T5_SHAPE_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "feed_forward_proj")
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
MAX_SEED = 2**63 - 1
PREDICTION_TYPES = ("epsilon", "v")  # what the transformer's first C output channels are

StepCallback = Callable[["BoraPipeline", int, int, int], None]  # (pipe, step_index, timestep, total_steps)


@dataclass
class BoraPipelineOutput:
    frames: np.ndarray  # uint8 [B, T, H, W, 3]
    seeds: list[int | None]  # the seed of each prompt's generator (None when a generator was passed in)
    token_counts: list[int]  # T5 tokens of each cleaned prompt, </s> included, before truncation
    truncated: list[bool]  # the prompt was cut at the text encoder's `model_max_length`


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (upstream's inference precision); fp32 on CPU, where it is also the fast path."""
    return torch.float16 if device.type == "cuda" else torch.float32


def file_sha256(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _auto_text_encoder_device(path: Path, device: torch.device, defaults: GenerationDefaults,
                              text_encoder_dtype: torch.dtype) -> torch.device:
    """The transformer's device, unless it is a CUDA device on which T5 does not fit (then the CPU)."""
    if device.type != "cuda":
        return device
    from model.memory import plan

    config = json.loads((path / "transformer" / "config.json").read_text())
    t5_config = json.loads((path / "text_encoder" / "config.json").read_text())
    result = plan(torch.cuda.get_device_properties(device).total_memory,
                  {k: v for k, v in config.items() if not k.startswith("_")},
                  defaults.num_frames, defaults.height, defaults.width, text_encoder_dtype=text_encoder_dtype,
                  t5_config={k: t5_config[k] for k in T5_SHAPE_KEYS if k in t5_config})
    if result.text_encoder_on_device:
        return device
    logger.info("text encoder placed on the CPU: %s", "; ".join(result.advice))
    return torch.device("cpu")


class BoraPipeline:
    def __init__(
        self,
        transformer: STDiT,
        text_encoder: T5TextEncoder,
        vae: VideoVAE,
        defaults: GenerationDefaults,
        name: str = "bora",
        weights_sha256: str | None = None,
        prediction_type: str = "epsilon",
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r} must be one of {PREDICTION_TYPES}")
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.vae = vae
        self.defaults = defaults
        self.name = name
        self.weights_sha256 = weights_sha256
        self.prediction_type = prediction_type
        # The null caption for guidance is the model's learned `y_embedding` (upstream `null(n)`).
        self.text_encoder.set_null(transformer.y_embedder.y_embedding)
        self.denoiser = self._as_epsilon(transformer)  # what the sampler calls each step (see `accelerate`)
        self.step_mode = "eager"
        if defaults.attention_broadcast is not None:
            self.enable_attention_broadcast(AttentionBroadcastConfig(*defaults.attention_broadcast))

    @property
    def device(self) -> torch.device:
        return self.transformer.y_embedder.y_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.y_embedder.y_embedding.dtype

    @property
    def multiples(self) -> tuple[int, int]:
        """(frames, sides) must be multiples of these to divide into latent patches (VAE factor × patch)."""
        patch_t, patch_h, _ = self.transformer.config.patch_size
        return patch_t, self.vae.spatial_factor * patch_h

    def accelerate(self, compile: bool = False, cuda_graphs: bool = False) -> None:
        """Choose how each denoising step runs: eager (default), `torch.compile` (the first video per shape
        pays the compile), or replayed CUDA graphs per fixed shape (CUDA only). Same maths either way."""
        if compile and cuda_graphs:
            raise InvalidInput("choose torch.compile or CUDA graphs, not both")
        if (compile or cuda_graphs) and self.transformer.attention_broadcast is not None:
            raise InvalidInput("attention broadcast runs eager steps; disable it before compile or CUDA graphs")
        if cuda_graphs:
            from model.cuda_graphs import CUDAGraphSTDiT

            self.denoiser = self._as_epsilon(CUDAGraphSTDiT(self.transformer))
        elif compile:
            self.denoiser = self._as_epsilon(torch.compile(self.transformer, dynamic=False))
        else:
            self.denoiser = self._as_epsilon(self.transformer)
        self.step_mode = "cuda_graphs" if cuda_graphs else "compile" if compile else "eager"

    def enable_attention_broadcast(self, config: AttentionBroadcastConfig | None = None) -> None:
        """Reuse attention outputs across steps (PAB, `model/attention_broadcast.py`): fewer FLOPs, eager only."""
        if self.step_mode != "eager":
            raise InvalidInput("attention broadcast runs eager steps; it can't follow compile or CUDA graphs")
        self.transformer.attention_broadcast = AttentionBroadcast(config or AttentionBroadcastConfig())

    def disable_attention_broadcast(self) -> None:
        self.transformer.attention_broadcast = None

    def _as_epsilon(self, model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Every sampler expects ε in the first C output channels: a v-prediction model is wrapped to give it."""
        return EpsilonFromV(model) if self.prediction_type == "v" else model

    # -- persistence ------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        text_encoder_device: str | torch.device | None = None,
        text_encoder_dtype: torch.dtype = torch.float32,
    ) -> BoraPipeline:
        """Load a pipeline folder. T5 may stay on the CPU (`text_encoder_device="cpu"`): T5-XXL is ~19 GB in
        fp32 and overflows in fp16, so only its embeddings are moved to the transformer's device. The default
        (None or "auto") puts T5 on a CUDA device only when `model.memory.plan` says it fits there next to the
        DiT and VAE at the folder's default shape, else on the CPU."""
        path = Path(path)
        index_file = path / MODEL_INDEX
        if not index_file.is_file():
            raise CheckpointError(f"{path} is not a Bora pipeline folder: {MODEL_INDEX} is missing")
        index = json.loads(index_file.read_text())
        device = torch.device(device) if device is not None else default_device()
        dtype = torch_dtype or default_dtype(device)
        scheduler = json.loads((path / SCHEDULER_CONFIG).read_text())
        defaults = GenerationDefaults(**scheduler["defaults"])
        if text_encoder_device in (None, "auto"):
            text_encoder_device = _auto_text_encoder_device(path, device, defaults, text_encoder_dtype)
        text_encoder_device = torch.device(text_encoder_device)

        weights = path / "transformer" / "diffusion_pytorch_model.safetensors"
        transformer = load_stdit(path / "transformer", device=device, dtype=dtype)
        text_encoder = T5TextEncoder.from_pretrained(
            path / "text_encoder", path / "tokenizer", device=text_encoder_device, dtype=text_encoder_dtype,
            output_device=device, output_dtype=dtype,
        )
        vae = VideoVAE.from_pretrained(path / "vae", device=device, dtype=dtype)
        return cls(transformer, text_encoder, vae, defaults, name=index.get("name", "bora"),
                   weights_sha256=file_sha256(weights),
                   prediction_type=scheduler.get("prediction_type", "epsilon"))

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.transformer.save_pretrained(path / "transformer")
        self.text_encoder.save_pretrained(path / "text_encoder", path / "tokenizer")
        self.vae.save_pretrained(path / "vae")
        self.save_configs(path)

    def save_configs(self, path: str | Path) -> None:
        """The folder's own files: generation defaults, prediction type and `model_index.json`."""
        path = Path(path)
        (path / "scheduler").mkdir(parents=True, exist_ok=True)
        (path / SCHEDULER_CONFIG).write_text(json.dumps(
            {"defaults": self.defaults.to_dict(), "prediction_type": self.prediction_type}, indent=2))
        (path / MODEL_INDEX).write_text(json.dumps({
            "_class_name": type(self).__name__,
            "name": self.name,
            "transformer": ["model.stdit", "STDiT"],
            "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"],
            "vae": ["diffusers", "AutoencoderKL"],
        }, indent=2))

    # -- steps ------------------------------------------------------------------------------------------

    def check_inputs(self, num_frames: int, height: int, width: int, num_inference_steps: int,
                     guidance_scale: float, sampler: str, limits: GenerationLimits | None = None) -> None:
        """Refuse a request outside `limits` (a preset's, from the service's table; else `LIBRARY_LIMITS`) or
        one whose shape does not divide into latent patches."""
        limits = limits or LIBRARY_LIMITS
        frame_multiple, side_multiple = self.multiples
        if sampler not in SAMPLERS:
            raise InvalidInput(f"sampler={sampler!r} is not one of {sorted(SAMPLERS)}")
        if not 1 <= num_frames <= limits.max_frames or num_frames % frame_multiple:
            raise InvalidInput(f"num_frames={num_frames} must be in 1..{limits.max_frames}"
                               + (f" and a multiple of {frame_multiple}" if frame_multiple > 1 else ""))
        min_side = max(limits.min_side, side_multiple)
        for label, side in (("height", height), ("width", width)):
            if not min_side <= side <= limits.max_side or side % side_multiple:
                raise InvalidInput(f"{label}={side} must be a multiple of {side_multiple} (VAE factor × patch size) "
                                   f"in {min_side}..{limits.max_side}")
        max_steps = limits.max_steps.get(sampler, 0)
        if not 1 <= num_inference_steps <= max_steps:
            raise InvalidInput(f"num_inference_steps={num_inference_steps} must be in 1..{max_steps} with {sampler}")
        if not 0.0 <= guidance_scale <= limits.max_guidance:
            raise InvalidInput(f"guidance_scale={guidance_scale} must be in 0..{limits.max_guidance}")

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """T5 embeddings `y` [n,1,L,C], their mask [n,L] and the null captions [n,1,L,C] for guidance."""
        encoded = self.text_encoder.encode(prompts)
        y = encoded["y"].to(self.device, self.dtype)
        return y, encoded["mask"].to(self.device), self.text_encoder.null(len(prompts)).to(self.device, self.dtype)

    def prepare_latents(self, num_frames: int, height: int, width: int,
                        generators: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """Initial noise in fp32, drawn on the generators' device (CPU) so a seed gives the same video on any
        device. One generator: upstream's single stream; a list: one stream per prompt."""
        factor = self.vae.spatial_factor
        shape = (self.transformer.config.in_channels, num_frames, height // factor, width // factor)
        if isinstance(generators, torch.Generator):
            raise InvalidInput("prepare_latents needs the batch size with a single generator; pass a list")
        noise = [torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in generators]
        return torch.stack(noise).to(self.device)  # [n, C, T, h, w]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        return self.vae.decode(latents.to(self.dtype)).cpu().numpy()  # uint8 [B, T, H, W, 3]

    # -- generation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | Sequence[int] | None = None,
        callback_on_step_end: StepCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        stage_callback: Callable[[str], None] | None = None,
        limits: GenerationLimits | None = None,
    ) -> BoraPipelineOutput:
        """Generate one video per prompt.

        Randomness: `seed` (an int, used as seed+i for prompt i, or one seed per prompt) or `generator` (a list
        of one per prompt, or a single generator for upstream's batch-order stream, used for parity tests).
        `limits`: the request bounds of the served preset (see `check_inputs`).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not p.strip() for p in prompts):
            raise InvalidInput("every prompt must be a non-empty string")
        d = self.defaults
        num_frames = d.num_frames if num_frames is None else num_frames
        height = d.height if height is None else height
        width = d.width if width is None else width
        num_inference_steps = d.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = d.guidance_scale if guidance_scale is None else guidance_scale
        sampler = sampler or d.sampler
        self.check_inputs(num_frames, height, width, num_inference_steps, guidance_scale, sampler, limits)
        generators, seeds = self._generators(len(prompts), generator, seed)
        stage = stage_callback or (lambda _stage: None)

        stage("encoding_text")
        token_info = self.text_encoder.token_counts(prompts)
        y, mask, y_null = self.encode_prompt(prompts)

        stage("denoising")
        if isinstance(generators, torch.Generator):  # upstream order: z0 for the whole batch, then the loop
            shape = (len(prompts), self.transformer.config.in_channels, num_frames,
                     height // self.vae.spatial_factor, width // self.vae.spatial_factor)
            latents = torch.randn(shape, generator=generators, device=generators.device).to(self.device)
        else:
            latents = self.prepare_latents(num_frames, height, width, generators)
        scheduler = make_sampler(sampler, num_inference_steps, guidance_scale, d.cfg_channel)
        if self.transformer.attention_broadcast is not None:
            self.transformer.attention_broadcast.reset()  # a new video: nothing kept from the last one
        step_callback = None
        if callback_on_step_end is not None:
            def step_callback(step_index: int, total: int, timestep: int) -> None:
                callback_on_step_end(self, step_index, timestep, total)
        latents = scheduler.sample(
            self.denoiser, latents, y, y_null, mask, generators,
            callback=step_callback, should_cancel=should_cancel,
        )

        stage("decoding")
        frames = self.decode_latents(latents)
        return BoraPipelineOutput(
            frames=frames, seeds=seeds,
            token_counts=[count for count, _ in token_info], truncated=[cut for _, cut in token_info],
        )

    def _generators(self, n: int, generator, seed) -> tuple[torch.Generator | list[torch.Generator],
                                                                list[int | None]]:
        if generator is not None:
            if isinstance(generator, torch.Generator):
                return generator, [None] * n
            if len(generator) != n:
                raise InvalidInput(f"got {len(generator)} generators for {n} prompts")
            return list(generator), [None] * n
        if seed is None:
            seeds = [int(torch.randint(0, 2**31 - 1, ()).item()) for _ in range(n)]
        elif isinstance(seed, int):
            seeds = [seed + i for i in range(n)]
        else:
            seeds = [int(s) for s in seed]
            if len(seeds) != n:
                raise InvalidInput(f"got {len(seeds)} seeds for {n} prompts")
        if any(not 0 <= s <= MAX_SEED for s in seeds):
            raise InvalidInput(f"seeds must be in 0..{MAX_SEED}")
        return [torch.Generator().manual_seed(s) for s in seeds], seeds


class EpsilonFromV(torch.nn.Module):
    """A v-prediction transformer as the samplers see it: its first C output channels turned into ε (the rest,
    the learned variance, unchanged); the caption preparation is the wrapped model's own."""

    def __init__(self, model: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model

    def prepare_condition(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.prepare_condition(*args, **kwargs)  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, y: Any, mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(x, timestep, y, mask)  # [B, 2C, T, H, W]
        if out.shape[0] != x.shape[0]:  # a prepared guidance condition: the model doubled the n shared latents
            x = torch.cat([x, x])  # [2n, C, T, H, W]
        channels = x.shape[1]
        return torch.cat([epsilon_from_v(out[:, :channels], x, timestep), out[:, channels:]], dim=1)
