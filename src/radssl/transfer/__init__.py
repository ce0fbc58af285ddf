"""Transfer protocols: turn a (pretrained) backbone into diagnostic-task results on an ``ImageStore``.

- :mod:`~radssl.transfer.features` — the project-wide input normalisation and cached frozen features;
- :mod:`~radssl.transfer.linear_probe` — logistic regression on frozen features, C chosen on validation AUC;
- :mod:`~radssl.transfer.knn` — similarity-weighted kNN (Wu et al. 2018; DINO);
- :mod:`~radssl.transfer.finetune` — end-to-end fine-tuning with early stopping on validation AUC;
- :mod:`~radssl.transfer.metrics` — AUC / accuracy with clear errors where AUC is undefined;
- :mod:`~radssl.transfer.initialisation` — ``random``, ``imagenet:<pth>`` and ``ssl:<pt>`` backbones.

Names are imported lazily (PEP 562) so that pretraining code importing ``normalise_for_backbone`` does not
pay for scikit-learn.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NORMALISATION_MEAN": "features",
    "NORMALISATION_STD": "features",
    "FeatureCache": "features",
    "extract_features": "features",
    "normalise_for_backbone": "features",
    "PRIMARY_METRIC": "metrics",
    "classification_metrics": "metrics",
    "ProbeResult": "linear_probe",
    "linear_probe": "linear_probe",
    "KnnResult": "knn",
    "knn_classify": "knn",
    "knn_evaluate": "knn",
    "Classifier": "finetune",
    "FinetuneResult": "finetune",
    "NonFiniteLossError": "finetune",
    "finetune": "finetune",
    "predict_scores": "finetune",
    "initialise_backbone": "initialisation",
    "try_download_imagenet_weights": "initialisation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
