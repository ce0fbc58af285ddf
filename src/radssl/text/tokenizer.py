"""Report tokenisation: a WordPiece tokenizer fitted on a run's own (training) reports, or a local model's own.

Two sources, one object (:class:`ReportTokenizer`) that view policies tokenise with and checkpoints carry:

* ``fit`` — a WordPiece vocabulary learnt from the pretraining reports (BERT-style normaliser and
  pre-tokeniser, ``[CLS] … [SEP]``). Encoding runs in Hugging Face ``tokenizers`` (Rust, batched). The
  *vocabulary* is learnt here, not by ``tokenizers``' ``WordPieceTrainer``: that trainer breaks ties between
  equally frequent merges in hash-map order, which changes from process to process (measured: five fits of the
  same 273 clinical notes gave five different vocabularies), so two runs with one seed would embed different
  token ids. :func:`wordpiece_vocabulary` is the same byte-pair-merge procedure (the one ``WordPieceTrainer``
  runs internally) with ties broken by the pair's text, so a fit is a pure function of the reports and settings.
* a path — a local Hugging Face model directory (``tokenizer.json``, or what ``AutoTokenizer`` converts to a
  fast tokenizer, always ``local_files_only``: nothing is downloaded) or a ``tokenizer.json`` file.

Reports longer than ``max_length`` tokens (special tokens included) are truncated — documented behaviour, never an
error: the encoding records which were cut (:attr:`TokenisedReports.truncated`) so callers count and log them.
Text that is not valid Unicode (lone surrogates from a mis-decoded file) is a :class:`DataError` naming the row.

:meth:`ReportTokenizer.to_json` is the whole tokenizer as one string (vocabulary, normaliser, special tokens,
``max_length``); image–text methods keep it in their state dict, so a checkpoint re-tokenises new text exactly.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from radssl.errors import ConfigError, DataError

FORMAT_VERSION = 1
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP = 0, 1, 2, 3
CONTINUATION = "##"
MAX_CHARS_PER_WORD = 100
FIT = "fit"


@dataclass(frozen=True)
class TokenisedReports:
    """Padded token tensors for N reports (CPU): ``input_ids`` and ``attention_mask`` (N, L) int64, ``lengths``
    (N,) tokens per report including special tokens, ``truncated`` (N,) bool — reports cut at ``max_length``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor
    truncated: np.ndarray

    @property
    def truncated_count(self) -> int:
        return int(self.truncated.sum())


def check_texts(texts: Sequence[object], where: str) -> list[str]:
    """Reports as ``str``, each encodable as UTF-8; a DataError naming the first bad row otherwise.

    ``bytes`` are decoded as UTF-8 (an error if they are not UTF-8); ``None`` becomes "" (no report).
    """
    checked: list[str] = []
    for row, text in enumerate(texts):
        if text is None:
            checked.append("")
            continue
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(where, f"the report of row {row} is not UTF-8 text ({error})",
                                "decode the reports with their real encoding before building the store") from None
        if not isinstance(text, str):
            raise DataError(where, f"the report of row {row} is a {type(text).__name__}, not text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise DataError(
                where,
                f"the report of row {row} holds characters that are not valid Unicode ({error.reason} at "
                f"position {error.start}: the file was probably decoded with the wrong encoding)",
                "re-read the reports with their real encoding (e.g. report_encoding: latin-1) or re-save them as UTF-8",
            ) from None
        checked.append(text)
    return checked


# ------------------------------------------------------------------------------------------------ fitting
def _bert_pipeline(lowercase: bool) -> tuple[normalizers.Normalizer, pre_tokenizers.PreTokenizer]:
    normaliser = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=lowercase,
                                            lowercase=lowercase)
    return normaliser, pre_tokenizers.BertPreTokenizer()


def word_counts(texts: Iterable[str], lowercase: bool = True) -> Counter[str]:
    """Words (after BERT normalisation and pre-tokenisation) and how often they occur."""
    normaliser, pre_tokeniser = _bert_pipeline(lowercase)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokeniser.pre_tokenize_str(normaliser.normalize_str(text)))
    return counts


def _merged(left: str, right: str) -> str:
    return left + (right[len(CONTINUATION):] if right.startswith(CONTINUATION) else right)


