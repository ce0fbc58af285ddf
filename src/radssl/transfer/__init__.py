"""Transfer protocols: turn a (pretrained) backbone into diagnostic-task results on an ``ImageStore``.

- :mod:`~radssl.transfer.features` — the project-wide input normalisation and cached frozen features;
- :mod:`~radssl.transfer.linear_probe` — logistic regression on frozen features, C chosen on validation AUC;
- :mod:`~radssl.transfer.knn` — similarity-weighted kNN (Wu et al. 2018; DINO);
- :mod:`~radssl.transfer.finetune` — end-to-end fine-tuning with early stopping on validation AUC;
- :mod:`~radssl.transfer.metrics` — AUC / accuracy with clear errors where AUC is undefined;
- :mod:`~radssl.transfer.initialisation` — ``random``, ``imagenet:<pth>`` and ``ssl:<pt>`` backbones.

The two main functions that share their module's name are *not* re-exported here
(``from radssl.transfer.linear_probe import linear_probe``, ``from radssl.transfer.finetune import finetune``):
binding them on the package would shadow the submodules, and ``import radssl.transfer.finetune as m`` would
then return the function.
"""

from radssl.transfer.features import (
    NORMALISATION_MEAN,
    NORMALISATION_STD,
    FeatureCache,
    extract_features,
    normalise_for_backbone,
)
from radssl.transfer.finetune import Classifier, FinetuneResult, NonFiniteLossError, predict_scores
from radssl.transfer.initialisation import initialise_backbone, try_download_imagenet_weights
from radssl.transfer.knn import KnnResult, knn_classify, knn_evaluate
from radssl.transfer.linear_probe import ProbeResult
from radssl.transfer.metrics import PRIMARY_METRIC, classification_metrics

__all__ = [
    "NORMALISATION_MEAN",
    "NORMALISATION_STD",
    "PRIMARY_METRIC",
    "Classifier",
    "FeatureCache",
    "FinetuneResult",
    "KnnResult",
    "NonFiniteLossError",
    "ProbeResult",
    "classification_metrics",
    "extract_features",
    "initialise_backbone",
    "knn_classify",
    "knn_evaluate",
    "normalise_for_backbone",
    "predict_scores",
    "try_download_imagenet_weights",
]
