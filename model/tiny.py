"""Tiny, offline, deterministic stand-ins for Bora's text encoder, tokenizer and VAE.

Tests and the ``tiny`` preset need real components of the right *kind* (a T5 tokenizer and
``T5EncoderModel``, an ``AutoencoderKL`` with the SD spatial factor 8) without any download.
Each builder writes a folder that the ordinary ``from_pretrained`` / ``AutoTokenizer`` calls load.
The same seed gives the same weights; the tokenizer's vocabulary is counted from the corpus
below, which lives here so that nothing outside the package is read at run time.
"""

from __future__ import annotations

import math
import re
import string
import tempfile
from collections import Counter
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import AutoTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

# T5's fixed special ids: <pad> 0 (also the decoder start), </s> 1, <unk> 2.
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")

# Captions in the style of Bora's prompts, already lowercased as clean_caption leaves them.
TINY_CORPUS = (
    "the video shows a grayscale microscopic view of cellular structures in a dynamic environment",
    "cells divide and change shape, simulating mitosis or binary fission under phase-contrast microscopy",
    "bacteria and other microorganisms move across the field; nuclei appear as dark circular areas",
    "the medium surrounding the cells is viscous, like agar used to culture the organisms",
    "sperm cells swim rapidly with their tails beating in a fluid under high magnification",
    "an endoscopic view of the stomach lining shows pink mucosa, folds and small blood vessels",
    "the endoscope moves through the colon; the intestinal wall glistens under a bright light",
    "a close up of the esophagus with a reddish inflamed area and a small polyp",
    "surgical instruments appear at the edge of the frame during a laparoscopic procedure",
    "an mri scan of the brain in axial slices shows the ventricles, white matter and grey matter",
    "a sagittal t2-weighted mri of the knee shows the knee cap, cartilage and ligaments",
    "the mri sequence scrolls through the spine, showing vertebrae, discs and the spinal cord",
    "a coronal slice of the abdomen shows the liver, kidneys and the spleen",
    "an ultrasound image of the heart shows the left ventricle and the valves opening and closing",
    "the ultrasound probe moves over the abdomen; a fetus appears in the grainy black and white image",
    "a doppler ultrasound shows blood flow in the carotid artery in red and blue",
    "the thyroid gland appears as a grey oval structure with a small dark nodule",
    "a medical video with smooth camera motion, high resolution and realistic lighting",
    "the tissue pulses gently with each heartbeat while the view slowly zooms in",
    "cross section of a blood vessel with red blood cells flowing through the lumen",
    "histology slide stained pink and purple, showing glands, stroma and inflammatory cells",
    "a 3d rendering of neurons firing, with dendrites and axons glowing on a dark background",
    "x-ray fluoroscopy shows contrast moving through the stomach and small intestine",
    "the patient breathes slowly; the diaphragm and lungs move up and down in the scan",
)

# Every ASCII letter, digit and punctuation mark has its own piece, so no ASCII text needs <unk>.
_ALPHABET = string.ascii_letters + string.digits + string.punctuation


def _unigram_pieces(corpus: tuple[str, ...], vocab_size: int) -> list[tuple[str, float]]:
    """A Unigram vocabulary counted from ``corpus``: (piece, log-probability), specials first.

    Pieces are ``▁word`` for each word's leading alphanumeric run, character 2- and 3-grams seen at
    least three times inside words, and every character of the alphabet. (``tokenizers``'
    ``UnigramTrainer`` is not used: its scores and piece order change from run to run.)
    """
    counts: Counter[str] = Counter({char: 1 for char in _ALPHABET})  # add-one for unseen characters
    for word in " ".join(corpus).split():
        counts.update(word)
        head = re.match(r"[a-z0-9]+", word)
        if head:
            counts["▁" + head.group()] += 1
        for n in (2, 3):
            counts.update(word[i : i + n] for i in range(len(word) - n + 1) if word[i : i + n].isalnum())
    required = {"▁", *_ALPHABET}
    counts["▁"] += len(corpus)  # the bare "▁" starts words whose first character has no "▁" piece
    optional = [p for p, c in counts.items() if p not in required and (p.startswith("▁") or c >= 3)]
    optional.sort(key=lambda piece: (-counts[piece], piece))
    pieces = sorted(required) + optional[: max(vocab_size - len(SPECIAL_TOKENS) - len(required), 0)]
    total = sum(counts[piece] for piece in pieces)
    scored = sorted(
        ((piece, math.log(counts[piece] / total)) for piece in pieces), key=lambda x: (-x[1], x[0])
    )
    return [(token, 0.0) for token in SPECIAL_TOKENS] + scored


def build_tiny_tokenizer(directory: str | Path, vocab_size: int = 512, model_max_length: int = 120,
                         corpus: tuple[str, ...] = TINY_CORPUS):
    """Build a T5-style Unigram tokenizer from ``corpus`` (:data:`TINY_CORPUS`) and ``save_pretrained`` it.

    The result loads with ``AutoTokenizer.from_pretrained(directory)`` as a ``T5Tokenizer``; ids
    ``<pad>``=0, ``</s>``=1, ``<unk>``=2 as in T5 and every encoding ends with ``</s>``. The same
    arguments always give the same vocabulary.
    """
    # transformers' T5Tokenizer wraps a Unigram (piece, score) list with T5's own pre-tokenizer
    # (whitespace split, Metaspace "▁"), `$A </s>` post-processor and decoder, exactly as it does
    # for a converted sentencepiece model.
    pieces = _unigram_pieces(corpus, vocab_size)
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            raise RuntimeError(f"tiny tokenizer put {token!r} at id {tokenizer.convert_tokens_to_ids(token)}")
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def build_tiny_t5(
    directory: str | Path,
    d_model: int = 32,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    vocab_size: int | None = None,
) -> T5EncoderModel:
    """Save a randomly initialised 2-layer ``T5EncoderModel`` (T5 v1.1 style, gated-GELU).

    The vocabulary size is ``vocab_size``, else that of the tokenizer in ``tokenizer_dir``, else
    that of a fresh :func:`build_tiny_tokenizer` with its defaults. ``d_model`` is the caption
    width the STDiT must be built with (``caption_channels``).
    """
    if vocab_size is None:
        if tokenizer_dir is not None:
            vocab_size = len(AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                vocab_size = len(build_tiny_tokenizer(tmp))
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config).eval()
    model.save_pretrained(str(directory))
    return model


def build_tiny_vae(directory: str | Path, seed: int = 0) -> AutoencoderKL:
    """Save a randomly initialised ``AutoencoderKL`` with SD's layout at toy width.

    Four down blocks give the spatial factor 8 and 4 latent channels, like ``sd-vae-ft-ema``, so
    latent shapes match the real Bora; ``scaling_factor`` is SD's 0.18215.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.18215,
        ).eval()
    vae.save_pretrained(str(directory))
    return vae