def wordpiece_vocabulary(counts: Counter[str], vocab_size: int, min_frequency: int = 2) -> list[str]:
    """A WordPiece vocabulary by byte-pair merges over word counts, deterministic (ties → smallest pair text).

    Start from the special tokens and every character (``c`` word-initial, ``##c`` inside a word), then repeatedly
    merge the most frequent adjacent pair (counted over word occurrences) until ``vocab_size`` tokens or no pair
    occurs ``min_frequency`` times. Pair counts are updated incrementally (only the words holding the merged pair
    are touched), so a fit of tens of thousands of distinct words takes seconds.
    """
    words = sorted(counts)
    frequency = [counts[w] for w in words]
    pieces = [[w[0]] + [CONTINUATION + c for c in w[1:]] for w in words]
    vocabulary = list(SPECIAL_TOKENS) + sorted({p for word in pieces for p in word} - set(SPECIAL_TOKENS))
    known = set(vocabulary)
    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    holders: dict[tuple[str, str], set[int]] = defaultdict(set)
    for index, word in enumerate(pieces):
        for pair in zip(word, word[1:]):
            pair_count[pair] += frequency[index]
            holders[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_count.items()]
    heapq.heapify(heap)
    while len(vocabulary) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -negative:
            continue  # stale entry: the count changed since it was pushed (the fresh one is in the heap)
        if -negative < min_frequency:
            break
        token = _merged(*pair)
        if token not in known:
            vocabulary.append(token)
            known.add(token)
        changed: set[tuple[str, str]] = set()
        for index in sorted(holders.pop(pair)):
            word, weight = pieces[index], frequency[index]
            for old in zip(word, word[1:]):
                pair_count[old] -= weight
                changed.add(old)
            merged, position = [], 0
            while position < len(word):
                if position + 1 < len(word) and (word[position], word[position + 1]) == pair:
                    merged.append(token)
                    position += 2
                else:
                    merged.append(word[position])
                    position += 1
            pieces[index] = merged
            for new in zip(merged, merged[1:]):
                pair_count[new] += weight
                holders[new].add(index)
                changed.add(new)
        pair_count.pop(pair, None)
        for other in changed:
            count = pair_count.get(other, 0)
            if count <= 0:
                pair_count.pop(other, None)
                holders.pop(other, None)
            elif other != pair:
                heapq.heappush(heap, (-count, other))
    return vocabulary


def fit_tokenizer(
    texts: Sequence[str],
    vocab_size: int = 4096,
    min_frequency: int = 2,
    lowercase: bool = True,
    max_length: int = 64,
    where: str = "reports",
) -> "ReportTokenizer":
    """A WordPiece tokenizer fitted on ``texts`` (empty ones ignored); deterministic in (texts, settings).

    The distinct texts are counted once each in sorted order — duplicates of one report (a study's text shared
    by its images) do not outweigh other reports, and the input order cannot matter.
    """
    distinct = sorted({t for t in check_texts(texts, where) if t.strip()})
    if not distinct:
        raise DataError(where, "no non-empty report to fit a tokenizer on",
                        "give the images reports, or use a local model's tokenizer (views.tokenizer: <model dir>)")
    vocabulary = wordpiece_vocabulary(word_counts(distinct, lowercase), vocab_size, min_frequency)
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocabulary)}, unk_token="[UNK]",
                                           continuing_subword_prefix=CONTINUATION,
                                           max_input_chars_per_word=MAX_CHARS_PER_WORD))
    tokenizer.normalizer, tokenizer.pre_tokenizer = _bert_pipeline(lowercase)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
    )
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION)
    return ReportTokenizer(tokenizer, max_length=max_length, source=FIT, pad_id=PAD)


# ------------------------------------------------------------------------------------------------ loading
def local_model_path(path: str | Path, *, what: str, directory: bool, give: str, otherwise: str) -> Path:
    """``path`` expanded; a ConfigError saying what to give instead when it is missing (or not a ``directory``).

    Why one helper: tokenizers and text encoders are read only from local files (radssl never downloads at run
    time), and both say so in the same words.
    """
    path = Path(path).expanduser()
    if not (path.is_dir() if directory else path.exists()):
        problem = "is not a directory" if directory else "not found"
        raise ConfigError(f"{what} '{path}' {problem} — give {give}; radssl never downloads models at run time, "
                          f"or use {otherwise}")
    return path


