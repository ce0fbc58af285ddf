"""Read-outs of an image–report model: zero-shot classification from class prompts, and cross-modal retrieval.

Plain functions over embeddings, so a study protocol can wrap them and every score is per case:

* :func:`zero_shot_scores` — CLIP's zero-shot classifier (Radford et al., 2021): each class is described by one or
  more prompts; the prompts' L2-normalised embeddings are averaged per class and re-normalised (prompt
  ensembling), and an image's class probabilities are the softmax of its scaled cosine similarities to the classes.
  Scores follow the project's convention (binary: P(class 1) per case), so :func:`classification_metrics` gives AUC.
* :func:`retrieval_recall` — image→text and text→image Recall@K on held-out pairs. Reports shared by several images
  (a study's report attached to each of its images, identical normal reports) are handled as *one* text: the text
  gallery holds each distinct report once, an image→text retrieval is correct if the retrieved text equals the
  image's own report, and a text→image query is correct if any image carrying that report is retrieved. Ties are
  broken at random *in expectation* (the exact probability of a hit under a uniformly random order of tied
  candidates), so a collapsed model that embeds everything alike scores chance, not 100 %. Chance levels are
  computed with the same formula for all-equal similarities.

:func:`load_image_text_method` rebuilds a trained ConVIRT/CLIP model from its checkpoint (backbone by spec, text
encoder and tokenizer from the state dict) for these read-outs; every other transfer protocol uses the image encoder
through the checkpoint's ``backbone`` as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, field_validator

from radssl.data.store import ImageStore, StoreRows, TaskInfo, normalise_for_backbone
from radssl.engine.checkpoint import load_checkpoint
from radssl.errors import CheckpointError, ConfigError
from radssl.methods.image_text import ImageTextMethod
from radssl.methods.registry import build_method
from radssl.models.registry import build_from_spec
from radssl.transfer.initialisation import checkpoint_backbone_spec
from radssl.transfer.metrics import classification_metrics

DEFAULT_KS = (1, 5, 10)


# ------------------------------------------------------------------------------------------------ loading
def load_image_text_method(checkpoint: str | Path, device: str | torch.device = "cpu") -> ImageTextMethod:
    """The trained image–text method of a checkpoint (eval mode), with the tokenizer it was trained with."""
    state = load_checkpoint(Path(checkpoint))
    config = state.get("config") or {}
    method_section = dict(config.get("method") or {})
    name = str(state.get("method_name") or method_section.get("name", ""))
    params = {k: v for k, v in method_section.items() if k not in ("name", "preset")}
    spec = checkpoint_backbone_spec(state, str(checkpoint))
    method = build_method(name, build_from_spec(spec), params)
    if not isinstance(method, ImageTextMethod):
        raise CheckpointError(f"{checkpoint}: method '{name}' is not an image–text method (zero-shot and retrieval "
                              "need ConVIRT or CLIP-style checkpoints)")
    try:
        method.load_state_dict(state["method"], strict=True)
    except (KeyError, RuntimeError) as error:
        raise CheckpointError(f"{checkpoint}: the method state does not fit '{name}' ({error})") from None
    if method.text_encoder.tokenizer is None:
        raise CheckpointError(f"{checkpoint}: holds no tokenizer (written before the first training step?)")
    return method.to(device).eval()


@torch.no_grad()
def embed_images(method: ImageTextMethod, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, D) L2-normalised joint-space embeddings of stored images (uint8/float, (N, C, ...)), eval mode, CPU."""
    device = next(method.parameters()).device
    was_training = method.training
    method.eval()
    try:
        chunks = [method.encode_images(normalise_for_backbone(images[i : i + batch_size].to(device))).float().cpu()
                  for i in range(0, images.shape[0], batch_size)]
    finally:
        method.train(was_training)
    return F.normalize(torch.cat(chunks), dim=1) if chunks else torch.empty(0, method.params.projection_dim)


