"""Building blocks of STDiT (Open-Sora 1.0 / Bora `opensora/models/layers/blocks.py`), in plain PyTorch.

Module and parameter names match upstream exactly, so upstream checkpoints load without renaming.
Attention runs through `torch.nn.functional.scaled_dot_product_attention` (the same softmax attention
as upstream's explicit `q @ k^T` path and its xformers block-diagonal cross-attention).
The quirks reproduced here are numbered as in `shared/reference/README.md` ("Upstream behaviour").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------------
# Sine/cosine tables (MAE style, as upstream): built in numpy float64, stored by the caller as float32.
# ---------------------------------------------------------------------------------------------------


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """`[sin(p·ω_k), cos(p·ω_k)]` for k < embed_dim/2 with `ω_k = 10000^(-k/(embed_dim/2))`; -> [M, D]."""
    if embed_dim % 2:
        raise ValueError(f"sin/cos embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # [D/2]
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # [M, D/2], outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [M, D]


def get_1d_sincos_pos_embed(embed_dim: int, length: int, scale: float = 1.0) -> np.ndarray:
    """Temporal table `sincos_D(t / scale)` for t < length (README item 2); -> [length, D] float64."""
    pos = np.arange(0, length)[..., None] / scale  # [length, 1] float64, as upstream
    return get_1d_sincos_pos_embed_from_grid(embed_dim, pos)


def get_2d_sincos_pos_embed(embed_dim: int, grid_hw: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """Spatial table for a Hp×Wp patch grid (README item 1); -> [Hp*Wp, D] float64.

    Token `s = h*Wp + w` gets `[sincos_{D/2}(w/scale), sincos_{D/2}(h/scale)]`: the column half first.
    Positions are float32 before the float64 einsum, exactly as upstream computes them.
    """
    if embed_dim % 2:
        raise ValueError(f"2D sin/cos embedding needs an even dimension, got {embed_dim}")
    grid_h_size, grid_w_size = grid_hw
    grid_h = np.arange(grid_h_size, dtype=np.float32) / scale
    grid_w = np.arange(grid_w_size, dtype=np.float32) / scale
    col, row = np.meshgrid(grid_w, grid_h)  # each [Hp, Wp]; col[h, w] = w/scale, row[h, w] = h/scale
    emb_col = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, col)  # [Hp*Wp, D/2], row-major h*Wp+w
    emb_row = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, row)  # [Hp*Wp, D/2]
    return np.concatenate([emb_col, emb_row], axis=1)  # [Hp*Wp, D]


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """PixArt's adaLN-single modulation `x * (1 + scale) + shift` (README item 5), as one fused pass over x."""
    return torch.addcmul(shift, x, 1 + scale)


def layer_norm(hidden_size: int) -> nn.LayerNorm:
    """Every STDiT LayerNorm: no affine parameters, eps 1e-6 (README item 5)."""
    return nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)


# ---------------------------------------------------------------------------------------------------
# General-purpose layers
# ---------------------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's `DropPath`); the identity in eval or at rate 0."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # [B, 1, ..., 1]
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class Mlp(nn.Module):
    """timm's `Mlp` without dropout: fc1 -> GELU(tanh) -> fc2 (keys `fc1.*`, `fc2.*`)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed3D(nn.Module):
    """Video to patch tokens with a strided Conv3d: [B, C, T, H, W] -> [B, N, D], N = Nt*Nh*Nw."""

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [B, D, Nt, Nh, Nw]
        return x.flatten(2).transpose(1, 2)  # [B, Nt*Nh*Nw, D], tokens in (t, h, w) row-major order


class Attention(nn.Module):
    """Multi-head self-attention: over the second axis of [B', L, D] (`forward`, spatial in STDiT) or over
    the frames of a [B, T*S, D] token grid read in place (`temporal`)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim)  # [B', L, 3, H, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B', H, L, hd]
        x = F.scaled_dot_product_attention(q, k, v)  # [B', H, L, hd], scale 1/sqrt(hd)
        x = x.transpose(1, 2).reshape(batch, length, dim)  # [B', L, D]
        return self.proj(x)

    def temporal(self, x: torch.Tensor, num_frames: int, tpe: torch.Tensor | None = None) -> torch.Tensor:
        """Attention across the T frames at each of the S sites of x [B, T*S, D] -> [B, T*S, D].

        Upstream rearranges to [(B S), T, D] and back; the projections don't care about token order, so
        here q, k, v are strided views of one qkv product and only the attention output is copied once.
        `tpe` [1, T, D] is added to the attention input only (block 0, README item 2).
        """
        batch, num_tokens, dim = x.shape
        spatial = num_tokens // num_frames
        if tpe is not None:
            x = (x.view(batch, num_frames, spatial, dim) + tpe[:, :, None]).view(batch, num_tokens, dim)
        qkv = self.qkv(x).view(batch, num_frames, spatial, 3, self.num_heads, self.head_dim)  # [B,T,S,3,H,hd]
        q, k, v = qkv.permute(3, 0, 2, 4, 1, 5).unbind(0)  # each [B, S, H, T, hd] (strided)
        x = F.scaled_dot_product_attention(q, k, v)  # [B, S, H, T, hd]
        x = x.permute(0, 3, 1, 2, 4).reshape(batch, num_tokens, dim)  # [B, T*S, D], one copy
        return self.proj(x)


