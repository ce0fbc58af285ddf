"""View policies: map a batch of stored images (+ metadata) to the inputs a method needs.

``TwoViewPolicy`` is SimCLR/BYOL's: two independent augmentations of each image. Medical positive-pair policies
(same patient, adjacent slice, adjacent ultrasound frame) will pair *different* stored rows and plug in here.
"""

from __future__ import annotations

import torch

from radssl.data.store import images_to_float
from radssl.transfer.features import NORMALISATION_MEAN, NORMALISATION_STD
from radssl.views.augment import AugmentationParams, BatchAugmenter


class TwoViewPolicy:
    """Two augmented views per stored image, normalised like every backbone input in radssl."""

    num_views = 2

    def __init__(self, params: AugmentationParams, output_size: tuple[int, ...], channels_last: bool = False) -> None:
        self.augmenter = BatchAugmenter(params, output_size)
        self.channels_last = channels_last

    def _finish(self, view: torch.Tensor) -> torch.Tensor:
        view = view.sub_(NORMALISATION_MEAN).div_(NORMALISATION_STD)
        if self.channels_last and view.ndim == 4:
            view = view.contiguous(memory_format=torch.channels_last)
        return view

    @torch.no_grad()
    def __call__(self, stored: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """``stored``: uint8/float16 batch (B, C, *spatial) on the training device → list of float views."""
        images = images_to_float(stored)
        return [self._finish(self.augmenter(images, generator)) for _ in range(self.num_views)]
