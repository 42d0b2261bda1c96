"""STDiT: the spatial-temporal diffusion transformer of Open-Sora 1.0, which Bora fine-tunes.

A port of upstream `opensora/models/stdit/stdit.py` (Bora commit c08bb69) for inference in plain
PyTorch. State-dict names, shapes and order are upstream's, so `ema.pt` files load as they are.
Each block runs spatial self-attention within a frame, temporal self-attention across frames at each
spatial site, cross-attention to the caption and an MLP, all modulated by the timestep (adaLN-single).
The numbered quirks cited below are those of `shared/reference/README.md` ("Upstream behaviour").

Differences from upstream, none of which changes the maths of an fp32 eval forward:
- attention is `scaled_dot_product_attention`;
- the caption path (caption MLP, packing of the kept tokens, every block's cross-attention keys and
  values) is `prepare_condition`, which a sampler runs once per video and passes to every step as `y`;
  samples with equal kept-token counts attend together without padding or a block-diagonal mask
  (README item 7), and for short captions the q and output projections are folded into the keys and
  values (`CaptionKV`);
- temporal attention reads the token grid in place instead of rearranging to [(B S), T, D] and back;
- any latent grid divisible by the patch works: the sin/cos tables are rebuilt (and cached) for grids
  other than `input_size` instead of failing to broadcast;
- the model dtype is the parameters' dtype (`model.to(dtype)`), not a constructor argument; timesteps
  go to the fp32 sinusoids without a detour through that dtype (identical for integer timesteps in fp16);
- training-mode caption dropout draws on the caption's device instead of `.cuda()`;
- no sequence parallelism, gradient checkpointing or optional kernels (flash-attn, apex LayerNorm).
- optional pyramid attention broadcast at sampling time (`attention_broadcast`, off unless a pipeline's
  defaults or its caller turn it on): attention outputs reused across steps, model/attention_broadcast.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from model.attention_broadcast import AttentionBroadcast
from model.errors import InvalidInput
from model.layers import (
    Attention,
    CaptionEmbedder,
    CaptionKV,
    DropPath,
    Mlp,
    MultiHeadCrossAttention,
    PatchEmbed3D,
    T2IFinalLayer,
    TimestepEmbedder,
    get_1d_sincos_pos_embed,
    get_2d_sincos_pos_embed,
    layer_norm,
    t2i_modulate,
)

# Grids other than the configured one get their own tables; keep a few (one per requested video size).
_POS_EMBED_CACHE_SIZE = 8


@dataclass
class CaptionCondition:
    """Everything a forward needs from the captions, computed once per video by `STDiT.prepare_condition`:
    the caption MLP output packed to its kept tokens and every block's cross-attention keys and values.
    A sampler passes it as `y` to each step (the caption does not change over a sampling run)."""

    batch: int
    blocks: list[CaptionKV]


class STDiTBlock(nn.Module):
    """One STDiT block (README item 5). Submodules are registered in upstream's order."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = layer_norm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = layer_norm(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.attn_temp = Attention(hidden_size, num_heads)

    def forward(
        self,
        x: torch.Tensor,
        caption: CaptionKV,
        t0: torch.Tensor,
        num_frames: int,
        tpe: torch.Tensor | None = None,
        guidance_pairs: bool = False,
        broadcast: AttentionBroadcast | None = None,
        index: int = 0,
    ) -> torch.Tensor:
        """x [B, T*S, D]; caption: this block's prepared keys/values; t0 [B, 6D]; tpe [1, T, D] (block 0).
        broadcast: the run's attention-broadcast state (block `index`'s kept outputs), or None.

        guidance_pairs: x and t0 hold one row per guidance pair (n rows for a 2n-row caption); both halves of
        a pair have the same input, so the self-attentions run once and the rows are doubled before the
        cross-attention, the first place where the halves differ. Returns [2n, T*S, D] then.
        """
        batch, num_tokens, dim = x.shape
        modulation = (self.scale_shift_table[None] + t0.reshape(batch, 6, -1))  # [B, 6, D]
        shift_msa, scale_msa, gate_msa, _, _, _ = modulation.chunk(6, dim=1)  # each [B, 1, D]

        def attend(kind: str, compute) -> torch.Tensor:
            return compute() if broadcast is None else broadcast.attend(kind, index, compute)

        # spatial attention: over the S tokens of each frame
        def spatial() -> torch.Tensor:
            x_m = t2i_modulate(self.norm1(x), shift_msa, scale_msa)  # [B, T*S, D]
            x_s = self.attn(x_m.view(batch * num_frames, num_tokens // num_frames, dim))  # [B*T, S, D]
            return x_s.view(batch, num_tokens, dim)

        x = self._gated_residual(x, gate_msa, attend("spatial", spatial))

        # temporal attention: over the T tokens of each spatial site; raw residual input, same gate_msa
        temporal = attend("temporal", lambda: self.attn_temp.temporal(x, num_frames, tpe))  # [B, T*S, D]
        x = self._gated_residual(x, gate_msa, temporal)
        if guidance_pairs:
            x, modulation = torch.cat([x, x]), torch.cat([modulation, modulation])  # [2n, T*S, D], [2n, 6, D]
        _, _, _, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)

        # cross-attention to the caption: no norm, no modulation, no gate
        x = x + attend("cross", lambda: self.cross_attn(x, caption))

        # MLP
        x_m = t2i_modulate(self.norm2(x), shift_mlp, scale_mlp)
        return self._gated_residual(x, gate_mlp, self.mlp(x_m))

    def _gated_residual(self, x: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`x + drop_path(gate * out)`; one fused pass when drop-path is inactive (always in eval)."""
        if self.training and self.drop_path.drop_prob > 0:
            return x + self.drop_path(gate * out)
        return torch.addcmul(x, gate, out)


class STDiT(ModelMixin, ConfigMixin):
    """Open-Sora 1.0 STDiT. Bora's STDiT-XL/2 is the default width/depth with `input_size=(40, 32, 32)`,
    `space_scale=0.5`.

    `input_size` is the latent grid (T, H, W) the `pos_embed` buffers are built for; other grids divisible
    by `patch_size` work too. `no_temporal_pos_emb` is kept for config compatibility and, as upstream,
    has no effect.
    """

    @register_to_config
    def __init__(
        self,
        input_size: tuple[int, int, int] = (1, 32, 32),
        in_channels: int = 4,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        pred_sigma: bool = True,
        drop_path: float = 0.0,
        no_temporal_pos_emb: bool = False,
        caption_channels: int = 4096,
        model_max_length: int = 120,
        space_scale: float = 1.0,
        time_scale: float = 1.0,
    ):
        super().__init__()
        # JSON configs give lists back; use tuples internally.
        input_size = tuple(int(v) for v in input_size)
        patch_size = tuple(int(v) for v in patch_size)
        if len(input_size) != 3 or len(patch_size) != 3:
            raise ValueError(f"input_size {input_size} and patch_size {patch_size} must be (T, H, W)")
        if any(i % p for i, p in zip(input_size, patch_size, strict=True)):
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must be a multiple of 4 (2D sin/cos table)")

        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if pred_sigma else in_channels
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.input_size = input_size
        self.space_scale = space_scale
        self.time_scale = time_scale
        self._config_grid = tuple(i // p for i, p in zip(input_size, patch_size, strict=True))
        self.attention_broadcast: AttentionBroadcast | None = None  # PAB state of the current run, when on
        self._pos_embed_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

        # sin/cos tables (fp32, from float64 numpy); built on the CPU even under a meta device context
        num_frames, grid_h, grid_w = self._config_grid
        self.register_buffer("pos_embed", self._spatial_table(grid_h, grid_w))  # [1, S, D]
        self.register_buffer("pos_embed_temporal", self._temporal_table(num_frames))  # [1, T, D]

        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.y_embedder = CaptionEmbedder(
            in_channels=caption_channels,
            hidden_size=hidden_size,
            uncond_prob=class_dropout_prob,
            token_num=model_max_length,
        )
        # upstream: torch.linspace(0, drop_path, depth) in fp32, then .item() (which meta tensors lack)
        drop_rates = np.linspace(0, drop_path, depth, dtype=np.float32).tolist()
        self.blocks = nn.ModuleList(
            [STDiTBlock(hidden_size, num_heads, mlp_ratio, drop_path=drop_rates[i]) for i in range(depth)]
        )
        self.final_layer = T2IFinalLayer(hidden_size, int(np.prod(patch_size)), self.out_channels)
        self.initialize_weights()

    # ---------------------------------------------------------------------------------------------
    # Initialisation (upstream's, for freshly built models; checkpoints overwrite it)
    # ---------------------------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        # patch embedding like nn.Linear instead of nn.Conv3d
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.cross_attn.proj.weight, 0)
            nn.init.constant_(block.cross_attn.proj.bias, 0)
            nn.init.constant_(block.attn_temp.proj.weight, 0)
            nn.init.constant_(block.attn_temp.proj.bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    # ---------------------------------------------------------------------------------------------
    # Positional tables
    # ---------------------------------------------------------------------------------------------

    def _spatial_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        table = get_2d_sincos_pos_embed(self.hidden_size, (grid_h, grid_w), scale=self.space_scale)
        return torch.from_numpy(table).float().unsqueeze(0)  # [1, Hp*Wp, D] fp32 on the CPU

    def _temporal_table(self, num_frames: int) -> torch.Tensor:
        table = get_1d_sincos_pos_embed(self.hidden_size, num_frames, scale=self.time_scale)
        return torch.from_numpy(table).float().unsqueeze(0)  # [1, Nt, D] fp32 on the CPU

    def pos_embeds(self, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype):
        """(spatial [1, S, D], temporal [1, T, D]) for a patch grid (Nt, Nh, Nw).

        The buffers serve the configured grid; other grids get tables built the same way (so equal to
        the buffers on the configured grid), cached per (grid, device, dtype).
        """
        if grid == self._config_grid:
            return self.pos_embed.to(device, dtype), self.pos_embed_temporal.to(device, dtype)
        key = (grid, device, dtype)
        if key not in self._pos_embed_cache:
            if len(self._pos_embed_cache) >= _POS_EMBED_CACHE_SIZE:
                self._pos_embed_cache.clear()
            num_frames, grid_h, grid_w = grid
            self._pos_embed_cache[key] = (
                self._spatial_table(grid_h, grid_w).to(device, dtype),
                self._temporal_table(num_frames).to(device, dtype),
            )
        return self._pos_embed_cache[key]

    # ---------------------------------------------------------------------------------------------
    # Forward
    # ---------------------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor | CaptionCondition,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict noise (and the variance interpolation when `pred_sigma`).

        Args:
            x: latent video [B, C, T, H, W]; T, H, W divisible by `patch_size`.
            timestep: diffusion timesteps [B] (any numeric dtype).
            y: caption embeddings [B, 1, L, Cy], or the `CaptionCondition` that `prepare_condition` made
                from them (then `mask` was given there). A condition of 2B rows with B latents means
                guidance pairs: caption rows b and b+B both see latent b and timestep b (upstream's
                `cat([x, x])`), and the output has 2B rows; the self-attentions of block 0, which see
                only the shared input, run once per pair.
            mask: caption mask [B', L] with 0/1 values (or None = all tokens kept). When B' < B the mask
                is repeated along the batch (upstream's `mask.repeat`, README item 8).

        Returns:
            [B, C_out, T, H, W] in float32, C_out = 2C when `pred_sigma`.
        """
        dtype = self.dtype
        x = x.to(dtype)
        batch = x.shape[0]
        if isinstance(y, CaptionCondition):
            if mask is not None:
                raise InvalidInput("a prepared caption condition already holds its mask; pass mask=None")
            caption = y
        else:
            caption = self.prepare_condition(y, mask)
        guidance_pairs = caption.batch == 2 * batch  # rows b and b+n of the caption share latent b
        if caption.batch != batch and not guidance_pairs:
            raise InvalidInput(f"caption condition for a batch of {caption.batch}, latents for {batch}")
        timestep = timestep[:batch]  # with guidance pairs, both halves of a pair share the timestep
        grid = self._patch_grid(x.shape)
        num_frames, grid_h, grid_w = grid
        num_spatial = grid_h * grid_w
        pos_embed, pos_embed_temporal = self.pos_embeds(grid, x.device, dtype)

        # embeddings
        x = self.x_embedder(x)  # [B, N, D], N = T*S
        x = x.unflatten(1, (num_frames, num_spatial)) + pos_embed  # [B, T, S, D]
        x = x.view(batch, num_frames * num_spatial, self.hidden_size)  # [B, N, D]

        t = self.t_embedder(timestep, dtype=x.dtype)  # [B, D]
        t0 = self.t_block(t)  # [B, 6D]

        broadcast = None if self.training else self.attention_broadcast  # reuse is for sampling, never training
        if broadcast is not None:
            broadcast.begin_step(int(timestep[0]), (*x.shape, caption.batch))
        for i, block in enumerate(self.blocks):
            if i == 0:
                x = block(x, caption.blocks[0], t0, num_frames, pos_embed_temporal, guidance_pairs,
                          broadcast, i)  # [B', N, D]
                if guidance_pairs:
                    t, t0 = torch.cat([t, t]), torch.cat([t0, t0])  # [2n, D], [2n, 6D]
            else:
                x = block(x, caption.blocks[i], t0, num_frames, broadcast=broadcast, index=i)  # [B', N, D]

        x = self.final_layer(x, t)  # [B, N, pt*ph*pw*C_out]
        x = self.unpatchify(x, grid)  # [B, C_out, T, H, W]
        return x.to(torch.float32)

    def prepare_condition(
        self, y: torch.Tensor, mask: torch.Tensor | None = None, fold: bool | None = None
    ) -> CaptionCondition:
        """The caption part of a forward, done once: caption MLP on all L tokens, the tokens with mask≠0
        kept (any positions, README item 7), and each block's cross-attention keys/values over them.

        y [B, 1, L, Cy]; mask [B', L] (repeated along the batch when B' < B, README item 8) or None.
        `fold` forces the cross-attention form (see `CaptionKV`); None picks the cheaper one.
        """
        if y.ndim != 4 or y.shape[1] != 1:
            raise InvalidInput(f"expected captions [B, 1, L, C], got {list(y.shape)}")
        batch, _, length, _ = y.shape
        tokens = self.y_embedder(y.to(self.dtype)).squeeze(1)  # [B, 1, L, D] -> [B, L, D]
        if mask is None:
            groups, rows = [tokens], None
        else:
            keep = self._caption_keep(mask, batch, length).to(tokens.device)  # bool [B, L]
            counts = keep.sum(1).tolist()
            if min(counts) == 0:
                raise InvalidInput("every caption mask must keep at least one token")
            by_count: dict[int, list[int]] = {}
            for row, count in enumerate(counts):
                by_count.setdefault(count, []).append(row)
            groups = [tokens[members][keep[members]].view(len(members), count, -1)  # [G, L_g, D]
                      for count, members in by_count.items()]
            rows = None if len(by_count) == 1 else [
                torch.tensor(members, device=tokens.device) for members in by_count.values()]
        blocks = [block.cross_attn.prepare(groups, rows, fold) for block in self.blocks]
        return CaptionCondition(batch=batch, blocks=blocks)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None,
        cfg_scale: float,
        cfg_channel: int | None = None,
    ) -> torch.Tensor:
        """Classifier-free guidance as upstream's IDDPM `forward_with_cfg` (README item 9).

        `y` stacks [cond; null] captions (2n rows); only `x[:n]` is used, fed twice. The first
        `cfg_channel` output channels (default C_out // 2, all eps channels) become
        `uncond + cfg_scale * (cond - uncond)` in both halves; the other channels keep each half's output.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)  # [2n, C, T, H, W]
        model_out = self.forward(combined, timestep, y, mask)  # [2n, C_out, T, H, W]
        if cfg_channel is None:
            cfg_channel = model_out.shape[1] // 2
        eps, rest = model_out[:, :cfg_channel], model_out[:, cfg_channel:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

    # ---------------------------------------------------------------------------------------------
    # Helpers of forward
    # ---------------------------------------------------------------------------------------------

    def _patch_grid(self, shape: torch.Size) -> tuple[int, int, int]:
        if len(shape) != 5 or shape[1] != self.in_channels:
            raise InvalidInput(f"expected latents [B, {self.in_channels}, T, H, W], got {list(shape)}")
        size = tuple(shape[2:])
        if any(s % p for s, p in zip(size, self.patch_size, strict=True)):
            raise InvalidInput(f"latent size (T, H, W)={size} is not divisible by patch {self.patch_size}")
        return tuple(s // p for s, p in zip(size, self.patch_size, strict=True))

    @staticmethod
    def _caption_keep(mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """Bool [B, L] of the kept caption tokens; a [B', L] mask with B' < B is repeated (README item 8)."""
        mask = mask.reshape(mask.shape[0], -1)  # [B', L] (also accepts upstream's [B', 1, 1, L])
        if mask.shape[1] != length or batch % mask.shape[0]:
            raise InvalidInput(f"mask {list(mask.shape)} does not fit captions {[batch, length]}")
        if mask.shape[0] != batch:
            mask = mask.repeat(batch // mask.shape[0], 1)  # [B, L]; the null half reuses the prompt masks
        return mask != 0

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, Nt*Nh*Nw, pt*ph*pw*C_out] (channel fastest) -> [B, C_out, Nt*pt, Nh*ph, Nw*pw]."""
        num_t, num_h, num_w = grid
        pt, ph, pw = self.patch_size
        channels = self.out_channels
        x = x.reshape(x.shape[0], num_t, num_h, num_w, pt, ph, pw, channels)  # [B, Nt, Nh, Nw, pt, ph, pw, C]
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, Nt, pt, Nh, ph, Nw, pw]
        return x.reshape(x.shape[0], channels, num_t * pt, num_h * ph, num_w * pw)  # [B, C, T, H, W]
