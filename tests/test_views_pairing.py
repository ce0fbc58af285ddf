"""Medical positive pairs: each pairing asserted on metadata, fallback and coverage, determinism, device, size,
errors before compute, the engine's logged cross-image share, and a study comparing SimCLR with and without."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from radssl.config import load_config
from radssl.data.store import ImageStore, TaskInfo
from radssl.engine.pretrain import pretrain
from radssl.errors import ConfigError
from radssl.views.columns import PairingColumns
from radssl.views.pairing import PairingParams, build_pairing
from radssl.views.policies import PolicyContext, ViewSettings, build_policy

DRAWS = 400


def _columns(patient=None, study=None, series=None, slice_index=None, frame_index=None, loop=None) -> PairingColumns:
    given = [v for v in (patient, study, series, slice_index, frame_index) if v is not None]
    n = len(given[0])

    def tensor(values) -> torch.Tensor:  # noqa: ANN001
        return torch.full((n,), -1, dtype=torch.int64) if values is None else torch.as_tensor(values, dtype=torch.int64)

    return PairingColumns(patient=tensor(patient), study=tensor(study), series=tensor(series),
                          slice_index=tensor(slice_index), frame_index=tensor(frame_index),
                          store_rows=np.arange(n), loop=None if loop is None else tensor(loop))


def _draws(pairing, n: int, seed: int = 0, draws: int = DRAWS) -> torch.Tensor:  # noqa: ANN001
    """(draws, n): partners of every row, drawn ``draws`` times."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(n).repeat(draws)
    return pairing.partners(rows, generator).view(draws, n)


def _assert_draws_match(partners: torch.Tensor, expected: list[set[int]]) -> None:
    """Every draw is a candidate (or the row itself when it has none); every candidate is drawn, about uniformly."""
    for row, candidates in enumerate(expected):
        drawn = partners[:, row].tolist()
        if not candidates:
            assert set(drawn) == {row}, f"row {row} has no partner and must fall back to itself"
            continue
        assert set(drawn) == candidates, f"row {row}: drew {sorted(set(drawn))}, candidates {sorted(candidates)}"
        counts = np.array([drawn.count(c) for c in sorted(candidates)])
        expected_count = len(drawn) / len(candidates)
        assert np.all(np.abs(counts - expected_count) < 5 * np.sqrt(expected_count) + 1), (row, counts)


# ----------------------------------------------------------------------------------------- patient
PATIENT = [0, 0, 0, 1, 1, 2, -1, 3, 3, 3, 3, 4]
STUDY = [0, 0, 1, 2, 2, 3, 4, 5, 5, 6, 6, 7]
SERIES = [0, 0, 1, 2, 3, 4, 5, 6, 6, 7, -1, 8]


def test_patient_pairing_draws_another_image_of_the_same_patient_uniformly() -> None:
    pairing = build_pairing(PairingParams(kind="patient"), _columns(patient=PATIENT))
    expected = [{j for j in range(len(PATIENT)) if j != i and PATIENT[i] >= 0 and PATIENT[j] == PATIENT[i]}
                for i in range(len(PATIENT))]
    _assert_draws_match(_draws(pairing, len(PATIENT)), expected)
    # rows 5 (single image), 6 (no patient id) and 11 (single image) fall back: 9 of 12 have a partner
    assert pairing.coverage() == pytest.approx(9 / 12)


def test_patient_pairing_within_a_study_or_from_another_series() -> None:
    n = len(PATIENT)
    same_study = build_pairing(PairingParams(kind="patient", same_study=True),
                               _columns(patient=PATIENT, study=STUDY))
    expected = [{j for j in range(n) if j != i and PATIENT[i] >= 0 and PATIENT[j] == PATIENT[i]
                 and STUDY[j] == STUDY[i]} for i in range(n)]
    _assert_draws_match(_draws(same_study, n), expected)
    assert same_study.coverage() == pytest.approx(sum(bool(e) for e in expected) / n)

    other_series = build_pairing(PairingParams(kind="patient", other_series=True),
                                 _columns(patient=PATIENT, series=SERIES))
    # an image of unknown series (row 10) excludes only itself
    expected = [{j for j in range(n) if j != i and PATIENT[i] >= 0 and PATIENT[j] == PATIENT[i]
                 and (SERIES[i] < 0 or SERIES[j] != SERIES[i])} for i in range(n)]
    _assert_draws_match(_draws(other_series, n), expected)
    assert expected[0] == {2} and expected[7] == {9, 10} and expected[10] == {7, 8, 9}


