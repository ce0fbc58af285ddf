"""Embeddings out: one pooled feature vector per image, with its row id, patient id, split and label.

``radssl embed CONFIG --checkpoint … --out FILE.parquet|.npz|.csv`` — for downstream tools (a classifier in another
stack, a vector index) and for looking at the data (UMAP, near-duplicate and leakage checks across patients).
Features are extracted batch by batch on the chosen device in eval mode, with the same input normalisation as every
other stage (:func:`radssl.transfer.features.extract_features`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from radssl.atomic import write_bytes_atomic, write_text_atomic
from radssl.data.store import ImageStore
from radssl.errors import ConfigError
from radssl.transfer.features import extract_features

EMBED_FORMATS = (".parquet", ".npz", ".csv")


def embedding_table(store: ImageStore, backbone: nn.Module, batch_size: int = 256,
                    device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Columns ``row``, ``patient_id``, ``split``, ``label`` and ``embedding`` (N, D) float32, one row per image."""
    features = extract_features(backbone, store.images, batch_size=batch_size, device=device).numpy()
    labels = store.labels.cpu().numpy()
    return {"row": np.arange(len(store), dtype=np.int64), "patient_id": np.asarray(store.patient_id, dtype=str),
            "split": np.asarray(store.split, dtype=str), "label": labels,
            "embedding": features.astype(np.float32)}


def write_embeddings(table: dict[str, np.ndarray], out: Path | str, provenance: dict[str, Any] | None = None) -> Path:
    """Write the table as Parquet (embedding: a fixed-size list column), NPZ (arrays) or CSV (``e0 … e{D-1}``).

    Parquet keeps ``provenance`` (backbone, weights, data fingerprint) in the file's metadata; NPZ holds it as a
    JSON string ``provenance``; CSV gets a ``<file>.json`` beside it. Writes are atomic.
    """
    out = Path(out)
    if out.suffix not in EMBED_FORMATS:
        raise ConfigError(f"{out}: embeddings are written as {', '.join(EMBED_FORMATS)} — choose one")
    meta = json.dumps(provenance or {}, default=str)
    embedding = table["embedding"]
    labels = table["label"]
    if out.suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, **table, provenance=np.asarray(meta))
        write_bytes_atomic(out, buffer.getvalue())
    elif out.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"{out}: Parquet needs pyarrow (pip install 'radssl[export]'); or write .npz / .csv") \
                from None

        label_column = pa.array(list(labels)) if labels.ndim > 1 else pa.array(labels)
        columns = {"row": pa.array(table["row"]), "patient_id": pa.array(table["patient_id"]),
                   "split": pa.array(table["split"]), "label": label_column,
                   "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embedding.reshape(-1)), embedding.shape[1])}
        arrow = pa.table(columns).replace_schema_metadata({"radssl": meta})
        sink = pa.BufferOutputStream()
        pq.write_table(arrow, sink)
        write_bytes_atomic(out, sink.getvalue().to_pybytes())
    else:
        import csv

        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["row", "patient_id", "split", "label", *[f"e{i}" for i in range(embedding.shape[1])]])
        for i in range(len(embedding)):
            label = labels[i] if labels.ndim == 1 else ";".join(str(v) for v in labels[i])
            writer.writerow([int(table["row"][i]), table["patient_id"][i], table["split"][i], label,
                             *(f"{v:.8g}" for v in embedding[i])])
        write_text_atomic(out, text.getvalue())
        write_text_atomic(out.with_name(out.name + ".json"), meta)
    return out
