"""``image_text``: augmented image view(s) plus each image's tokenised report, for image–report pretraining.

Tokenisation happens once, in :meth:`ImageTextPolicy.prepare`: the tokenizer is fitted on the pretraining reports
(train + unlabelled images; never val/test) or loaded from a local model directory (``tokenizer``), every report is
encoded, and the token table is moved to the training device on the first step. A step then only indexes it
(trimmed to the longest report in the batch).

The policy owns the tokenizer because it is the stage that sees the reports; the method owns the text encoder.
The tokenizer reaches the method inside every batch (``ViewBatch.extras["tokenizer"]``: its JSON as a uint8 CPU
tensor, the same object each step), so the method stores it in its state dict and a checkpoint re-tokenises new
text exactly. What the batch holds: ``text = {input_ids, attention_mask, report_id}`` (report_id: equal for equal
report strings, so identical reports are not used as each other's negatives), ``has_text``.

Images without a report (empty string) are counted and handled as ``missing_report`` says:
``drop`` — they are not used: each is replaced in its batch by an image with a report drawn from the step's
generator; ``image_only`` — they stay in the batch with ``has_text`` false, so only an image-only loss term (a
method's ``image_loss``) uses them. Reports longer than ``max_length`` tokens are truncated (counted, logged, and
reported as ``reports_truncated`` in the run's metrics and ``run.json``).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from radssl.data.store import images_to_float
from radssl.errors import DataError
from radssl.text.tokenizer import FIT, ReportTokenizer, fit_tokenizer, load_tokenizer
from radssl.views.augment import BatchAugmenter
from radssl.views.batch import ViewBatch, ViewLayout
from radssl.views.columns import PairingColumns, codes
from radssl.views.policies import PolicyContext, ViewPolicy, ViewSettings, normalise_view

logger = logging.getLogger(__name__)

TOKENIZER_KEY = "tokenizer"
"""Key of ``ViewBatch.extras`` holding the policy's tokenizer (its JSON as a uint8 CPU tensor)."""


def tokenizer_tensor(tokenizer: ReportTokenizer) -> torch.Tensor:
    """The tokenizer as a uint8 tensor: how it travels to the method inside ``ViewBatch.extras``."""
    return torch.frombuffer(bytearray(tokenizer.to_json().encode("utf-8")), dtype=torch.uint8)


def tokenizer_from_tensor(blob: torch.Tensor) -> ReportTokenizer:
    """Inverse of :func:`tokenizer_tensor`."""
    return ReportTokenizer.from_json(blob.detach().cpu().numpy().tobytes().decode("utf-8"))