@dataclass
class CaptionKV:
    """One block's cross-attention keys and values for a batch of captions: a function of the caption only,
    so a sampler computes it once per video instead of once per step.

    Samples are grouped by their number of kept caption tokens, so every group attends to exactly its
    valid tokens with no padding and no mask (upstream packs them with a block-diagonal mask, README
    item 7). `rows[g]` holds the batch rows of group g; None when one group covers the batch in order.

    `folded`: keys[g] = scale·W_q,hᵀ·K_hᵀ per head [G, D, H·L], values[g] = V_h·W_proj,hᵀ [G, H·L, D] and
    key_bias[g] = scale·b_q,h·K_hᵀ [G, 1, H·L], so the attention is `softmax_L(x·A + b)·P + b_proj`: the
    same sums in another order, with no q or output projection per step. Cheaper when H·L < D (short
    captions). Otherwise keys[g], values[g] are K, V [G, H, L, hd] and q_linear / proj run per step.
    """

    rows: list[torch.Tensor] | None
    lengths: list[int]
    folded: bool
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_bias: list[torch.Tensor]


class MultiHeadCrossAttention(nn.Module):
    """Image tokens attend to caption tokens (README item 7): `prepare` once per caption, `forward` per step."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"hidden size {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, d_model * 2)
        self.proj = nn.Linear(d_model, d_model)

    def prepare(self, groups: list[torch.Tensor], rows: list[torch.Tensor] | None,
                fold: bool | None = None) -> CaptionKV:
        """groups[g]: the kept caption tokens [G, L_g, D] of the samples `rows[g]`. fold=None picks the
        cheaper form (folded when H·L < D for every group)."""
        heads, head_dim = self.num_heads, self.head_dim
        dim = heads * head_dim
        if fold is None:
            fold = heads * max(g.shape[1] for g in groups) < dim
        keys, values, key_bias = [], [], []
        for tokens in groups:
            size, length, _ = tokens.shape
            k, v = self.kv_linear(tokens).view(size, length, 2, heads, head_dim).unbind(2)  # each [G, L, H, hd]
            if not fold:
                keys.append(k.transpose(1, 2))  # [G, H, L, hd]
                values.append(v.transpose(1, 2))
                continue
            # folded in at least fp32 whatever the model dtype, then cast: they are reused for every step
            work = torch.promote_types(tokens.dtype, torch.float32)
            scale = head_dim**-0.5
            k32, v32 = k.to(work), v.to(work)
            w_q = self.q_linear.weight.to(work).view(heads, head_dim, dim)  # [H, hd, D]
            b_q = self.q_linear.bias.to(work).view(heads, head_dim)  # [H, hd]
            w_p = self.proj.weight.to(work).view(dim, heads, head_dim)  # [D, H, hd]
            keys.append((torch.einsum("hed,glhe->gdhl", w_q, k32) * scale)
                        .reshape(size, dim, heads * length).to(tokens.dtype))  # [G, D, H*L]
            key_bias.append((torch.einsum("he,glhe->ghl", b_q, k32) * scale)
                            .reshape(size, 1, heads * length).to(tokens.dtype))  # [G, 1, H*L]
            values.append(torch.einsum("glhe,dhe->ghld", v32, w_p)
                          .reshape(size, heads * length, dim).to(tokens.dtype))  # [G, H*L, D]
        return CaptionKV(rows=rows, lengths=[g.shape[1] for g in groups], folded=fold,
                         keys=keys, values=values, key_bias=key_bias)

    def forward(self, x: torch.Tensor, caption: CaptionKV) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D]."""
        if caption.rows is None:
            return self._attend(x, caption, 0)
        out = torch.empty_like(x)
        for group, rows in enumerate(caption.rows):
            out[rows] = self._attend(x[rows], caption, group)
        return out

    def _attend(self, x: torch.Tensor, caption: CaptionKV, group: int) -> torch.Tensor:
        size, num_tokens, dim = x.shape
        if caption.folded:
            length = caption.lengths[group]
            scores = torch.baddbmm(caption.key_bias[group], x, caption.keys[group])  # [G, N, H*L]
            scores = scores.view(size, num_tokens, self.num_heads, length)  # [G, N, H, L]
            probs = scores.softmax(-1, dtype=torch.promote_types(x.dtype, torch.float32)).to(x.dtype)  # >= fp32
            probs = probs.view(size, num_tokens, self.num_heads * length)  # [G, N, H*L]
            return torch.baddbmm(self.proj.bias, probs, caption.values[group])  # [G, N, D]
        q = self.q_linear(x).view(size, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)  # [G,H,N,hd]
        x = F.scaled_dot_product_attention(q, caption.keys[group], caption.values[group])  # [G, H, N, hd]
        x = x.transpose(1, 2).reshape(size, num_tokens, dim)  # [G, N, D]
        return self.proj(x)


