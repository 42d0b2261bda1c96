"""The T5 caption encoder, as Bora / Open-Sora 1.0's ``T5Encoder`` uses it.

Upstream (``opensora/models/text_encoder/t5.py``): every prompt goes through
:func:`~model.text_preprocessing.text_preprocessing`, is tokenized to exactly ``model_max_length``
(120) tokens with ``</s>`` and padding, and the encoder's ``last_hidden_state`` becomes
``y = [n, 1, L, C]`` with the tokenizer's attention mask as ``mask = [n, L]``. The unconditional
embedding is not T5's: it is the STDiT's learned ``y_embedding`` buffer, repeated per sample.

Here the T5 may live on another device (and in bf16) than the embeddings it returns, and
per-prompt embeddings are kept in a small LRU cache so a repeated prompt skips T5 entirely.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, T5EncoderModel, T5Tokenizer

from model.errors import CheckpointError
from model.text_preprocessing import text_preprocessing

# Checked at load time: a converted sentencepiece model must encode this exactly as sentencepiece does.
_PROBE_TEXT = "a close-up MRI scan of the brain, 3D rendering; ultrasound (Doppler) at 40% speed"


def load_tokenizer(directory: str | Path):
    """The T5 tokenizer of a folder: ``tokenizer.json`` (what ``save_pretrained`` writes) or, as in the
    ``t5-v1_1-xxl`` download, only ``spiece.model`` + ``tokenizer_config.json``.

    A sentencepiece model is converted by naming ``T5Tokenizer`` explicitly: ``AutoTokenizer`` falls back
    to an empty generic backend when ``tokenizer_config.json`` names no class and no ``config.json`` says
    ``t5``. The conversion is then checked against sentencepiece itself (same pieces in the same order,
    same ids for a probe text ending in ``</s>``), so a silently wrong vocabulary cannot get through.
    """
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    spiece = directory / "spiece.model"
    if not spiece.is_file():
        raise CheckpointError(f"{directory} holds no tokenizer (neither tokenizer.json nor spiece.model)")
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece))
    tokenizer = T5Tokenizer.from_pretrained(str(directory), local_files_only=True)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    if tokenizer.convert_ids_to_tokens(list(range(len(pieces)))) != pieces:
        raise CheckpointError(f"{spiece}: the converted tokenizer does not have the sentencepiece model's "
                              f"{len(pieces)} pieces in order (it has {len(tokenizer)} tokens)")
    expected = sp.encode(_PROBE_TEXT) + [sp.eos_id()]
    if tokenizer(_PROBE_TEXT)["input_ids"] != expected:
        raise CheckpointError(f"{spiece}: the converted tokenizer encodes text differently from sentencepiece")
    return tokenizer


class T5TextEncoder:
    """Prompts → ``{"y": [n, 1, L, C], "mask": [n, L] int64}`` for the STDiT's cross-attention.

    Args:
        t5: the encoder (moved to ``device``/``dtype`` here and put in eval mode).
        tokenizer: the matching T5 tokenizer (``</s>``-terminated, pad id 0).
        model_max_length: L, the token length every prompt is padded or truncated to.
        device, dtype: where T5 runs. fp32 (default) or bf16; fp16 is refused because T5's
            feed-forward activations overflow fp16's range.
        output_device, output_dtype: where ``y`` and the null embedding are returned (default:
            T5's device, fp32). ``mask`` is always int64 on ``output_device``.
        cache_size: how many cleaned prompts keep their embeddings; 0 disables the cache.
    """

    def __init__(
        self,
        t5: T5EncoderModel,
        tokenizer,
        model_max_length: int = 120,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        output_device: torch.device | str | None = None,
        output_dtype: torch.dtype = torch.float32,
        cache_size: int = 64,
    ):
        if dtype == torch.float16:
            raise ValueError(
                "T5 cannot run in float16: its activations overflow to inf/NaN; use torch.float32 "
                "or torch.bfloat16 (the embeddings can still be returned in float16 via output_dtype)"
            )
        if model_max_length < 1:
            raise ValueError(f"model_max_length must be >= 1, got {model_max_length}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.device = torch.device(device) if device is not None else next(t5.parameters()).device
        self.dtype = dtype
        self.output_device = torch.device(output_device) if output_device is not None else self.device
        self.output_dtype = output_dtype
        self.t5 = t5.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self._y_null: torch.Tensor | None = None

    @property
    def hidden_size(self) -> int:
        """C, T5's ``d_model``: the STDiT's ``caption_channels``."""
        return self.t5.config.d_model

    @classmethod
    def from_pretrained(
        cls,
        text_encoder_dir: str | Path,
        tokenizer_dir: str | Path,
        model_max_length: int = 120,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        output_device: torch.device | str | None = None,
        output_dtype: torch.dtype = torch.float32,
        cache_size: int = 64,
    ) -> T5TextEncoder:
        """Load T5 and its tokenizer from local folders only (nothing is downloaded)."""
        if dtype == torch.float16:  # fail before loading gigabytes of weights
            raise ValueError("T5 cannot run in float16; use torch.float32 or torch.bfloat16")
        tokenizer = load_tokenizer(tokenizer_dir)
        t5 = T5EncoderModel.from_pretrained(str(text_encoder_dir), local_files_only=True, dtype=dtype)
        return cls(
            t5,
            tokenizer,
            model_max_length=model_max_length,
            device=device,
            dtype=dtype,
            output_device=output_device,
            output_dtype=output_dtype,
            cache_size=cache_size,
        )

    def save_pretrained(self, text_encoder_dir: str | Path, tokenizer_dir: str | Path) -> None:
        self.t5.save_pretrained(str(text_encoder_dir))
        self.tokenizer.save_pretrained(str(tokenizer_dir))

    def _tokenize(self, texts: list[str]):
        return self.tokenizer(
            texts,
            max_length=self.model_max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )

    @torch.no_grad()
    def _run_t5(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned texts → (last_hidden_state [n, L, C] on the output device/dtype, mask [n, L])."""
        tokens = self._tokenize(texts)
        input_ids = tokens["input_ids"].to(self.device)  # [n, L]
        attention_mask = tokens["attention_mask"].to(self.device)  # [n, L]
        hidden = self.t5(input_ids=input_ids, attention_mask=attention_mask)["last_hidden_state"]  # [n, L, C]
        y = hidden.to(device=self.output_device, dtype=self.output_dtype)
        mask = attention_mask.to(device=self.output_device, dtype=torch.int64)
        return y, mask

    def encode(self, prompts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Clean, tokenize and encode prompts; cached prompts do not run T5 again.

        Returns ``{"y": [n, 1, L, C] output_dtype, "mask": [n, L] int64}`` on ``output_device``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        cleaned = [text_preprocessing(p) for p in prompts]
        if not cleaned:
            shape = (0, 1, self.model_max_length, self.hidden_size)
            return {
                "y": torch.empty(shape, device=self.output_device, dtype=self.output_dtype),
                "mask": torch.empty(0, self.model_max_length, device=self.output_device, dtype=torch.int64),
            }
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with self._lock:
            for text in cleaned:
                if text in self._cache:
                    self._cache.move_to_end(text)
                    found[text] = self._cache[text]
        missing = list(dict.fromkeys(t for t in cleaned if t not in found))  # unique, first-seen order
        if missing:
            y, mask = self._run_t5(missing)  # [m, L, C], [m, L]
            with self._lock:
                for i, text in enumerate(missing):
                    found[text] = (y[i].clone(), mask[i].clone())  # own storage, not a view of the batch
                    self._remember(text, found[text])
        y = torch.stack([found[t][0] for t in cleaned])[:, None]  # n × [L, C] -> [n, 1, L, C]
        mask = torch.stack([found[t][1] for t in cleaned])  # n × [L] -> [n, L]
        return {"y": y, "mask": mask}

    def _remember(self, text: str, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.cache_size == 0:
            return
        self._cache[text] = value
        self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    @property
    def cache_len(self) -> int:
        return len(self._cache)

    def token_counts(self, prompts: str | Sequence[str]) -> list[tuple[int, bool]]:
        """Per prompt: (tokens after cleaning incl. ``</s>``, before truncation; whether it exceeds L)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        counts = []
        for prompt in prompts:
            ids = self.tokenizer(
                text_preprocessing(prompt), add_special_tokens=True, truncation=False, verbose=False
            )["input_ids"]
            counts.append((len(ids), len(ids) > self.model_max_length))
        return counts

    def set_null(self, y_embedding: torch.Tensor) -> None:
        """Use the STDiT's ``y_embedder.y_embedding`` buffer [L, C] as the unconditional caption."""
        expected = (self.model_max_length, self.hidden_size)
        if tuple(y_embedding.shape) != expected:
            raise ValueError(
                f"y_embedding has shape {tuple(y_embedding.shape)}, expected {expected} "
                "(model_max_length, T5 d_model); the STDiT and the text encoder do not match"
            )
        self._y_null = y_embedding.detach().to(device=self.output_device, dtype=self.output_dtype)

    def null(self, n: int) -> torch.Tensor:
        """The unconditional caption for n samples: ``y_embedding[None].repeat(n, 1, 1)[:, None]``."""
        if self._y_null is None:
            raise RuntimeError("T5TextEncoder.null() needs set_null(stdit.y_embedder.y_embedding) first")
        return self._y_null[None].repeat(n, 1, 1)[:, None]  # [L, C] -> [n, L, C] -> [n, 1, L, C]