# ----------------------------------------------------------------------------------------- slice / frame
def _random_slices(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Series with gaps and unknown values: (series, slice_index)."""
    rng = np.random.default_rng(seed)
    series = rng.integers(0, max(2, n // 8), n)
    slices = rng.integers(0, 12, n)
    series[rng.random(n) < 0.05] = -1
    slices[rng.random(n) < 0.05] = -1
    return series, slices


def _window_candidates(group: np.ndarray, position: np.ndarray, low: int, high: int) -> list[set[int]]:
    n = len(group)
    known = (group >= 0) & (position >= 0)
    same = (group[:, None] == group[None, :]) & known[:, None] & known[None, :]
    delta = np.abs(position[:, None] - position[None, :])
    ok = same & (delta >= low) & (delta <= high)
    return [set(np.flatnonzero(ok[i]).tolist()) for i in range(n)]


@pytest.mark.parametrize(("low", "high"), [(1, 1), (1, 3), (2, 3), (0, 2)])
def test_slice_pairing_keeps_the_series_and_the_offset_bounds(low: int, high: int) -> None:
    series, slices = _random_slices(160, seed=low * 10 + high)
    pairing = build_pairing(PairingParams(kind="slice", min_offset=low, max_offset=high),
                            _columns(series=series, slice_index=slices))
    expected = _window_candidates(series, slices, low, high)
    partners = _draws(pairing, len(series), draws=300)
    _assert_draws_match(partners, expected)
    has_other = [bool(e - {i}) for i, e in enumerate(expected)]
    assert pairing.coverage() == pytest.approx(np.mean(has_other))
    drawn = partners.flatten().numpy()
    anchors = np.tile(np.arange(len(series)), 300)
    moved = drawn != anchors
    assert np.all(series[drawn[moved]] == series[anchors[moved]])
    assert np.all(np.abs(slices[drawn[moved]] - slices[anchors[moved]]) <= high)
    assert np.all(np.abs(slices[drawn[moved]] - slices[anchors[moved]]) >= low)


def test_frame_pairing_stays_in_the_loop_and_the_slice_position() -> None:
    rng = np.random.default_rng(3)
    n = 150
    loop = rng.integers(0, 6, n)
    frame = rng.integers(0, 20, n)
    position = np.where(rng.random(n) < 0.5, rng.integers(0, 3, n), -1)  # 4D data read as slices, and plain cine
    series = rng.integers(0, 50, n)  # per-frame series ids (4D NIfTI as slices): frames must not group by them
    pairing = build_pairing(PairingParams(kind="frame", max_offset=2),
                            _columns(series=series, slice_index=position, frame_index=frame, loop=loop))
    group = loop * 10 + np.where(position >= 0, position, 0)
    expected = _window_candidates(group, frame, 1, 2)
    _assert_draws_match(_draws(pairing, n, draws=300), expected)
    assert pairing.coverage() == pytest.approx(np.mean([bool(e) for e in expected]))


def test_frame_pairing_groups_by_series_when_no_loop_is_given() -> None:
    series = [0, 0, 0, 1, 1]
    frame = [0, 1, 5, 0, 1]
    pairing = build_pairing(PairingParams(kind="frame", max_offset=1), _columns(series=series, frame_index=frame))
    _assert_draws_match(_draws(pairing, 5), [{1}, {0}, set(), {4}, {3}])


def test_partners_are_deterministic_by_generator() -> None:
    series, slices = _random_slices(200, seed=7)
    pairing = build_pairing(PairingParams(kind="slice", max_offset=3), _columns(series=series, slice_index=slices))
    rows = torch.randint(0, 200, (64,), generator=torch.Generator().manual_seed(1))
    first = pairing.partners(rows, torch.Generator().manual_seed(5))
    assert torch.equal(first, pairing.partners(rows, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, pairing.partners(rows, torch.Generator().manual_seed(6)))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
    ["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_partners_are_drawn_on_the_rows_device(device: str) -> None:
    pairing = build_pairing(PairingParams(kind="patient"), _columns(patient=PATIENT))
    rows = torch.arange(len(PATIENT), device=device).repeat(50)
    partners = pairing.partners(rows, torch.Generator(device=device).manual_seed(0))
    assert partners.device == rows.device
    patient = torch.tensor(PATIENT, device=device)
    assert bool((patient[partners] == patient[rows]).all())


def test_tables_for_two_hundred_thousand_rows_are_right() -> None:
    """Built with tensor ops (an O(N²) or per-row Python build would take minutes here); checked vectorised."""
    n = 200_000
    rng = np.random.default_rng(11)
    patient = rng.integers(0, 40_000, n)
    series = patient * 3 + rng.integers(0, 3, n)
    slices = rng.integers(0, 40, n)
    columns = _columns(patient=patient, series=series, slice_index=slices)
    rows = torch.from_numpy(rng.integers(0, n, 20_000))
    generator = torch.Generator().manual_seed(0)

    pairing = build_pairing(PairingParams(kind="patient"), columns)
    partners = pairing.partners(rows, generator).numpy()
    anchors = rows.numpy()
    sizes = np.bincount(patient)
    assert np.all(patient[partners] == patient[anchors])
    assert np.all((partners != anchors) == (sizes[patient[anchors]] > 1))
    assert pairing.coverage() == pytest.approx(np.mean(sizes[patient] > 1))

    pairing = build_pairing(PairingParams(kind="slice", max_offset=2), columns)
    partners = pairing.partners(rows, generator).numpy()
    present = set(zip(series.tolist(), slices.tolist()))
    has = np.array([any((s, p + d) in present for d in (-2, -1, 1, 2)) for s, p in zip(series, slices)])
    assert pairing.coverage() == pytest.approx(has.mean())
    moved = partners != anchors
    assert np.array_equal(moved, has[anchors])
    assert np.all(series[partners] == series[anchors])
    assert np.all(np.isin(np.abs(slices[partners[moved]] - slices[anchors[moved]]), [1, 2]))


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("kind", "columns", "named", "how"), [
    ("patient", {"series": [0, 0, 1]}, "'patient_id'", "patient_column"),
    ("slice", {"series": [0, 0, 1]}, "'slice_index'", "data.slices"),
    ("slice", {"slice_index": [0, 1, 2]}, "'series_id'", "series_column"),
    ("frame", {"series": [0, 0, 1], "slice_index": [0, 1, 0]}, "'frame_index'", "frame_column"),
])
def test_a_pairing_without_its_metadata_is_an_error_naming_the_column(kind, columns, named, how) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=named) as error:
        build_pairing(PairingParams(kind=kind), _columns(**columns))
    assert how in str(error.value)


def test_a_pairing_where_no_image_has_a_partner_is_an_error() -> None:
    with pytest.raises(ConfigError, match="every patient has a single image"):
        build_pairing(PairingParams(kind="patient"), _columns(patient=[0, 1, 2]))
    with pytest.raises(ConfigError, match="no series holds two slices 2–3 apart"):
        build_pairing(PairingParams(kind="slice", min_offset=2, max_offset=3),
                      _columns(series=[0, 0, 0], slice_index=[0, 1, 6]))


def test_pairing_keys_are_validated() -> None:
    with pytest.raises(ValueError, match="min_offset 3 exceeds max_offset 2"):
        PairingParams(kind="slice", min_offset=3, max_offset=2)
    with pytest.raises(ValueError, match="apply to kind slice or frame"):
        PairingParams(kind="patient", max_offset=3)
    with pytest.raises(ValueError, match="apply to kind patient"):
        PairingParams(kind="slice", same_study=True)
    dumped = PairingParams(kind="none").model_dump()  # a dumped config (every key written) loads again
    assert PairingParams(**dumped).kind == "none"
    with pytest.raises(ConfigError, match="max_offset"):
        load_config(None, ["views.pairing.kind=patient", "views.pairing.max_offset=4"])


# ----------------------------------------------------------------------------------------- policies
def _patient_store(n_patients: int = 12, per_patient: int = 3, size: int = 16) -> ImageStore:
    generator = torch.Generator().manual_seed(0)
    n = n_patients * per_patient
    patient = np.array([f"p{i // per_patient}" for i in range(n)])
    patient[-1] = "single"  # one patient with a single image: falls back to itself
    return ImageStore(
        name="patients", images=torch.randint(0, 255, (n, 1, size, size), generator=generator, dtype=torch.uint8),
        labels=torch.arange(n) % 2, split=np.array(["train"] * n), patient_id=patient,
        task=TaskInfo("binary", 2, ("a", "b")),
    )


@pytest.mark.parametrize("policy", ["two_view", "multi_crop"])
def test_pair_policies_make_the_second_view_from_the_partner_and_log_the_share(policy: str) -> None:
    store = _patient_store()
    settings = ViewSettings(policy=policy, pairing=PairingParams(kind="patient"))
    view_policy = build_policy(settings, PolicyContext(input_size=(16, 16), output_size=(16, 16)))
    columns = PairingColumns.from_store(store, np.arange(len(store)))
    assert view_policy.prepare(columns) == {"pairing_coverage": pytest.approx((len(store) - 1) / len(store))}
    rows = torch.arange(len(store))
    batch = view_policy(rows, store.images, columns, torch.Generator().manual_seed(0))
    assert batch.partner_rows is not None
    partners = batch.partner_rows.numpy()
    assert np.all(store.patient_id[partners] == store.patient_id[rows.numpy()])
    cross = partners != rows.numpy()
    assert cross.tolist() == [True] * (len(store) - 1) + [False]  # only the single-image patient falls back
    assert batch.log_scalars()["cross_image_share"] == pytest.approx(cross.mean())


def _pretrain_config(tmp_path: Path, *extra: str):
    return load_config(None, [
        f"output_dir={tmp_path / 'run'}", "model.backbone=small_cnn", "train.accelerator=cpu", "train.devices=1",
        "train.steps=4", "train.batch_size=16", "train.log_every=2", "train.progress_bar=false",
        "train.checkpoint_every=100", "eval.enabled=false", "optim.optimizer=sgd", "optim.lr=0.05", *extra])


def _logged(tmp_path: Path) -> list[dict[str, str]]:
    with open(tmp_path / "run" / "metrics.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def test_pretrain_with_patient_pairs_logs_cross_image_share_and_coverage(tmp_path: Path) -> None:
    config = _pretrain_config(tmp_path, "data.source=synthetic", "data.n_patients=24", "data.images_per_patient=3",
                              "data.image_size=24", "views.pairing.kind=patient")
    result = pretrain(config)
    rows = _logged(tmp_path)
    assert len(rows) == 2
    # every synthetic patient has 3 images, all in the pretraining split: every pair joins two images
    assert all(float(r["cross_image_share"]) == 1.0 for r in rows)
    assert all(float(r["pairing_coverage"]) == 1.0 for r in rows)
    assert result.run_record["pairing_coverage"] == 1.0


def test_pretrain_on_volumes_as_slices_with_slice_pairs(tmp_path: Path) -> None:
    from radssl.data.slices import volumes_to_slices

    generator = torch.Generator().manual_seed(0)
    volumes = torch.randint(1, 255, (12, 1, 6, 16, 16), generator=generator, dtype=torch.uint8)
    volumes[:, :, 0] = 0  # an empty first slice in every volume: dropped, so slice 1 has one neighbour only
    store3d = ImageStore(name="vols", images=volumes, labels=torch.arange(12) % 2,
                         split=np.array(["train"] * 10 + ["test"] * 2), patient_id=np.array([""] * 12),
                         task=TaskInfo("binary", 2, ("a", "b")))
    store = volumes_to_slices(store3d)
    config = _pretrain_config(tmp_path, "views.pairing.kind=slice", "views.pairing.max_offset=1")
    pretrain(config, store)
    rows = _logged(tmp_path)
    assert all(float(r["cross_image_share"]) == 1.0 for r in rows)  # every kept slice has a neighbour


def test_missing_slice_metadata_fails_before_any_file_is_written(tmp_path: Path) -> None:
    config = _pretrain_config(tmp_path, "views.pairing.kind=slice", "data.source=synthetic", "data.n_patients=8",
                              "data.image_size=24")
    with pytest.raises(ConfigError, match="'slice_index'.*data.slices"):
        pretrain(config)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------- study
def test_study_compares_simclr_with_and_without_patient_pairs(tmp_path: Path) -> None:
    from radssl.study.config import StudyConfig
    from radssl.study.runner import run_study
    from radssl.study.results_store import ResultsStore

    train = {"steps": 2, "batch_size": 16, "accelerator": "cpu", "devices": 1, "progress_bar": False,
             "checkpoint_every": 100, "log_every": 1}
    optim = {"optimizer": "adamw", "lr": 0.002, "lr_scaling": "none"}
    config = StudyConfig.model_validate({
        "name": "pairs", "output_dir": str(tmp_path / "study"),
        "data": {"source": "synthetic", "n_patients": 30, "images_per_patient": 2, "image_size": 24},
        "model": {"backbone": "small_cnn"},
        "pretraining": [
            {"name": "simclr", "train": train, "optim": optim},
            {"name": "simclr_patient", "train": train, "optim": optim, "views": {"pairing": {"kind": "patient"}}},
        ],
        "initialisations": ["ssl:simclr", "ssl:simclr_patient"],
        "label_fractions": [1.0], "seeds": [0],
        "protocols": {"linear": {"Cs": [1.0]}},
        "bootstrap_samples": 100,
    })
    output = run_study(config, log=lambda _: None)
    with ResultsStore(output / "results.sqlite") as store:
        pretrains = {row["pretrain"] for row in store.cells("pairs") if row["metric"] == "auc"}
    assert {"simclr", "simclr_patient"} <= pretrains
    metrics = {}
    for name in ("simclr", "simclr_patient"):
        with open(output / "pretraining" / name / "metrics.csv", newline="") as stream:
            metrics[name] = list(csv.DictReader(stream))
    assert "cross_image_share" not in metrics["simclr"][0]
    assert all(float(row["cross_image_share"]) == 1.0 for row in metrics["simclr_patient"])
    report = (output / "report" / "report.html").read_text()
    assert "SSL (simclr)" in report and "SSL (simclr_patient)" in report
