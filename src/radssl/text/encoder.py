"""Text encoders: a small Transformer trained from scratch (the offline default) or a local Hugging Face model.

Both map token tensors (``input_ids``, ``attention_mask``: (B, L)) to one vector per report (B, ``feature_dim``),
pooled over the real tokens (``mean``) or taken at the first token (``cls``).

* :class:`ScratchTextEncoder` — token embedding + fixed sinusoidal positions (Vaswani et al. 2017: no
  parameters, so no context-length setting to keep in step with the tokenizer) + ``nn.TransformerEncoder``
  (pre-norm, GELU) + LayerNorm. Dropout is 0 by default: dropout draws from the global RNG, which the engine does
  not checkpoint, so a resumed run would no longer follow the uninterrupted one bit for bit.
* :class:`HuggingFaceTextEncoder` — ``transformers.AutoModel.from_pretrained(path, local_files_only=True)``:
  ClinicalBERT, CXR-BERT, BiomedBERT … whatever the user has on disk. A missing directory is a ConfigError,
  never a download. ``trainable_layers`` freezes the embeddings and all but the last k layers (ConVIRT froze
  the first 6 of 12 BERT layers).

Every encoder holds the tokenizer it was trained with (:meth:`TextEncoder.bind_tokenizer`) and puts it into its
state dict as *extra state* (the tokenizer JSON, a string: still loadable with ``torch.load(weights_only=True)``),
so a checkpoint's text tower re-tokenises and embeds new text exactly as in training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from radssl.errors import ConfigError
from radssl.text.tokenizer import FIT, ReportTokenizer, from_pretrained_locally, load_tokenizer, local_model_path

Pooling = Literal["mean", "cls"]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(B, L, D) token states → (B, D): mean over real tokens, or the first ([CLS]) token."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def sinusoidal_positions(length: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(L, D) fixed sine/cosine position codes (Vaswani et al., 2017)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width))
    codes = torch.zeros(length, width, device=device, dtype=torch.float32)
    codes[:, 0::2] = torch.sin(position * frequency)
    codes[:, 1::2] = torch.cos(position * frequency)[:, : width // 2]
    return codes.to(dtype)


def encode_in_batches(module: nn.Module, tokenizer: ReportTokenizer, texts: list[str], batch_size: int,
                      encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """``encode(input_ids, attention_mask)`` of ``texts`` tokenised ``batch_size`` at a time, on ``module``'s device
    and with ``module`` in eval mode (its mode restored after): what embedding raw texts takes (call under no_grad)."""
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    try:
        outputs = []
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer.encode(texts[start : start + batch_size])
            outputs.append(encode(tokens.input_ids.to(device), tokens.attention_mask.to(device)))
        return outputs
    finally:
        module.train(was_training)


class TextEncoder(nn.Module):
    """Base: ``forward(input_ids, attention_mask) -> (B, feature_dim)``; holds its tokenizer as extra state."""

    feature_dim: int
    kind: str

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer: ReportTokenizer | None = None

    def bind_tokenizer(self, tokenizer: ReportTokenizer) -> None:
        """Adopt the tokenizer the views were made with; a ConfigError if this encoder cannot embed its ids."""
        self.check_tokenizer(tokenizer)
        self.tokenizer = tokenizer

    def check_tokenizer(self, tokenizer: ReportTokenizer) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    # The tokenizer travels with the weights: state_dict()["..._extra_state"] = {"tokenizer": json or ""}.
    def get_extra_state(self) -> dict[str, str]:
        return {"tokenizer": self.tokenizer.to_json() if self.tokenizer is not None else ""}

    def set_extra_state(self, state: Any) -> None:
        text = state.get("tokenizer", "") if isinstance(state, dict) else ""
        self.tokenizer = ReportTokenizer.from_json(text) if text else None

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """(N, feature_dim) pooled features of raw texts, tokenised with the bound tokenizer (eval mode)."""
        if self.tokenizer is None:
            raise ConfigError("this text encoder has no tokenizer yet (it is bound on the first training batch)")
        outputs = encode_in_batches(self, self.tokenizer, texts, batch_size,
                                    lambda ids, mask: self(ids, mask).float().cpu())
        return torch.cat(outputs) if outputs else torch.empty(0, self.feature_dim)


class ScratchTextEncoder(TextEncoder):
    """A small pre-norm Transformer encoder trained from scratch on the run's reports (needs nothing downloaded)."""

    kind = "scratch"

    def __init__(self, vocab_size: int, width: int = 128, depth: int = 2, heads: int = 4,
                 pooling: Pooling = "mean", dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"text_width {width} must be a multiple of text_heads {heads}")
        self.vocab_capacity = int(vocab_size)
        self.pooling = pooling
        self.feature_dim = int(width)
        # N(0, 1) (torch's default), not BERT's 0.02: the sinusoidal codes have unit-scale entries, and token vectors
        # 50× smaller than them made every report's input nearly the same sequence (measured: mean cosine 0.99
        # between the pooled outputs of different reports at initialisation, and a flat loss for ~60 steps).
        self.token_embedding = nn.Embedding(vocab_size, width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def check_tokenizer(self, tokenizer: ReportTokenizer) -> None:
        if tokenizer.vocab_size > self.vocab_capacity:
            raise ConfigError(
                f"the tokenizer has {tokenizer.vocab_size} token ids but the text encoder embeds only "
                f"{self.vocab_capacity} — set method.text_vocab_size >= {tokenizer.vocab_size} "
                "(or lower views.vocab_size)"
            )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(input_ids)
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)
        padding = attention_mask == 0
        x = self.transformer(x, src_key_padding_mask=padding)
        return pool(self.norm(x), attention_mask, self.pooling)


