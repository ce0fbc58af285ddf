"""Report tokenizer: deterministic fitting, exact round trip through JSON, documented truncation, bad text."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from radssl.errors import ConfigError, DataError
from radssl.text.tokenizer import (
    ReportTokenizer,
    fit_tokenizer,
    load_tokenizer,
    word_counts,
    wordpiece_vocabulary,
)

REPORTS = [
    "Small rounded opacity in the left upper zone, suspicious for a pulmonary nodule.",
    "The lungs are clear. No focal opacity or nodule.",
    "Right lower zone nodule, moderate-sized. Patient slightly rotated.",
    "Heart size is normal. Lungs are clear, no nodule.",
    "Consolidation in the right upper lobe and ground-glass opacities in both lower lobes.",
    "Bilateral patchy opacities; intubated, with an endotracheal tube in place.",
] * 3


def test_vocabulary_merges_most_frequent_pair_first_and_breaks_ties_by_text() -> None:
    counts = Counter({"ab": 3, "cd": 3, "ef": 1})
    # 5 special tokens + 6 characters = 11; room for one merge: (a, ##b) and (c, ##d) tie at 3 → the smaller text.
    vocab = wordpiece_vocabulary(counts, vocab_size=12, min_frequency=1)
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert sorted(vocab[5:11]) == ["##b", "##d", "##f", "a", "c", "e"] and vocab[11:] == ["ab"]
    assert wordpiece_vocabulary(counts, vocab_size=100, min_frequency=2)[11:] == ["ab", "cd"]  # ef occurs once
    # Merges continue on merged symbols: (a, ##b) and (##b, ##c) tie, "##b" < "a" in text order, so "##bc" comes
    # first, then (a, ##bc) → "abc".
    assert wordpiece_vocabulary(Counter({"abc": 4}), vocab_size=100, min_frequency=1)[-2:] == ["##bc", "abc"]


def test_fitting_is_a_pure_function_of_the_reports() -> None:
    first = fit_tokenizer(REPORTS, vocab_size=120, min_frequency=1)
    shuffled = fit_tokenizer(list(reversed(REPORTS)) + REPORTS[:2], vocab_size=120, min_frequency=1)
    assert first.to_json() == shuffled.to_json(), "order and duplicates of reports must not change the tokenizer"
    for _ in range(3):  # Hugging Face's own WordPieceTrainer gives a different vocabulary on most of these fits
        assert fit_tokenizer(REPORTS, vocab_size=120, min_frequency=1).fingerprint == first.fingerprint
    assert first.vocab_size <= 120


def test_encoding_roundtrips_through_json_exactly() -> None:
    tokenizer = fit_tokenizer(REPORTS, vocab_size=200, min_frequency=1, max_length=24)
    restored = ReportTokenizer.from_json(tokenizer.to_json())
    new_text = ["Left upper zone nodule, unchanged.", "Lungs clear.", "Pneumothorax on the right; 😀 émoji."]
    a, b = tokenizer.encode(new_text), restored.encode(new_text)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    ids = a.input_ids[1, : int(a.lengths[1])].tolist()
    assert ids[0] == 2 and ids[-1] == 3, "[CLS] … [SEP]"
    assert (a.input_ids[1, int(a.lengths[1]):] == 0).all() and a.attention_mask[1].sum() == a.lengths[1]


def test_long_reports_are_truncated_and_flagged_not_rejected() -> None:
    tokenizer = fit_tokenizer(REPORTS, vocab_size=200, min_frequency=1, max_length=12)
    long = " ".join(REPORTS[:4]) * 20
    tokens = tokenizer.encode([long, "Lungs are clear.", ""])
    assert tokens.input_ids.shape[1] == 12 and int(tokens.lengths[0]) == 12
    assert tokens.truncated.tolist() == [True, False, False] and tokens.truncated_count == 1
    assert int(tokens.input_ids[0, 11]) == 3, "a truncated report still ends with [SEP]"
    assert int(tokens.lengths[2]) == 2, "an empty report is [CLS] [SEP]"


def test_text_that_is_not_valid_unicode_is_a_clear_error_naming_the_row() -> None:
    tokenizer = fit_tokenizer(REPORTS, vocab_size=200, min_frequency=1)
    broken = b"Opacit\xe9 in the left lung".decode("utf-8", errors="surrogateescape")  # latin-1 read as UTF-8
    with pytest.raises(DataError, match=r"row 1 .*not valid Unicode.*report_encoding"):
        tokenizer.encode(["Lungs are clear.", broken])
    with pytest.raises(DataError, match="row 0 is not UTF-8"):
        tokenizer.encode([b"Opacit\xe9"])
    assert tokenizer.encode([b"Opacit\xc3\xa9"]).input_ids.shape[0] == 1  # UTF-8 bytes are decoded


def test_fitting_needs_some_text() -> None:
    with pytest.raises(DataError, match="no non-empty report"):
        fit_tokenizer(["", "   "])


def test_local_hugging_face_tokenizer_loads_offline_and_missing_paths_are_errors(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fitted = fit_tokenizer(REPORTS, vocab_size=150, min_frequency=1)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=fitted.tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                      cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    wrapped.save_pretrained(tmp_path / "model")
    loaded = load_tokenizer(tmp_path / "model", max_length=32)
    assert loaded.vocabulary_equals(fitted) and loaded.pad_id == 0 and loaded.source == str(tmp_path / "model")
    assert torch.equal(loaded.encode(REPORTS).input_ids, fitted.encode(REPORTS).input_ids)
    assert load_tokenizer(tmp_path / "model" / "tokenizer.json").vocabulary_equals(fitted)
    with pytest.raises(ConfigError, match="not found.*never downloads"):
        load_tokenizer(tmp_path / "no-such-model")


def test_word_counts_use_bert_normalisation() -> None:
    counts = word_counts(["Opacité, LEFT lung."], lowercase=True)
    assert counts == Counter({"opacite": 1, ",": 1, "left": 1, "lung": 1, ".": 1})
