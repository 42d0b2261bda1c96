"""VideoVAE on the tiny AutoencoderKL: frame-wise decode as upstream, micro-batching, dtypes, encode."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from model.tiny import build_tiny_vae
from model.vae import VideoVAE


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_vae") / "vae"
    build_tiny_vae(directory, seed=0)
    return directory


@pytest.fixture(scope="module")
def vae(vae_dir) -> VideoVAE:
    return VideoVAE.from_pretrained(vae_dir, device="cpu")


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn(2, 4, 3, 4, 6, generator=torch.Generator().manual_seed(0))  # [B, C, T, h, w]


def test_tiny_vae_layout_and_determinism(tmp_path, vae_dir, vae):
    assert vae.spatial_factor == 8 and vae.latent_channels == 4 and vae.scale_factor == 0.18215
    reloaded = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
    same = build_tiny_vae(tmp_path / "same", seed=0)
    other = build_tiny_vae(tmp_path / "other", seed=1)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, same.state_dict()[name]), name
    assert any(not torch.equal(t, other.state_dict()[n]) for n, t in reloaded.state_dict().items())


def test_decode_shape_dtype_and_upstream_formula(vae, latents):
    video = vae.decode(latents)
    assert video.shape == (2, 3, 32, 48, 3) and video.dtype == torch.uint8 and video.device.type == "cpu"
    # upstream: per frame, vae.decode(z / 0.18215), clamp(-1, 1), (x + 1) / 2 * 255 + 0.5, truncate
    with torch.no_grad():
        for b in range(2):
            for t in range(3):
                x = vae.vae.decode(latents[b, :, t][None] / 0.18215).sample[0]  # [3, H, W]
                expected = (
                    ((x.clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
                )
                assert (video[b, t].int() - expected.int()).abs().max() <= 1, (b, t)
    assert video.float().std() > 1.0, "a random tiny VAE still decodes to a non-flat image"


@pytest.mark.parametrize("micro_batch_size", [1, 2, 5, None])
def test_micro_batch_size_does_not_change_the_output(vae_dir, vae, latents, micro_batch_size):
    other = VideoVAE(vae.vae, micro_batch_size=micro_batch_size)
    assert torch.equal(other.decode(latents), vae.decode(latents))


def test_fp16_vae_decodes_close_to_fp32(vae_dir, vae, latents):
    half = VideoVAE.from_pretrained(vae_dir, dtype=torch.float16)
    assert half.dtype == torch.float16
    video = half.decode(latents)  # fp32 latents are cast to the VAE's dtype
    assert video.dtype == torch.uint8
    assert (video.int() - vae.decode(latents).int()).abs().float().mean() < 2.0


def test_encode_gives_latents_of_the_decoded_shape(vae, latents):
    frames = vae.decode(latents)
    z = vae.encode(frames)
    assert z.shape == latents.shape and z.dtype == torch.float32
    assert torch.equal(vae.encode(frames), z), "the posterior mean is deterministic"
    sampled = [vae.encode(frames, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], z)


def test_bad_inputs_are_refused(vae):
    with pytest.raises(ValueError, match="micro_batch_size"):
        VideoVAE(vae.vae, micro_batch_size=0)
    with pytest.raises(ValueError, match=r"\[B, 4, T, h, w\]"):
        vae.decode(torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
        vae.encode(torch.zeros(1, 2, 32, 32, 4, dtype=torch.uint8))


def test_save_and_reload_round_trip(vae, latents, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    assert torch.equal(VideoVAE.from_pretrained(tmp_path / "vae").decode(latents), vae.decode(latents))
