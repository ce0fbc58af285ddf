"""Real image–text pairs (covid_chestxray_notes via RADSSL_DATA_DIR): reports joined from the CSV, patient-level
splits, tokenisation with truncation counted, and ConVIRT learning an alignment on real notes. Slow (minutes)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from radssl.config import PretrainConfig
from radssl.data.build import build_store
from radssl.engine.pretrain import pretrain
from radssl.transfer.zero_shot import retrieval_on_store


def _root() -> Path:
    root = os.environ.get("RADSSL_DATA_DIR")
    if not root or not (Path(root) / "covid_chestxray_notes" / "reports.csv").is_file():
        pytest.skip("covid_chestxray_notes not found under RADSSL_DATA_DIR")
    return Path(root) / "covid_chestxray_notes"


@pytest.mark.slow
def test_convirt_aligns_real_images_with_their_clinical_notes(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    root = _root()
    config = PretrainConfig.model_validate({
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "data": {"name": "covid_notes",
                 "source": {"kind": "folder", "root": str(root), "csv": "reports.csv", "path_column": "image",
                            "label_columns": ["modality"], "patient_column": "patient_id", "report_column": "text"},
                 "preprocess": {"modality": "xray", "target_size": [32, 32]}, "cache_dir": str(tmp_path / "cache")},
        "model": {"backbone": "small_cnn"},
        "method": {"name": "convirt"},
        "views": {"max_length": 64},
        "train": {"steps": 150, "batch_size": 32, "progress_bar": False, "accelerator": "cpu", "log_every": 25},
        "eval": {"enabled": False},
    })
    store = build_store(config.data)
    assert len(store) == 343 and store.describe()["reports"] == {"with_report": 343, "without_report": 0}
    for split in ("val", "test"):  # held-out patients
        assert not set(store.patient_id[store.indices("train")]) & set(store.patient_id[store.indices(split)])
    result = pretrain(config, store=store)
    run = result.run_record
    assert run["reports_truncated"] > 0, "median notes are ~50 words: many exceed 64 tokens and are counted"
    assert run["report_coverage"] == 1.0
    train = retrieval_on_store(result.method, store, store.indices("train"))
    assert train.distinct_texts < train.images, "notes shared by a case's images count once"
    for direction, chance in (("image_to_text", train.chance_image_to_text),
                              ("text_to_image", train.chance_text_to_image)):
        recall = getattr(train, direction)
        assert recall[10] > 2 * chance[10], f"{direction}: R@10 {recall[10]:.3f} vs chance {chance[10]:.3f}"
    test = retrieval_on_store(result.method, store, store.indices("test"))
    print("held-out patients:", test.as_dict())
    # Held-out patients against chance. Measured at this 150-step budget (65 test images, 55 distinct notes):
    # image→text R@10 .215 vs chance .182, text→image .182 vs .177 — at chance, not significantly above it (the
    # longer run of benchmarks/multimodal.py reaches .279 vs .182). So the check is that held-out recall is not
    # below chance by more than two standard errors of its per-query hits: a retrieval that pairs images with the
    # wrong notes or ranks the wrong way round falls below it; a claim of generalisation needs the benchmark.
    for direction, per_query, chance in (("image_to_text", test.per_image, test.chance_image_to_text),
                                         ("text_to_image", test.per_text, test.chance_text_to_image)):
        k = list(getattr(test, direction)).index(10)
        hits = per_query[:, k]
        se = hits.std(ddof=1) / np.sqrt(len(hits))
        assert hits.mean() >= chance[10] - 2 * se, f"held-out {direction}: R@10 {hits.mean():.3f} vs chance " \
                                                   f"{chance[10]:.3f} (SE {se:.3f})"
