"""The supervised recipe's fields are declared once (engine.supervised.RecipeFields): the protocol configs inherit them,
``params.recipe(steps)`` is the one way to a SupervisedRecipe, and the transfer functions take it (or its keys)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pydantic
import pytest
import torch
from torch import nn

from radssl.data.synthetic import SyntheticSpec, make_synthetic_store
from radssl.engine.supervised import PrecisionField, RecipeFields, SupervisedRecipe
from radssl.transfer.finetune import finetune
from radssl.transfer.protocols.finetune import FinetuneParams, best_on_validation
from radssl.transfer.protocols.segmentation import FinetuneSegmentationParams, SegmentationParams
from radssl.transfer.segmentation import finetune_segmentation
from support import make_tiny_store

PARAMS = (FinetuneParams, SegmentationParams, FinetuneSegmentationParams)


@pytest.mark.parametrize("params", PARAMS)
def test_protocol_params_inherit_the_recipe_fields_with_validation_and_description(params) -> None:  # noqa: ANN001
    for name, shared in RecipeFields.model_fields.items():
        field = params.model_fields[name]
        assert field.description and field.description == shared.description, name
        assert field.metadata == shared.metadata, name  # the same bounds (gt/ge), not a re-declaration
        assert field.annotation == shared.annotation, name
    defaults = {name: params.model_fields[name].default for name in RecipeFields.model_fields}
    assert defaults == {"epochs": 30, "lr": 1e-3, "weight_decay": 1e-4, "early_stopping_patience": 10,
                        "min_epochs": 5}  # the study's floor is 5; the engine's own default stays 1
    assert RecipeFields().min_epochs == SupervisedRecipe().min_epochs == 1
    assert ("precision" in params.model_fields) == (params is FinetuneParams)
    if params is FinetuneParams:
        assert params.model_fields["precision"].description == PrecisionField.model_fields["precision"].description


def test_config_keys_are_unchanged_and_bad_values_name_the_key() -> None:
    assert set(FinetuneParams.model_fields) == {
        "epochs", "steps_per_epoch", "min_epochs", "batch_size", "lr", "backbone_lr_scale", "weight_decay",
        "early_stopping_patience", "augment", "hflip", "class_balanced", "precision"}
    assert set(SegmentationParams.model_fields) == {
        "epochs", "steps_per_epoch", "min_epochs", "batch_size", "lr", "weight_decay", "early_stopping_patience",
        "patch_size", "foreground_ratio", "augment", "sw_batch_size", "sw_overlap", "hd95"}
    with pytest.raises(pydantic.ValidationError, match="precision"):
        SegmentationParams(precision="bf16")  # segmentation's config has no precision key
    with pytest.raises(pydantic.ValidationError, match=r"lr\n.*greater than 0"):
        FinetuneParams(lr=0)
    with pytest.raises(pydantic.ValidationError, match=r"every backbone_lr_scale must be > 0"):
        FinetuneParams(backbone_lr_scale=[0.1, -1.0])
    with pytest.raises(pydantic.ValidationError, match=r"encoder_lr_scale candidates must not repeat"):
        FinetuneSegmentationParams(encoder_lr_scale=[1.0, 1.0])
    assert FinetuneSegmentationParams(encoder_lr_scale=0.5).encoder_lr_scale == [0.5]  # one number = a list of one


def test_params_turn_into_the_recipe_with_the_floor_capped() -> None:
    recipe = FinetuneParams(epochs=3, lr=2e-3, precision="bf16", early_stopping_patience=None).recipe(7)
    assert recipe == SupervisedRecipe(epochs=3, steps_per_epoch=7, lr=2e-3, weight_decay=1e-4,
                                      early_stopping_patience=None, min_epochs=3, precision="bf16")
    segmentation = SegmentationParams(epochs=8, min_epochs=2, weight_decay=0.0).recipe(4, lr=5e-3)
    assert (segmentation.min_epochs, segmentation.steps_per_epoch, segmentation.lr, segmentation.weight_decay,
            segmentation.precision) == (2, 4, 5e-3, 0.0, "32")
    with pytest.raises(pydantic.ValidationError, match="epoch\n.*Extra inputs"):
        RecipeFields().recipe(2, epoch=3)  # a misspelt keyword is named


def test_ties_keep_the_earlier_candidate() -> None:
    runs = {0.1: 0.8, 1.0: 0.8, 0.5: 0.7}
    scale, chosen = best_on_validation([0.1, 1.0, 0.5], lambda s: SimpleNamespace(val_metric=runs[s], scale=s))
    assert scale == 0.1 and chosen.scale == 0.1
    assert best_on_validation([0.5, 1.0], lambda s: SimpleNamespace(val_metric=runs[s]))[0] == 1.0


class _Plain(nn.Module):
    """A minimal encoder (finetune needs only ``feature_dim``)."""

    feature_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


class _MustNotRun(_Plain):
    spatial_dims, in_channels = 2, 1
    feature_channels, feature_strides = (4,), (1,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("compute started before the recipe was checked")

    forward_features = forward


def test_transfer_functions_take_the_recipe_or_its_keys() -> None:
    torch.set_num_threads(1)
    store = make_tiny_store(n=64, size=12)
    rows, val = store.indices("train"), store.indices("val")
    tests = {"test": (store, store.indices("test"))}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = _Plain()
    common = dict(batch_size=16, seed=1, augment=False)
    by_keys = finetune(backbone, store, rows, val, tests, epochs=2, lr=5e-3, early_stopping_patience=None, **common)
    by_recipe = finetune(backbone, store, rows, val, tests, recipe=FinetuneParams(
        epochs=2, lr=5e-3, early_stopping_patience=None, min_epochs=1), **common)
    assert by_keys.history == by_recipe.history and by_keys.epochs_run == 2
    np.testing.assert_array_equal(by_keys.scores["test"], by_recipe.scores["test"])
    shortened = finetune(backbone, store, rows, val, tests, recipe=RecipeFields(epochs=5), epochs=1, **common)
    assert shortened.epochs_run == 1  # keywords go on top of the recipe
    with pytest.raises(pydantic.ValidationError, match="epoch\n.*Extra inputs"):
        finetune(_MustNotRun(), store, rows, val, tests, epoch=1, **common)


def test_segmentation_refuses_a_bad_recipe_before_compute() -> None:
    store = make_synthetic_store(SyntheticSpec(n_patients=6, images_per_patient=2, image_size=16, masks=True))
    rows, val = store.indices("train"), store.indices("val")
    tests = {"test": (store, store.indices("test"))}
    with pytest.raises(pydantic.ValidationError, match="min_epochs\n.*greater than 0"):
        finetune_segmentation(_MustNotRun(), store, rows, val, tests, min_epochs=0)
    with pytest.raises(pydantic.ValidationError, match="lr_scale\n.*Extra inputs"):
        finetune_segmentation(_MustNotRun(), store, rows, val, tests, recipe=SegmentationParams(), lr_scale=1.0)
