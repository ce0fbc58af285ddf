"""What ConVIRT and CLIP-style pretraining share: the image–report InfoNCE loss and the two-tower method.

The loss (:func:`image_text_loss`) is written here rather than taken from lightly: lightly's NT-Xent contrasts two
views of one modality with one symmetric weight, while image–text pretraining needs separate image→text and
text→image terms with ConVIRT's λ, a temperature or CLIP's learnable logit scale, rows without a report, and reports
shared by several images. Two rules beyond the papers, both reducing to them when every report is distinct and
present:

* **Shared reports are not negatives.** A study's report is often attached to all its images, and normal reports
  are often word-for-word identical; a batch then holds the same text several times. Contrasting an image with an
  identical copy of its own report is contradictory, so for pair i the columns j ≠ i carrying the same report id
  are left out of the softmax (the positive stays pair i's own column).
* **Rows without a report** (``has_text`` false; ``views.missing_report: image_only``) are neither anchors nor
  negatives; they can still feed the optional image-only term.

Under DDP (``gather_distributed``) embeddings are gathered from every process with lightly's gradient-carrying
``gather``, each rank scores its own rows against the global batch, and the per-rank loss is scaled so that the
mean over ranks (what DDP's gradient averaging optimises) is the loss of the global batch.

A method owns its text encoder (:mod:`radssl.text.encoder`). The tokenizer is fitted or loaded by the view policy
(``image_text``), which sees the reports; the policy hands it over with every batch
(``ViewBatch.extras["tokenizer"]``, the tokenizer JSON as bytes) and the method binds it to its text encoder on the
first batch, so checkpoints carry it and a resumed run checks that the views still tokenise the same way.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.utils import dist as lightly_dist
from pydantic import Field
from torch import nn

from radssl.errors import ConfigError
from radssl.methods.base import MethodOutput, MethodParams, SSLMethod
from radssl.models.base import Backbone
from radssl.text.encoder import TextEncoder, build_text_encoder, encode_in_batches
from radssl.views.batch import ViewBatch, ViewRequirements
from radssl.views.image_text import TOKENIZER_KEY, tokenizer_from_tensor

# ---------------------------------------------------------------------------------------------------- loss
def _gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def image_text_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor | float,
    image_to_text_weight: float = 0.5,
    has_text: torch.Tensor | None = None,
    report_ids: torch.Tensor | None = None,
    gather_distributed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bidirectional InfoNCE between B images and their B reports: (loss, image→text term, text→image term).

    ``loss = w · L(image→text) + (1 − w) · L(text→image)`` with ``w = image_to_text_weight`` (ConVIRT's λ; 0.5 is
    CLIP's symmetric loss), each term the mean over pairs of ``−log softmax(scale · cos)`` at the pair's own column.
    ``has_text`` (B,) bool drops rows without a report; ``report_ids`` (B,) int: columns j ≠ i with pair i's report id
    are left out of pair i's softmax (identical reports are not negatives of each other).
    """
    batch = image_embeddings.shape[0]
    device = image_embeddings.device
    image = F.normalize(image_embeddings.float(), dim=1)
    text = F.normalize(text_embeddings.float(), dim=1)
    valid = torch.ones(batch, dtype=torch.bool, device=device) if has_text is None else has_text.to(device).bool()
    world = lightly_dist.world_size() if gather_distributed else 1
    offset = lightly_dist.rank() * batch if world > 1 else 0
    ids = torch.arange(batch, device=device) + offset if report_ids is None else report_ids.to(device).long()
    if world > 1:
        all_image = torch.cat(lightly_dist.gather(image))
        all_text = torch.cat(lightly_dist.gather(text))
        all_valid = _gather_no_grad(valid)
        all_ids = _gather_no_grad(ids)
        valid_total = all_valid.sum()
    else:
        all_image, all_text, all_valid, all_ids, valid_total = image, text, valid, ids, valid.sum()
    own = torch.arange(batch, device=device) + offset
    is_own = torch.zeros(batch, all_ids.shape[0], dtype=torch.bool, device=device)
    is_own[torch.arange(batch, device=device), own] = True
    excluded = ((~all_valid)[None, :] | (ids[:, None] == all_ids[None, :])) & ~is_own
    scale = logit_scale if torch.is_tensor(logit_scale) else torch.tensor(float(logit_scale), device=device)
    image_to_text = (scale * image @ all_text.T).masked_fill(excluded, float("-inf"))
    text_to_image = (scale * text @ all_image.T).masked_fill(excluded, float("-inf"))
    per_pair_it = F.cross_entropy(image_to_text, own, reduction="none")
    per_pair_ti = F.cross_entropy(text_to_image, own, reduction="none")
    # Sum over this rank's valid pairs / (valid pairs in the global batch / world): the mean over ranks is the
    # global mean. torch.where, not a product, so a row without text (0 · finite) can never turn into NaN.
    norm = world / valid_total.clamp_min(1).float()
    term_it = torch.where(valid, per_pair_it, torch.zeros_like(per_pair_it)).sum() * norm
    term_ti = torch.where(valid, per_pair_ti, torch.zeros_like(per_pair_ti)).sum() * norm
    loss = image_to_text_weight * term_it + (1.0 - image_to_text_weight) * term_ti
    return loss, term_it, term_ti