def from_pretrained_locally(load: Callable[..., Any], path: Path, problem: str, **kwargs: Any) -> Any:
    """``load(str(path), local_files_only=True, **kwargs)`` (a transformers ``from_pretrained``); its OSError or
    ValueError becomes a ConfigError naming ``path`` and the ``problem``."""
    try:
        return load(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: {problem} ({error})") from None


def _pad_id(tokenizer: Tokenizer, declared: int | None) -> int:
    if declared is not None:
        return int(declared)
    for token in ("[PAD]", "<pad>", "<|pad|>"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    return 0  # no pad token: padded positions are masked out anyway


def load_tokenizer(path: str | Path, max_length: int = 64) -> "ReportTokenizer":
    """The tokenizer of a local Hugging Face model directory, or a ``tokenizer.json`` file; never downloads.

    A directory without ``tokenizer.json`` (a slow, ``vocab.txt``-only tokenizer) is converted by
    ``transformers.AutoTokenizer(..., local_files_only=True)`` to its fast equivalent.
    """
    path = local_model_path(
        path, what="tokenizer", directory=False, otherwise="views.tokenizer: fit to fit one on the reports",
        give="a local Hugging Face model directory (e.g. one saved with save_pretrained) or a tokenizer.json file")
    declared_pad: int | None = None
    if path.is_file():
        tokenizer = Tokenizer.from_file(str(path))
    elif (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        declared_pad = _declared_pad_id(path)
    else:
        from transformers import AutoTokenizer  # heavy (~seconds): only for directories without tokenizer.json

        loaded = from_pretrained_locally(AutoTokenizer.from_pretrained, path, "no usable tokenizer in this directory",
                                         use_fast=True)
        if not getattr(loaded, "is_fast", False):
            raise ConfigError(f"{path}: the model's tokenizer has no fast (Rust) version radssl could use")
        tokenizer = Tokenizer.from_str(loaded.backend_tokenizer.to_str())
        declared_pad = loaded.pad_token_id
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return ReportTokenizer(tokenizer, max_length=max_length, source=str(path), pad_id=_pad_id(tokenizer, declared_pad))


def _declared_pad_id(directory: Path) -> int | None:
    """``pad_token`` of ``tokenizer_config.json`` / ``special_tokens_map.json``, as an id, when declared."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            config = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        token = config.get("pad_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            found = Tokenizer.from_file(str(directory / "tokenizer.json")).token_to_id(token)
            if found is not None:
                return int(found)
    return None


# ------------------------------------------------------------------------------------------------ object
class ReportTokenizer:
    """A ``tokenizers.Tokenizer`` plus the settings radssl encodes with (``max_length``, padding id, source)."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, source: str, pad_id: int = PAD) -> None:
        if max_length < 3:
            raise ConfigError(f"max_length {max_length} leaves no room for text between the special tokens; use >= 8")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.source = source
        self.pad_id = int(pad_id)
        self._truncating = Tokenizer.from_str(tokenizer.to_str())
        self._truncating.enable_truncation(self.max_length)
        self._truncating.no_padding()

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the embedding table of a text encoder needs at least this many rows)."""
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, texts: Sequence[object], where: str = "reports") -> TokenisedReports:
        """Token ids of every text, padded to the longest (≤ ``max_length``); truncation is recorded, not raised."""
        checked = check_texts(texts, where)
        distinct = sorted(set(checked))
        index = {text: i for i, text in enumerate(distinct)}
        encodings = self._truncating.encode_batch(distinct)
        ids = [e.ids for e in encodings]
        cut = np.array([bool(e.overflowing) for e in encodings], dtype=bool)
        width = max(1, max(len(x) for x in ids))
        table = torch.full((len(distinct), width), self.pad_id, dtype=torch.int64)
        for row, values in enumerate(ids):
            table[row, : len(values)] = torch.tensor(values, dtype=torch.int64)
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.int64)
        rows = torch.tensor([index[t] for t in checked], dtype=torch.int64)
        row_lengths = lengths[rows]
        mask = (torch.arange(width)[None, :] < row_lengths[:, None]).long()
        return TokenisedReports(table[rows], mask, row_lengths, cut[rows.numpy()])

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> str:
        """The whole tokenizer as one JSON string (what checkpoints store)."""
        return json.dumps({
            "format": FORMAT_VERSION,
            "source": self.source,
            "max_length": self.max_length,
            "pad_id": self.pad_id,
            "tokenizer": self.tokenizer.to_str(),
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ReportTokenizer":
        try:
            payload = json.loads(text)
            if payload.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {payload.get('format')} (this radssl reads {FORMAT_VERSION})")
            tokenizer = Tokenizer.from_str(payload["tokenizer"])
        except Exception as error:  # noqa: BLE001 - json/KeyError/TypeError, and tokenizers raises plain Exception
            raise ConfigError(f"not a radssl report tokenizer ({error})") from None
        return cls(tokenizer, max_length=int(payload["max_length"]), source=str(payload["source"]),
                   pad_id=int(payload["pad_id"]))

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def vocabulary_equals(self, other: "ReportTokenizer") -> bool:
        """Same token → id table (what decides whether an embedding trained with one fits the other)."""
        return self.tokenizer.get_vocab(with_added_tokens=True) == other.tokenizer.get_vocab(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"ReportTokenizer(source={self.source!r}, vocab_size={self.vocab_size}, max_length={self.max_length})"