class HuggingFaceTextEncoder(TextEncoder):
    """A local Hugging Face model (``AutoModel``, ``local_files_only=True``), pooled to one vector per report."""

    kind = "huggingface"

    def __init__(self, path: str | Path, pooling: Pooling = "cls", trainable_layers: int | None = None) -> None:
        super().__init__()
        path = local_model_path(
            path, what="text encoder", directory=True, otherwise="method.text_encoder: scratch",
            give="a local Hugging Face model directory (config.json + weights, e.g. saved with save_pretrained)")
        from transformers import AutoModel  # heavy (~seconds): only for pretrained text encoders

        self.model = from_pretrained_locally(AutoModel.from_pretrained, path,
                                             "cannot load a Hugging Face model from this directory")
        self.path = str(path)
        self.pooling = pooling
        self.feature_dim = int(self.model.config.hidden_size)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        if trainable_layers is not None:
            self._freeze_all_but(trainable_layers)

    def _freeze_all_but(self, trainable_layers: int) -> None:
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if layers is None:
            raise ConfigError(f"{self.path}: text_trainable_layers needs a BERT-like model (model.encoder.layer)")
        frozen = [getattr(self.model, "embeddings", None), *list(layers)[: max(0, len(layers) - trainable_layers)]]
        for module in frozen:
            if module is not None:
                for parameter in module.parameters():
                    parameter.requires_grad = False

    def check_tokenizer(self, tokenizer: ReportTokenizer) -> None:
        if tokenizer.source == FIT:
            raise ConfigError(
                f"method.text_encoder is the pretrained model {self.path} but views.tokenizer is 'fit': a fitted "
                f"vocabulary does not match the model's embeddings — set views.tokenizer: {self.path}"
            )
        own = self._own_tokenizer()
        if own is not None and not own.vocabulary_equals(tokenizer):
            raise ConfigError(
                f"views.tokenizer ({tokenizer.source}) is not the tokenizer of the text encoder {self.path} — set "
                f"views.tokenizer: {self.path}"
            )
        rows = self.model.get_input_embeddings().num_embeddings
        if tokenizer.vocab_size > rows:
            raise ConfigError(
                f"the tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} ids but the model {self.path} embeds "
                f"{rows} — set views.tokenizer to the model's own directory ({self.path})"
            )
        if self.max_positions is not None and tokenizer.max_length > int(self.max_positions):
            raise ConfigError(f"views.max_length {tokenizer.max_length} exceeds the {self.max_positions} positions "
                              f"of {self.path} — lower views.max_length")

    def _own_tokenizer(self) -> ReportTokenizer | None:
        """The tokenizer saved beside the model, when there is one (to check the views use the same)."""
        try:
            return load_tokenizer(self.path)
        except ConfigError:
            return None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)


def build_text_encoder(kind_or_path: str, *, vocab_size: int, width: int, depth: int, heads: int,
                       pooling: Pooling | None, trainable_layers: int | None) -> TextEncoder:
    """``scratch`` → :class:`ScratchTextEncoder`; anything else is a local model directory."""
    if kind_or_path == "scratch":
        return ScratchTextEncoder(vocab_size, width, depth, heads, pooling or "mean")
    return HuggingFaceTextEncoder(kind_or_path, pooling or "cls", trainable_layers)