# --------------------------------------------------------------------------------------------------- method
class ImageTextParams(MethodParams):
    """Text tower, projections, image-only term and gathering; shared by ConVIRT and CLIP-style."""

    text_encoder: str = Field("scratch", description="'scratch' (small Transformer trained here) or a local "
                                                     "Hugging Face model directory (never downloaded)")
    text_vocab_size: int = Field(4096, gt=4, description="token embedding rows of the scratch encoder "
                                                         "(>= the fitted tokenizer's vocabulary, views.vocab_size)")
    text_width: int = Field(64, gt=0, description="scratch encoder width (the 'tiny' default: benchmarks/multimodal.py)")
    text_depth: int = Field(1, ge=1, description="scratch encoder Transformer layers")
    text_heads: int = Field(4, ge=1)
    text_pooling: Literal["mean", "cls"] | None = Field(None, description="null: mean (scratch), cls (pretrained)")
    text_trainable_layers: int | None = Field(None, ge=0, description="pretrained encoder: train only the last k "
                                                                     "layers (null: all)")
    projection_dim: int = Field(128, gt=0)
    exclude_same_report: bool = Field(True, description="identical reports of other images are not negatives")
    gather_distributed: bool = Field(True, description="gather embeddings across DDP processes")
    image_loss: Literal["none", "simclr"] = Field("none", description="add an image-only term (needs "
                                                                       "views.image_views: 2)")
    image_loss_weight: float = Field(1.0, ge=0.0)
    image_loss_temperature: float = Field(0.1, gt=0.0)