class ImageTextPolicyParams(BaseModel):
    """The ``views`` keys of the ``image_text`` policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokenizer: str = Field(FIT, description="'fit' (WordPiece fitted on the pretraining reports) or a local Hugging "
                                            "Face model directory / tokenizer.json (never downloaded)")
    vocab_size: int = Field(4096, ge=16, description="largest fitted vocabulary (special tokens included)")
    min_frequency: int = Field(2, ge=1, description="a merge must occur this often to enter the fitted vocabulary")
    lowercase: bool = True
    max_length: int = Field(128, ge=8, description="tokens per report incl. [CLS]/[SEP]; longer reports are "
                                                   "truncated (counted and logged)")
    missing_report: Literal["drop", "image_only"] = Field(
        "drop", description="images without a report: drop (not used) or image_only (only an image-only loss term)")
    image_views: int = Field(1, ge=1, le=2, description="augmented views per image: 2 for an image-only loss term")


class ImageTextPolicy(ViewPolicy):
    """One or two augmented views per image + its report's tokens."""

    name = "image_text"
    Params = ImageTextPolicyParams
    uses_pairing = False

    def __init__(self, settings: ViewSettings, context: PolicyContext) -> None:
        super().__init__(settings, context)
        self.augmenter = BatchAugmenter(settings.augment, context.output_size)
        self.tokenizer: ReportTokenizer | None = None
        self._columns: PairingColumns | None = None
        self._cpu: dict[str, torch.Tensor] = {}
        self._device: dict[str, torch.Tensor] = {}
        self._tokenizer_blob: torch.Tensor | None = None

    def layout(self) -> ViewLayout:
        return ViewLayout(sizes=(self.context.output_size,) * self.params.image_views, text=True)

    # ------------------------------------------------------------------ once per run
    def prepare(self, columns: PairingColumns) -> dict[str, float]:
        """Fit/load the tokenizer on the pretraining reports and tokenise them all; errors before any compute."""
        super().prepare(columns)
        params: ImageTextPolicyParams = self.params  # type: ignore[assignment]
        if columns.reports is None:
            raise DataError(
                "views.policy image_text",
                "the pretraining images carry no reports (no 'report' column in the data)",
                "synthetic data: set data.reports: true; an image folder: set source.report_column; DICOM/NIfTI: "
                "set source.report_csv (+ report_key, report_column)",
            )
        reports = [text.strip() for text in columns.reports]
        has_text = np.array([text != "" for text in reports], dtype=bool)
        if not has_text.any():
            raise DataError("views.policy image_text", f"none of the {len(reports)} pretraining images has a report",
                            "check the report column / report CSV keys")
        if params.tokenizer == FIT:
            tokenizer = fit_tokenizer([t for t, ok in zip(reports, has_text) if ok], params.vocab_size,
                                      params.min_frequency, params.lowercase, params.max_length,
                                      where="pretraining reports")
        else:
            tokenizer = load_tokenizer(params.tokenizer, params.max_length)
        tokens = tokenizer.encode(reports, where="pretraining reports")
        truncated = int(tokens.truncated[has_text].sum())
        missing = int((~has_text).sum())
        if truncated:
            logger.warning("image_text: %d of %d reports are longer than max_length=%d tokens and were truncated "
                           "(raise views.max_length to keep more)", truncated, int(has_text.sum()), params.max_length)
        if missing:
            logger.warning("image_text: %d of %d pretraining images have no report (missing_report: %s)", missing,
                           len(reports), params.missing_report)
        self.tokenizer = tokenizer
        self._columns = columns
        self._cpu = {
            "input_ids": tokens.input_ids,
            "attention_mask": tokens.attention_mask,
            "lengths": tokens.lengths,
            "report_id": codes(np.asarray(reports, dtype=object).astype(str)),
            "has_text": torch.from_numpy(has_text),
            "with_text": torch.from_numpy(np.flatnonzero(has_text)),
        }
        self._device = {}
        self._tokenizer_blob = tokenizer_tensor(tokenizer)
        return {
            "report_coverage": float(has_text.mean()),
            "reports_missing": float(missing),
            "reports_truncated": float(truncated),
            "tokenizer_vocab": float(tokenizer.vocab_size),
        }

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        if not self._device or self._device["input_ids"].device != device:
            self._device = {key: value.to(device) for key, value in self._cpu.items()}
        return self._device

    # ------------------------------------------------------------------ per step
    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, images: torch.Tensor, columns: PairingColumns,
                 generator: torch.Generator) -> ViewBatch:
        if self._columns is not columns:
            self.prepare(columns)
        tables = self._tables(rows.device)
        has_text = tables["has_text"][rows]
        if self.params.missing_report == "drop" and not bool(has_text.all()):
            with_text = tables["with_text"]
            missing = (~has_text).nonzero().squeeze(1)
            draw = torch.randint(len(with_text), (len(missing),), generator=generator, device=generator.device)
            rows = rows.clone()
            rows[missing] = with_text[draw.to(rows.device)]
            has_text = tables["has_text"][rows]
        pixels = images_to_float(images.index_select(0, rows))
        views = [normalise_view(self.augmenter(pixels, generator), self.context.channels_last)
                 for _ in range(self.params.image_views)]
        width = int(tables["lengths"][rows].max())
        text = {
            "input_ids": tables["input_ids"][rows, :width],
            "attention_mask": tables["attention_mask"][rows, :width],
            "report_id": tables["report_id"][rows],
        }
        assert self._tokenizer_blob is not None
        return ViewBatch(views=views, rows=rows, text=text, has_text=has_text,
                         extras={TOKENIZER_KEY: self._tokenizer_blob})