# ---------------------------------------------------------------------------------------------------
# Conditioning embedders and the output head
# ---------------------------------------------------------------------------------------------------


_FREQUENCIES: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def timestep_frequencies(half: int, max_period: int, device: torch.device) -> torch.Tensor:
    """`f_k = exp(-ln(max_period)·k/half)` [half] fp32 on `device`. Built on the CPU and then moved, as upstream
    does, so every device sees the same values; cached per device, so a step copies nothing from the host
    (which a captured CUDA graph could not replay)."""
    key = (half, max_period, device)
    if key not in _FREQUENCIES:
        freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
        _FREQUENCIES[key] = freqs.to(device)
    return _FREQUENCIES[key]


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> [B, D] through 256 sinusoids and an MLP (README item 4)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        """GLIDE sinusoids `[cos(t·f_k), sin(t·f_k)]`, `f_k = exp(-ln(max_period)·k/half)`, always fp32."""
        half = dim // 2
        freqs = timestep_frequencies(half, max_period, t.device)  # [half]
        args = t[:, None].float() * freqs[None]  # [B, half]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2*half]
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # [B, dim]
        return embedding

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size).to(dtype)  # [B, 256]
        return self.mlp(t_freq)  # [B, D]


class CaptionEmbedder(nn.Module):
    """Caption MLP [B, 1, L, Cy] -> [B, 1, L, D]; holds the learned null caption `y_embedding` (a buffer).

    In training mode whole captions are replaced by `y_embedding` with probability `uncond_prob`
    (classifier-free guidance dropout). Upstream draws that on `.cuda()`; here on the caption's device.
    """

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int = 120):
        super().__init__()
        self.y_proj = Mlp(in_features=in_channels, hidden_features=hidden_size, out_features=hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def token_drop(self, caption: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob  # [B]
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids[:, None, None, None], self.y_embedding, caption)  # [B, 1, L, Cy]

    def forward(self, caption: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (self.training and self.uncond_prob > 0) or force_drop_ids is not None:
            caption = self.token_drop(caption, force_drop_ids)
        return self.y_proj(caption)


class T2IFinalLayer(nn.Module):
    """PixArt's output head (README item 6): modulated LayerNorm from `t` (not t0), then a Linear."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], t [B, D] -> [B, N, prod(patch)*C_out]."""
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # each [B, 1, D]
        x = t2i_modulate(self.norm_final(x), shift, scale)
        return self.linear(x)
