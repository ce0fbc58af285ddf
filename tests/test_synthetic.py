"""The synthetic radiograph generator: determinism, structure, a local label, site shift, stores."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats

from radssl.data import synthetic
from radssl.data.synthetic import SyntheticSpec, generate_radiographs, make_external_store, make_synthetic_store
from radssl.errors import DataError

SMALL = SyntheticSpec(n_patients=24, images_per_patient=3, image_size=48, seed=3)


@pytest.fixture(scope="module")
def small() -> dict[str, np.ndarray]:
    return generate_radiographs(SMALL)


def test_same_spec_gives_identical_arrays_and_another_seed_differs(small: dict[str, np.ndarray]) -> None:
    again = generate_radiographs(SMALL)
    for key in ("images", "labels", "patient_id", "site", "finding_radius"):
        np.testing.assert_array_equal(small[key], again[key])
    np.testing.assert_array_equal(small["finding_center"], again["finding_center"])  # NaNs compare equal here
    other = generate_radiographs(dataclasses.replace(SMALL, seed=4))
    assert not np.array_equal(small["images"], other["images"])
    assert np.mean(small["images"] != other["images"]) > 0.5


def test_shapes_dtypes_and_patients(small: dict[str, np.ndarray]) -> None:
    n = SMALL.n_patients * SMALL.images_per_patient
    assert small["images"].shape == (n, 48, 48) and small["images"].dtype == np.uint8
    assert small["labels"].shape == (n,) and small["labels"].dtype == np.int64
    assert small["site"].dtype == np.int64 and set(small["site"].tolist()) == {0}
    assert small["patient_id"].dtype.kind == "U" and all(p.startswith("s0-") for p in small["patient_id"])
    ids, counts = np.unique(small["patient_id"], return_counts=True)
    assert len(ids) == SMALL.n_patients and set(counts.tolist()) == {SMALL.images_per_patient}
    for pid in ids:  # disease is per patient
        assert len(set(small["labels"][small["patient_id"] == pid].tolist())) == 1
    # The images of one patient differ (positioning, exposure, noise) but are not unrelated.
    first = small["images"][: SMALL.images_per_patient].astype(np.float32)
    assert not np.array_equal(first[0], first[1])
    # Images use the grey range like a radiograph: dark air/lungs and bright bone/soft tissue.
    assert small["images"].min() < 40 and small["images"].max() > 200


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_positive_rate_is_met_per_patient(rate: float) -> None:
    spec = SyntheticSpec(n_patients=40, images_per_patient=2, image_size=32, positive_rate=rate, seed=1)
    data = generate_radiographs(spec)
    patient_labels = data["labels"][:: spec.images_per_patient]
    assert patient_labels.sum() == round(rate * spec.n_patients)


def test_label_is_carried_by_a_small_local_finding(small: dict[str, np.ndarray]) -> None:
    plain = generate_radiographs(SMALL, render_finding=False)
    diff = np.abs(small["images"].astype(np.int16) - plain["images"].astype(np.int16))
    positive = small["labels"] == 1
    assert positive.sum() >= 10 and (~positive).sum() >= 10
    assert diff[~positive].max() == 0, "negative images must not change when the finding is switched off"
    rows, cols = np.mgrid[0:48, 0:48]
    for i in np.flatnonzero(positive):
        assert diff[i].max() >= 15, "the finding should be visible (at least 15 grey levels at its peak)"
        (cy, cx), radius = small["finding_center"][i], small["finding_radius"][i]
        distance = np.hypot(rows - cy, cols - cx)
        changed = diff[i] > 0
        # Everything the finding changes lies within its radius plus the detector blur (≈ 2 px) ...
        assert distance[changed].max() <= radius + 2.5
        # ... which is a small part of the image.
        assert changed.mean() < 0.05
        peak = np.unravel_index(np.argmax(diff[i]), diff[i].shape)
        assert np.hypot(peak[0] - cy, peak[1] - cx) <= 1.5
    assert np.all(np.isnan(small["finding_center"][~positive])) and np.all(small["finding_radius"][~positive] == 0)


def test_zero_finding_contrast_renders_no_finding() -> None:
    spec = SyntheticSpec(n_patients=6, images_per_patient=2, image_size=32, finding_contrast=0.0, seed=2)
    np.testing.assert_array_equal(
        generate_radiographs(spec)["images"], generate_radiographs(spec, render_finding=False)["images"]
    )


def _histogram(images: np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(images, bins=32, range=(0, 256))
    return counts / counts.sum()


def test_site_shifts_appearance_more_than_a_new_sample_does() -> None:
    base = SyntheticSpec(n_patients=60, images_per_patient=2, image_size=32, seed=0)
    internal = generate_radiographs(base)["images"]
    resampled = generate_radiographs(dataclasses.replace(base, seed=1))["images"]
    for site in (1, 2):
        external = generate_radiographs(dataclasses.replace(base, site=site))["images"]
        within = np.abs(_histogram(internal) - _histogram(resampled)).sum()
        between = np.abs(_histogram(internal) - _histogram(external)).sum()
        assert between > 4 * within, (site, between, within)
        # Local contrast (noise, blur, curve) differs too, not just the global histogram.
        roughness = lambda x: np.abs(np.diff(x.astype(np.float32), axis=2)).mean()  # noqa: E731
        assert abs(roughness(external) - roughness(internal)) > 3 * abs(roughness(resampled) - roughness(internal))


def test_sites_draw_new_patients_from_the_same_anatomy_distribution() -> None:
    spec = SyntheticSpec(n_patients=400, seed=0)
    site0 = synthetic._sample_patients(spec)
    site1 = synthetic._sample_patients(dataclasses.replace(spec, site=1))
    for name in site0:
        assert not np.array_equal(site0[name], site1[name]) or name == "label"
        # ~30 parameters are tested, so a lone p ≈ 1e-3 is chance; a site-dependent anatomy (even a 10 % shift
        # of one parameter at n = 400) gives p far below 1e-5.
        assert stats.ks_2samp(site0[name], site1[name]).pvalue > 1e-5, name
    assert site0["label"].sum() == site1["label"].sum()


def test_site_styles_are_fixed_by_the_site_number_only() -> None:
    assert synthetic._site_style(3) == synthetic._site_style(3)
    assert synthetic._site_style(1) != synthetic._site_style(2) != synthetic._site_style(0)


def test_store_has_patient_level_splits_and_metadata() -> None:
    spec = SyntheticSpec(n_patients=30, images_per_patient=2, image_size=32, seed=5)
    store = make_synthetic_store(spec)
    assert store.images.shape == (60, 1, 32, 32) and store.images.dtype == torch.uint8
    assert store.task.kind == "binary" and store.task.class_names == ("normal", "finding")
    assert store.labels.dtype == torch.int64
    assert set(store.split.tolist()) == {"train", "val", "test"}
    owners: dict[str, set[str]] = {}
    for pid, split in zip(store.patient_id, store.split):
        owners.setdefault(pid, set()).add(split)
    assert all(len(splits) == 1 for splits in owners.values())
    assert np.array_equal(store.meta["site"], np.zeros(60, dtype=np.int64))
    assert store.name == "synthetic-site0"
    np.testing.assert_array_equal(make_synthetic_store(spec).split, store.split)
    assert not np.array_equal(make_synthetic_store(dataclasses.replace(spec, seed=6)).split, store.split)


def test_external_store_is_a_shifted_test_set_with_new_patients() -> None:
    spec = SyntheticSpec(n_patients=12, images_per_patient=2, image_size=32, seed=5)
    internal = make_synthetic_store(spec)
    external = make_external_store(spec, site=2)
    assert set(external.split.tolist()) == {"test"}
    assert set(external.meta["site"].tolist()) == {2}
    assert not set(external.patient_id.tolist()) & set(internal.patient_id.tolist())
    assert external.images.shape == internal.images.shape
    with pytest.raises(DataError, match="site"):
        make_external_store(spec, site=0)


def test_larger_images_scale_the_anatomy_and_finding() -> None:
    spec = SyntheticSpec(n_patients=4, images_per_patient=1, image_size=128, positive_rate=1.0, seed=0)
    data = generate_radiographs(spec)
    assert data["images"].shape == (4, 128, 128)
    assert np.all(data["finding_radius"] > 3.0)  # ≥ 2.6 px at 64 px, so > 3 px at 128 px with jitter


@pytest.mark.parametrize(
    "field, value",
    [("n_patients", 0), ("images_per_patient", 0), ("image_size", 8), ("positive_rate", 1.5), ("site", -1),
     ("finding_contrast", -0.1)],
)
def test_invalid_spec_names_the_field(field: str, value: float) -> None:
    with pytest.raises(DataError, match=field):
        SyntheticSpec(**{field: value})