# ------------------------------------------------------------------------------------------------ zero-shot
class ZeroShotPrompts(BaseModel):
    """Class name → prompts (one or several; their embeddings are averaged). Written in a config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: dict[str, list[str]]

    @field_validator("prompts")
    @classmethod
    def _non_empty(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        if len(value) < 2:
            raise ValueError("zero-shot prompts must describe at least 2 classes")
        empty = [name for name, texts in value.items() if not texts or not all(t.strip() for t in texts)]
        if empty:
            raise ValueError(f"classes {empty} have no (or an empty) prompt")
        return value

    def ordered(self, task: TaskInfo) -> list[list[str]]:
        """Prompts in the task's class order; a ConfigError naming missing or unknown classes."""
        names = list(task.class_names)
        missing, unknown = [n for n in names if n not in self.prompts], [n for n in self.prompts if n not in names]
        if missing or unknown:
            raise ConfigError(f"zero-shot prompts name classes {sorted(self.prompts)} but the task's classes are "
                              f"{names} (missing: {missing}, unknown: {unknown}) — write prompts for exactly these")
        return [self.prompts[n] for n in names]


def class_embeddings(prompt_embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
    """(K, D): per class, the mean of its prompts' L2-normalised embeddings, re-normalised."""
    return F.normalize(torch.stack([F.normalize(e.float(), dim=1).mean(0) for e in prompt_embeddings]), dim=1)


def zero_shot_scores(image_embeddings: torch.Tensor, prompt_embeddings: Sequence[torch.Tensor],
                     logit_scale: float = 1.0, task_kind: str = "binary") -> np.ndarray:
    """Per-case scores: binary (N,) P(class 1); multiclass (N, K) probabilities — softmax of scaled cosines."""
    classes = class_embeddings(prompt_embeddings)
    logits = logit_scale * F.normalize(image_embeddings.float(), dim=1) @ classes.T
    probabilities = logits.softmax(dim=1).numpy()
    return probabilities[:, 1] if task_kind == "binary" else probabilities


@dataclass
class ZeroShotResult:
    scores: np.ndarray
    """Per case, in the project's score convention."""
    metrics: dict[str, float]
    rows: np.ndarray


def zero_shot_classify(method: ImageTextMethod, store: ImageStore, rows: np.ndarray, prompts: ZeroShotPrompts,
                       name: str = "test set") -> ZeroShotResult:
    """Zero-shot scores and metrics (AUC, accuracy) of ``method`` on ``store`` rows, unlabelled rows left out."""
    if store.task.kind not in ("binary", "multiclass"):
        raise ConfigError(f"zero-shot classification needs a binary or multiclass task, the data are {store.task.kind}")
    rows = np.asarray(rows)
    rows = rows[store.labels[torch.from_numpy(rows)].numpy() >= 0]
    ordered = prompts.ordered(store.task)
    image = embed_images(method, StoreRows(store.images, rows))
    texts = [method.embed_texts(list(p)) for p in ordered]
    scores = zero_shot_scores(image, texts, float(method.logit_scale().detach()), store.task.kind)
    metrics = classification_metrics(store.task, store.labels[torch.from_numpy(rows)].numpy(), scores, name=name)
    return ZeroShotResult(scores=scores, metrics=metrics, rows=rows)


# ------------------------------------------------------------------------------------------------ retrieval
def _hit_probability(greater: int, positives: int, tied_negatives: int, k: int) -> float:
    """P(at least one of ``positives`` tied candidates is in the top k) when ``greater`` negatives rank strictly
    above them and they tie with ``tied_negatives`` others, the tied block ordered uniformly at random."""
    slots = k - greater
    if slots <= 0:
        return 0.0
    if slots > tied_negatives:
        return 1.0
    miss = 1.0
    for j in range(slots):  # P(the first `slots` of the tied block are all negatives), hypergeometric
        miss *= (tied_negatives - j) / (positives + tied_negatives - j)
    return 1.0 - miss


def _hits(similarity: np.ndarray, positive: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """(Q, len(ks)) hit probabilities: per query row, its positives (bool mask) among all candidates."""
    out = np.zeros((similarity.shape[0], len(ks)))
    for q in range(similarity.shape[0]):
        sims, pos = similarity[q], positive[q]
        best = sims[pos].max()
        greater = int((sims[~pos] > best).sum())
        tied_pos = int((sims[pos] == best).sum())
        tied_neg = int((sims[~pos] == best).sum())
        out[q] = [_hit_probability(greater, tied_pos, tied_neg, k) for k in ks]
    return out


@dataclass
class RetrievalResult:
    """Recall@K both ways, chance levels, and the per-query hit probabilities (for statistics over cases)."""

    image_to_text: dict[int, float]
    text_to_image: dict[int, float]
    chance_image_to_text: dict[int, float]
    chance_text_to_image: dict[int, float]
    images: int
    distinct_texts: int
    per_image: np.ndarray = field(repr=False)
    """(N, len(ks)) image→text hit probability per image query."""
    per_text: np.ndarray = field(repr=False)
    """(U, len(ks)) text→image hit probability per distinct-text query."""

    def as_dict(self) -> dict[str, object]:
        return {
            "images": self.images, "distinct_texts": self.distinct_texts,
            "image_to_text": {f"R@{k}": v for k, v in self.image_to_text.items()},
            "text_to_image": {f"R@{k}": v for k, v in self.text_to_image.items()},
            "chance_image_to_text": {f"R@{k}": v for k, v in self.chance_image_to_text.items()},
            "chance_text_to_image": {f"R@{k}": v for k, v in self.chance_text_to_image.items()},
        }


def retrieval_recall(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, texts: Sequence[str],
                     ks: Sequence[int] = DEFAULT_KS) -> RetrievalResult:
    """Recall@K for N image–report pairs (``texts[i]`` is image i's report, ``text_embeddings[i]`` its embedding).

    Equal report strings form one gallery entry (the first occurrence's embedding; identical strings embed
    identically). Chance: image→text ``min(K, U)/U``; text→image ``1 − C(N−m, K)/C(N, K)`` for a report shared by
    m of the N images, averaged over the U distinct reports.
    """
    texts = [str(t) for t in texts]
    n = len(texts)
    if image_embeddings.shape[0] != n or text_embeddings.shape[0] != n:
        raise ValueError(f"{image_embeddings.shape[0]} images, {text_embeddings.shape[0]} text embeddings and {n} "
                         "texts: one report per image is needed")
    if n == 0:
        raise ValueError("retrieval needs at least one image–report pair")
    distinct, first, owner = np.unique(np.asarray(texts, dtype=object).astype(str), return_index=True,
                                       return_inverse=True)
    image = F.normalize(image_embeddings.float(), dim=1)
    gallery = F.normalize(text_embeddings.float()[torch.from_numpy(first)], dim=1)
    similarity = (image @ gallery.T).numpy()  # (N, U)
    u = len(distinct)
    image_positive = owner[:, None] == np.arange(u)[None, :]
    per_image = _hits(similarity, image_positive, ks)
    per_text = _hits(similarity.T, image_positive.T, ks)
    chance_image = _hits(np.zeros((1, u)), np.eye(1, u, dtype=bool), ks)[0]
    counts = np.bincount(owner, minlength=u)
    chance_text = np.mean([[_hit_probability(0, int(m), n - int(m), k) for k in ks] for m in counts], axis=0)
    return RetrievalResult(
        image_to_text={k: float(v) for k, v in zip(ks, per_image.mean(0))},
        text_to_image={k: float(v) for k, v in zip(ks, per_text.mean(0))},
        chance_image_to_text={k: float(v) for k, v in zip(ks, chance_image)},
        chance_text_to_image={k: float(v) for k, v in zip(ks, chance_text)},
        images=n, distinct_texts=u, per_image=per_image, per_text=per_text,
    )


def retrieval_on_store(method: ImageTextMethod, store: ImageStore, rows: np.ndarray,
                       ks: Sequence[int] = DEFAULT_KS) -> RetrievalResult:
    """Retrieval among the ``rows`` of ``store`` that have a report (e.g. the test split: held-out patients)."""
    if "report" not in store.meta:
        raise ConfigError(f"{store.name}: the data carry no reports, so retrieval cannot be measured")
    rows = np.asarray(rows)
    reports = np.asarray(store.meta["report"], dtype=object)[rows].astype(str)
    keep = np.char.strip(reports.astype(str)) != ""
    rows, reports = rows[keep], [r.strip() for r in reports[keep]]
    image = embed_images(method, StoreRows(store.images, rows))
    text = method.embed_texts(list(reports))
    return retrieval_recall(image, text, reports, ks)

