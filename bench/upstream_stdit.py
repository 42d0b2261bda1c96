"""Upstream's STDiT forward (Open-Sora 1.0 / Bora `opensora/models/stdit/stdit.py` and `layers/blocks.py`),
re-implemented for side-by-side benchmarks: the baseline our lean step is measured against.

It runs on the weights of one of our `STDiT` modules (so both compute the same function) and keeps upstream's
formulation, described in shared/reference/README.md:
- the caption MLP runs on all L tokens at every forward; the kept tokens are packed into one sequence
  (`masked_select`) and cross-attention runs every block's q/kv projections on it, with one
  block-diagonal mask over all B·N queries (the xformers `BlockDiagonalMask.from_seqlens` path; here SDPA
  with the equivalent boolean mask, as the reference's stand-in);
- self-attention is upstream's non-flash path (`enable_flashattn=False`, the only one on CPU): q scaled,
  `q @ kᵀ`, softmax in fp32, `@ v`;
- temporal attention rearranges to [(B S), T, D] and back (einops `rearrange` = a permuted copy);
- modulation `x * (1 + scale) + shift` and gated residuals as separate ops.
Benchmark code only; nothing in the service imports it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.stdit import STDiT


def _self_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Upstream `Attention.forward` with enable_flashattn=False; x [B', L, D]."""
    batch, length, dim = x.shape
    qkv = attn.qkv(x).view(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each [B', H, L, hd]
    dtype = q.dtype
    q = q * attn.head_dim**-0.5
    weights = (q @ k.transpose(-2, -1)).to(torch.float32).softmax(dim=-1).to(dtype)  # [B', H, L, L]
    x = (weights @ v).transpose(1, 2).reshape(batch, length, dim)  # [B', L, D]
    return attn.proj(x)


def _cross_attention(cross, x: torch.Tensor, y_packed: torch.Tensor, y_lens: list[int]) -> torch.Tensor:
    """Upstream `MultiHeadCrossAttention.forward`: all B·N queries in one sequence against the packed kept
    caption tokens, block-diagonal mask (query block b sees only key block b)."""
    batch, num_tokens, dim = x.shape
    heads, head_dim = cross.num_heads, cross.head_dim
    q = cross.q_linear(x).view(1, -1, heads, head_dim)  # [1, B*N, H, hd]
    kv = cross.kv_linear(y_packed).view(1, -1, 2, heads, head_dim)  # [1, sum L_b, 2, H, hd]
    k, v = kv.unbind(2)
    q_block = torch.arange(batch, device=x.device).repeat_interleave(num_tokens)  # [B*N]
    k_block = torch.repeat_interleave(torch.arange(batch, device=x.device),
                                      torch.tensor(y_lens, device=x.device))  # [sum L_b]
    mask = q_block[:, None] == k_block[None, :]  # [B*N, sum L_b] block-diagonal
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    out = out.transpose(1, 2).reshape(batch, num_tokens, dim)  # [B, N, D]
    return cross.proj(out)


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


def _block(block, x, y_packed, t0, y_lens, num_frames, num_spatial, tpe):
    """Upstream `STDiTBlock.forward` (eval: drop-path is the identity)."""
    batch, num_tokens, dim = x.shape
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        block.scale_shift_table[None] + t0.reshape(batch, 6, -1)
    ).chunk(6, dim=1)
    x_m = _modulate(block.norm1(x), shift_msa, scale_msa)
    x_s = x_m.reshape(batch * num_frames, num_spatial, dim)  # "B (T S) C -> (B T) S C"
    x_s = _self_attention(block.attn, x_s).reshape(batch, num_tokens, dim)
    x = x + gate_msa * x_s
    x_t = x.reshape(batch, num_frames, num_spatial, dim).permute(0, 2, 1, 3)  # "B (T S) C -> (B S) T C"
    x_t = x_t.reshape(batch * num_spatial, num_frames, dim)
    if tpe is not None:
        x_t = x_t + tpe
    x_t = _self_attention(block.attn_temp, x_t)
    x_t = x_t.reshape(batch, num_spatial, num_frames, dim).permute(0, 2, 1, 3).reshape(batch, num_tokens, dim)
    x = x + gate_msa * x_t
    x = x + _cross_attention(block.cross_attn, x, y_packed, y_lens)
    x_m = _modulate(block.norm2(x), shift_mlp, scale_mlp)
    return x + gate_mlp * block.mlp(x_m)


class UpstreamSTDiT:
    """Callable like `STDiT.forward(x, timestep, y, mask)`, computing upstream's way on `model`'s weights."""

    def __init__(self, model: STDiT):
        self.model = model

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        dtype = m.dtype
        x, y = x.to(dtype), y.to(dtype)
        batch = x.shape[0]
        grid = m._patch_grid(x.shape)
        num_frames, grid_h, grid_w = grid
        num_spatial = grid_h * grid_w
        pos_embed, pos_embed_temporal = m.pos_embeds(grid, x.device, dtype)

        x = m.x_embedder(x)  # [B, N, D]
        x = x.reshape(batch, num_frames, num_spatial, -1) + pos_embed  # "B (T S) C -> B T S C"
        x = x.reshape(batch, num_frames * num_spatial, -1)
        t = m.t_embedder(timestep, dtype=dtype)
        t0 = m.t_block(t)
        y = m.y_embedder(y)  # [B, 1, L, D], every step
        if mask is not None:
            if mask.shape[0] != y.shape[0]:
                mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
            y = y.squeeze(1).masked_select(mask.unsqueeze(-1) != 0).view(1, -1, x.shape[-1])
            y_lens = mask.sum(dim=1).tolist()
        else:
            y_lens = [y.shape[2]] * y.shape[0]
            y = y.squeeze(1).view(1, -1, x.shape[-1])
        for i, block in enumerate(m.blocks):
            tpe = pos_embed_temporal if i == 0 else None
            x = _block(block, x, y, t0, y_lens, num_frames, num_spatial, tpe)
        x = m.final_layer(x, t)
        return m.unpatchify(x, grid).to(torch.float32)
