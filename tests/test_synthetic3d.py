"""The synthetic volume generator: determinism, a finding with an aligned mask in positives only, patient-level
splits, modalities/sequences, external sites and its config section."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from radssl.data.synthetic3d import (
    MASK_CLASSES,
    SyntheticVolumeData,
    SyntheticVolumeSpec,
    generate_volumes,
    make_external_volume_store,
    make_synthetic_volume_store,
)
from radssl.errors import DataError

SMALL = SyntheticVolumeSpec(n_patients=24, volumes_per_patient=2, volume_size=20)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_same_spec_same_volumes_and_another_seed_differs() -> None:
    first, again = generate_volumes(SMALL), generate_volumes(SMALL)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    other = generate_volumes(SyntheticVolumeSpec(n_patients=24, volumes_per_patient=2, volume_size=20, seed=1))
    assert not np.array_equal(first["images"], other["images"])


def test_store_shapes_masks_and_patient_level_splits() -> None:
    store = make_synthetic_volume_store(SMALL)
    assert store.images.shape == (48, 1, 20, 20, 20) and store.images.dtype == torch.uint8
    assert store.spatial_dims == 3 and store.meta["mask"].shape == (48, 20, 20, 20)
    assert set(np.unique(store.meta["mask"]).tolist()) == {0, 1, 2} and MASK_CLASSES[2] == "finding"
    by_split = {s: set(store.patient_id[store.split == s]) for s in ("train", "val", "test")}
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
    for split in ("train", "test"):
        assert set(store.labels[torch.from_numpy(store.split == split)].tolist()) == {0, 1}
    # volumes of one patient share the label and differ (positioning, noise)
    assert torch.equal(store.labels[0::2], store.labels[1::2]) and not torch.equal(store.images[0], store.images[1])
    assert any("mask labels 0 background, 1 organ, 2 finding" in note for note in store.notes)


@pytest.mark.parametrize("modality,channels", [("ct", 1), ("mr", 3)])
def test_the_finding_is_in_positives_only_bright_and_where_its_mask_says(modality: str, channels: int) -> None:
    spec = SyntheticVolumeSpec(n_patients=16, volumes_per_patient=2, volume_size=24, modality=modality,
                               channels=channels)
    data = generate_volumes(spec)
    images, masks, labels = data["images"].astype(np.float32) / 255, data["masks"], data["labels"]
    assert images.shape[1] == channels
    finding_voxels = (masks == 2).reshape(len(masks), -1).sum(1)
    assert (finding_voxels[labels == 1] >= 4).all(), "every positive volume shows its finding"
    assert (finding_voxels[labels == 0] == 0).all(), "negatives have none"
    assert ((masks == 1).reshape(len(masks), -1).sum(1) > 50).all(), "every volume shows its organs"
    for c in range(channels):
        finding, organ = images[:, c][masks == 2].mean(), images[:, c][masks == 1].mean()
        assert finding > organ + 0.1, (c, finding, organ)  # the mask sits on the bright lesion
    # just outside the finding (a shell around the mask) the image is much darker than inside
    positive = int(np.flatnonzero(labels == 1)[0])
    from scipy import ndimage

    lesion = masks[positive] == 2
    shell = ndimage.binary_dilation(lesion, iterations=2) & ~ndimage.binary_dilation(lesion, iterations=1)
    assert images[positive, 0][lesion].mean() > images[positive, 0][shell].mean() + 0.1


def test_no_contrast_means_no_visible_finding_but_the_same_mask() -> None:
    plain = generate_volumes(SyntheticVolumeSpec(n_patients=8, volume_size=20, finding_contrast=0.0))
    visible = generate_volumes(SyntheticVolumeSpec(n_patients=8, volume_size=20))
    assert np.array_equal(plain["masks"], visible["masks"])
    from scipy import ndimage

    # away from the lesion (beyond its one-voxel partial-volume rim) the volumes are identical
    outside = ~ndimage.binary_dilation(plain["masks"] == 2, structure=np.ones((1, 3, 3, 3), dtype=bool))
    assert np.array_equal(plain["images"][:, 0][outside], visible["images"][:, 0][outside])
    assert not np.array_equal(plain["images"], visible["images"])


def test_external_site_is_new_patients_all_test_and_looks_different() -> None:
    internal = make_synthetic_volume_store(SMALL)
    external = make_external_volume_store(SMALL, site=1)
    assert set(external.split.tolist()) == {"test"}
    assert not set(external.patient_id) & set(internal.patient_id)
    noise = [np.diff(s.images[:, 0].float().numpy(), axis=-1).std() for s in (internal, external)]
    assert noise[1] > noise[0] * 1.1
    with pytest.raises(DataError, match="site"):
        make_external_volume_store(SMALL, site=0)


def test_bad_specs_and_config_keys_are_refused() -> None:
    with pytest.raises(DataError, match="modality 'mr'"):
        SyntheticVolumeSpec(channels=4)
    with pytest.raises(DataError, match="volume_size"):
        SyntheticVolumeSpec(volume_size=8)
    section = SyntheticVolumeData(n_patients=10, volume_size=16, modality="mr", channels=2, finding_contrast=0.2)
    assert section.spec() == SyntheticVolumeSpec(n_patients=10, volume_size=16, modality="mr", channels=2,
                                                 finding_contrast=0.2)
    with pytest.raises(ValidationError, match="volumes_per_patien"):
        SyntheticVolumeData(volumes_per_patien=3)  # type: ignore[call-arg]


def test_the_config_section_builds_the_store() -> None:
    from radssl.config import load_config
    from radssl.data.build import build_store
    from radssl.errors import ConfigError

    config = load_config(None, ["data.source=synthetic3d", "data.n_patients=6", "data.volume_size=16",
                                "data.modality=mr", "data.channels=2"])
    store = build_store(config.data)
    assert store.images.shape == (12, 2, 16, 16, 16) and store.meta["mask"].shape == (12, 16, 16, 16)
    with pytest.raises(ConfigError, match="did you mean 'volume_size'"):
        load_config(None, ["data.source=synthetic3d", "data.volume_sise=16"])