class ImageTextMethod(SSLMethod):
    """Image encoder (the transferred backbone) + text encoder + projections into one joint space."""

    Params: ClassVar[type[ImageTextParams]] = ImageTextParams
    family = "multimodal"

    def __init__(self, backbone: Backbone, params: ImageTextParams) -> None:
        super().__init__(backbone, params)
        self.text_encoder: TextEncoder = build_text_encoder(
            params.text_encoder, vocab_size=params.text_vocab_size, width=params.text_width,
            depth=params.text_depth, heads=params.text_heads, pooling=params.text_pooling,
            trainable_layers=params.text_trainable_layers,
        )
        self.image_projection = self.make_projection(backbone.feature_dim, params)
        self.text_projection = self.make_projection(self.text_encoder.feature_dim, params)
        self.image_head: nn.Module | None = None
        if params.image_loss == "simclr":
            self.image_head = SimCLRProjectionHead(backbone.feature_dim, 512, 128)
            self.image_criterion = NTXentLoss(temperature=params.image_loss_temperature,
                                              gather_distributed=params.gather_distributed)
        self._bound: torch.Tensor | None = None

    # ------------------------------------------------------------------ subclass hooks
    def make_projection(self, input_dim: int, params: ImageTextParams) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    def logit_scale(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def image_to_text_weight(self) -> float:
        return 0.5

    # ------------------------------------------------------------------ contract
    @classmethod
    def requirements(cls, params: ImageTextParams) -> ViewRequirements:
        views = 2 if params.image_loss != "none" else 1
        return ViewRequirements(min_views=views, max_views=views, text=True, spatial_dims=(2, 3))

    def bind_tokenizer(self, batch: ViewBatch) -> None:
        """Adopt the views' tokenizer (first batch); after a resume, check it is the one the weights learnt."""
        blob = batch.extras.get(TOKENIZER_KEY)
        if blob is None:
            raise ConfigError(f"method '{self.name}' needs the views' tokenizer in the batch — use views.policy: "
                              "image_text (or a policy that puts it in ViewBatch.extras['tokenizer'])")
        if blob is self._bound:
            return
        tokenizer = tokenizer_from_tensor(blob)
        trained = self.text_encoder.tokenizer
        if trained is not None and not trained.vocabulary_equals(tokenizer):
            raise ConfigError(
                f"the views tokenise reports with a different vocabulary ({tokenizer.source}, {tokenizer.vocab_size} "
                f"ids) than the one this text encoder was trained with ({trained.source}, {trained.vocab_size} ids) "
                "— the reports or views.tokenizer settings changed; use a new output_dir"
            )
        self.text_encoder.bind_tokenizer(tokenizer)
        self._bound = blob

    def encode_images(self, views: torch.Tensor) -> torch.Tensor:
        """Normalised images → joint-space embeddings (not yet L2-normalised)."""
        return self.image_projection(self.backbone(views))

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token tensors → joint-space embeddings (not yet L2-normalised)."""
        return self.text_projection(self.text_encoder(input_ids, attention_mask))

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """(N, projection_dim) L2-normalised joint-space embeddings of raw texts (eval mode, CPU result)."""
        tokenizer = self.text_encoder.tokenizer
        if tokenizer is None:
            raise ConfigError(f"method '{self.name}' has no tokenizer yet: it is bound on the first training batch "
                              "(load a trained checkpoint)")
        chunks = encode_in_batches(self, tokenizer, texts, batch_size, self.encode_tokens)
        if not chunks:
            return torch.empty(0, self.params.projection_dim)
        return F.normalize(torch.cat(chunks).float(), dim=1).cpu()

    def forward(self, batch: ViewBatch) -> MethodOutput:
        if batch.text is None:
            raise ConfigError(f"method '{self.name}' needs report tokens — use views.policy: image_text")
        self.bind_tokenizer(batch)
        size = batch.batch_size
        views = batch.views
        features = self.backbone(torch.cat(views, dim=0) if len(views) > 1 else views[0])
        image = self.image_projection(features[:size])
        text = self.encode_tokens(batch.text["input_ids"], batch.text["attention_mask"])
        ids = batch.text.get("report_id") if self.params.exclude_same_report else None
        scale = self.logit_scale()
        loss, image_to_text, text_to_image = image_text_loss(
            image, text, scale, self.image_to_text_weight(), batch.has_text, ids, self.params.gather_distributed
        )
        outputs = {"loss_image_text": loss.detach(), "loss_i2t": image_to_text.detach(),
                   "loss_t2i": text_to_image.detach(), "logit_scale": scale.detach().float()}
        if self.image_head is not None:
            z0, z1 = self.image_head(features).float().chunk(2, dim=0)
            image_only = self.image_criterion(z0, z1)
            loss = loss + self.params.image_loss_weight * image_only
            outputs["loss_image"] = image_only.detach()
        outputs["loss"] = loss
        return outputs
