"""Study config: every key validated, readable errors, and data checks that fail before any compute."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from radssl.data.store import ImageStore, TaskInfo
from radssl.errors import ConfigError, DataError
from radssl.study.config import (
    InitSpec,
    StudyConfig,
    checkpoint_run_name,
    load_study_config,
    parse_initialisation,
)
from radssl.study.plan import prepare_study

from support import make_tiny_store

_PRETRAIN = {"name": "simclr", "train": {"steps": 2, "batch_size": 16, "progress_bar": False}}


def _study(tmp_path: Path, **fields) -> Path:
    raw = {
        "name": "unit",
        "output_dir": str(tmp_path / "out"),
        "data": {"source": "synthetic"},
        "model": {"backbone": "small_cnn"},
        "pretraining": [_PRETRAIN],
        "initialisations": ["random", "ssl:simclr"],
        "label_fractions": [0.1, 1.0],
        "protocols": ["linear"],
    }
    raw.update(fields)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _stores(stores: dict[int, ImageStore]) -> Callable[[Any], ImageStore]:
    """A store loader for ``prepare_study(load=...)``: data sections to in-memory stores by ``site`` (0 = the study
    data, others = external sets)."""
    return lambda section: stores[section.site]


def test_valid_study_loads_with_shorthand_and_named_overrides(tmp_path: Path) -> None:
    config = load_study_config(_study(tmp_path), ["seeds=[0, 1]", "pretraining.simclr.train.steps=7",
                                                  "protocols.knn.k=3"])
    assert isinstance(config, StudyConfig)
    assert config.seeds == [0, 1]
    assert config.pretraining[0].train.steps == 7
    assert list(config.protocols.enabled()) == ["linear", "knn"] and config.protocols.knn.k == 3
    assert config.label_fractions == [0.1, 1.0]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("pretraining.simclr.train.stepz=3", "unknown key 'pretraining.train.stepz' — did you mean 'steps'?"),
        ("protocols.linear.Cz=[1]", "unknown key 'protocols.linear.Cz'"),
        ("label_fractions=[0.0, 0.5]", "label_fractions"),
        ("initialisations=[random, ssl:byol]", "'ssl:byol' names no pretraining run"),
        ("initialisations=[random, imagenet]", "needs ImageNet weights — set imagenet_weights"),
        ("initialisations=[warm]", "unknown kind 'warm'"),
        ("pretraining.nope.train.steps=3", "no pretraining entry named 'nope'"),
        ("protocols=[linear, svm]", "unknown protocol"),
        ("seeds=[1, 1]", "seeds must not repeat"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_study_config(_study(tmp_path), [override])
    assert expected in str(error.value)
    assert str(tmp_path / "study.yaml") in str(error.value) or "override" in str(error.value)


def test_pretraining_run_may_not_set_its_own_fraction(tmp_path: Path) -> None:
    run = {**_PRETRAIN, "train": {**_PRETRAIN["train"], "pretrain_fraction": 0.5}}
    with pytest.raises(ConfigError, match="pretrain_fractions"):
        load_study_config(_study(tmp_path, pretraining=[run]))


def test_initialisation_parsing() -> None:
    assert parse_initialisation("random") == InitSpec("random")
    assert parse_initialisation("imagenet") == InitSpec("imagenet")
    assert parse_initialisation("imagenet:/w/r18.pth") == InitSpec("imagenet", "/w/r18.pth")
    assert parse_initialisation("imagenet+ssl:simclr") == InitSpec("imagenet+ssl", "simclr")
    assert checkpoint_run_name("runs/byol_long/checkpoints/final.pt") == "byol_long"
    with pytest.raises(ValueError, match="needs the name of a pretraining run"):
        parse_initialisation("ssl")


def test_optional_imagenet_is_dropped_only_when_not_required(tmp_path: Path) -> None:
    inits = ["random", "imagenet", "ssl:simclr", "imagenet+ssl:simclr"]
    config = load_study_config(_study(tmp_path, initialisations=inits, require_imagenet=False))
    assert [s.text for s in config.init_specs()] == ["random", "ssl:simclr"]
    assert config.dropped_initialisations() == ["imagenet", "imagenet+ssl:simclr"]


def test_missing_imagenet_file_is_named_before_compute(tmp_path: Path) -> None:
    missing = tmp_path / "weights" / "resnet18-f37072fd.pth"
    config = load_study_config(_study(tmp_path, initialisations=["random", "imagenet"], imagenet_weights=str(missing),
                                      model={"backbone": "resnet18"}, data={"source": "synthetic", "n_patients": 40,
                                                                            "image_size": 16}))
    with pytest.raises(ConfigError) as error:
        prepare_study(config, log=lambda _: None)
    assert str(missing) in str(error.value) and "imagenet_weights" in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing written, nothing trained


def test_missing_ssl_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "checkpoints" / "final.pt"
    config = load_study_config(_study(tmp_path, initialisations=["random", f"ssl:{path}"],
                                      data={"source": "synthetic", "n_patients": 40, "image_size": 16}))
    with pytest.raises(ConfigError, match=str(path)):
        prepare_study(config, log=lambda _: None)


def _three_class_store(test_class_2: bool, n: int = 60) -> ImageStore:
    """Train holds classes 0/1 only; class 2 appears in the test split when ``test_class_2``."""
    labels = torch.arange(n) % 2
    split = np.array(["train"] * 40 + ["val"] * 10 + ["test"] * 10)
    if test_class_2:
        labels[55] = 2
    return ImageStore("three", torch.zeros(n, 1, 16, 16, dtype=torch.uint8), labels.long(), split,
                      np.array([f"p{i}" for i in range(n)]), TaskInfo("multiclass", 3), origin="three.npz")


def test_test_class_unseen_in_training_is_refused(tmp_path: Path) -> None:
    load = _stores({0: _three_class_store(test_class_2=True)})
    config = load_study_config(_study(tmp_path))
    with pytest.raises(DataError) as error:
        prepare_study(config, log=lambda _: None, load=load)
    assert "three.npz [test split]" in str(error.value) and "class 2" in str(error.value)


def test_external_set_with_unseen_class_or_other_size_is_refused(tmp_path: Path) -> None:
    internal = make_tiny_store(n=96, size=16)
    foreign = make_tiny_store(n=32, size=16, seed=3)
    foreign.labels[0] = 1
    shifted = ImageStore("site5", foreign.images, torch.full((32,), 1).long(), foreign.split, foreign.patient_id,
                         foreign.task, origin="site5.npz")
    big = make_tiny_store(n=32, size=20, seed=4)
    external = [{"name": "site5", "data": {"source": "synthetic", "site": 5}}]
    load = _stores({0: internal, 5: shifted, 6: big})
    with pytest.raises(DataError, match=r"site5\.npz \[external_test_sets\[0\] \('site5'\)\].*AUC is undefined"):
        prepare_study(load_study_config(_study(tmp_path, external_test_sets=external)), log=lambda _: None,
                      load=load)
    external = [{"name": "big", "data": {"source": "synthetic", "site": 6}}]
    with pytest.raises(DataError, match="images are 1×20×20 but the study data's are 1×16×16"):
        prepare_study(load_study_config(_study(tmp_path, external_test_sets=external)), log=lambda _: None,
                      load=load)


def test_empty_validation_split_is_refused(tmp_path: Path) -> None:
    store = make_tiny_store(n=64, size=16)
    store.split[store.split == "val"] = "train"
    load = _stores({0: store})
    with pytest.raises(DataError, match="'val' split is empty"):
        prepare_study(load_study_config(_study(tmp_path)), log=lambda _: None, load=load)


def test_batch_larger_than_pretraining_set_names_the_run(tmp_path: Path) -> None:
    load = _stores({0: make_tiny_store(n=64, size=16)})
    config = load_study_config(_study(tmp_path, pretrain_fractions=[0.25, 1.0]))  # 12 of 48 train images
    with pytest.raises(DataError) as error:
        prepare_study(config, log=lambda _: None, load=load)
    assert "pretraining[0] 'simclr', pretrain_fraction 0.25" in str(error.value)
    assert "train.batch_size" in str(error.value)


def test_small_fractions_keep_every_class_and_nest(tmp_path: Path) -> None:
    load = _stores({0: make_tiny_store(n=96, size=16)})
    config = load_study_config(_study(tmp_path, label_fractions=[0.01, 0.3, 1.0], seeds=[0, 1]))
    plan = prepare_study(config, log=lambda _: None, load=load)
    labels = plan.store.labels.numpy()
    for seed, subsets in plan.subsets.items():
        assert set(labels[subsets[0.01]]) == {0, 1}, f"seed {seed}: 1% lost a class"
        assert set(subsets[0.01]) <= set(subsets[0.3]) <= set(subsets[1.0])
        np.testing.assert_array_equal(subsets[1.0], plan.train_rows)
    assert not np.array_equal(plan.subsets[0][0.3], plan.subsets[1][0.3])  # seeds draw different subsets


def test_shipped_study_files_validate() -> None:
    from radssl.study.commands import demo_study_preset

    demo = load_study_config(demo_study_preset())
    assert [s.text for s in demo.init_specs()] == ["random", "ssl:simclr"]
    assert demo.label_fractions == [0.05, 0.2, 1.0] and len(demo.external_test_sets) == 1
    assert list(demo.protocols.enabled()) == ["linear", "knn", "finetune"]
    # Issue 19, point 8: enough seeds for a seeds + test-cases interval that says something (t(3) = 3.18, not
    # t(1) = 12.7); the 5-minute budget is measured by benchmarks/demo_time.py.
    assert len(demo.seeds) >= 4 and demo.bn_stats == "reestimate"
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("pneumoniamnist", "breastmnist"):
        config = load_study_config(root / f"{name}.yaml")
        assert config.data.name == name and config.model.backbone == "resnet18" and config.model.small_input
        assert config.label_fractions == [0.01, 0.05, 0.1, 0.25, 1.0] and config.seeds == [0, 1, 2]
        assert config.dropped_initialisations() == ["imagenet", "imagenet+ssl:simclr"]  # no weights configured
        with_weights = load_study_config(root / f"{name}.yaml", ["imagenet_weights=/w/resnet18-f37072fd.pth"])
        assert [s.text for s in with_weights.init_specs()] == ["random", "imagenet", "ssl:simclr",
                                                               "imagenet+ssl:simclr"]


def test_segmentation_demo_preset_validates_and_passes_every_check(tmp_path: Path) -> None:
    from radssl.study.commands import demo_study_preset

    demo = load_study_config(demo_study_preset("segmentation"), [f"output_dir={tmp_path / 'demo'}"])
    assert list(demo.protocols.enabled()) == ["segmentation_finetune"]
    assert demo.data.masks and all(t.data.masks for t in demo.external_test_sets)
    plan = prepare_study(demo, log=lambda _: None)
    assert len(plan.cell_keys()) == 2 * 2 * 3 * 2  # encoders × seeds × fractions × test sets
    assert not (tmp_path / "demo").exists(), "preparing writes nothing"
    with pytest.raises(DataError, match="unknown task 'detection'"):
        demo_study_preset("detection")


@pytest.mark.parametrize(("name", "train_images"), [("breastmnist", 546), ("pneumoniamnist", 4708)])
def test_real_medmnist_grids_prepare(medmnist_file, name: str, train_images: int) -> None:  # noqa: ANN001
    """The shipped full grids pass every pre-compute check on the real files (no training here)."""
    folder = medmnist_file(f"{name}.npz").parent
    config = load_study_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml",
                               [f"data.root={folder}", "data.download=false"])
    plan = prepare_study(config, log=lambda _: None)
    assert len(plan.train_rows) == train_images
    labels = plan.store.labels.numpy()
    for subsets in plan.subsets.values():
        assert set(labels[subsets[0.01]]) == {0, 1}  # 1 % keeps both classes (6 images on BreastMNIST)
    assert len(plan.cell_keys()) == 2 * 3 * 3 * 5  # random + ssl (no ImageNet file) × protocols × seeds × fractions


def test_study_pretraining_entries_take_the_method_preset_where_they_are_silent(tmp_path: Path) -> None:
    """A study entry naming only the method gets SimCLR's shipped preset (τ, views, optimiser), as `radssl pretrain`
    does; keys the entry writes still win. (The shipped MedMNIST study configs rely on this.)"""
    from radssl.methods.simclr import SimCLR

    entry = {**_PRETRAIN, "method": {"name": "simclr"}, "views": {"crop_scale": [0.3, 1.0]}}
    plan = prepare_study(load_study_config(_study(tmp_path, pretraining=[entry])), log=lambda _: None)
    (pretrain_config,) = plan.pretrain_configs.values()
    preset = SimCLR.preset
    assert pretrain_config.method.temperature == preset["method"]["temperature"] != SimCLR.Params().temperature
    assert pretrain_config.optim.optimizer == preset["optim"]["optimizer"]
    assert pretrain_config.optim.lr == preset["optim"]["lr"]
    assert pretrain_config.views.rotation_degrees == preset["views"]["rotation_degrees"]
    assert tuple(pretrain_config.views.crop_scale) == (0.3, 1.0)  # the entry's own key
    for shipped in ("pneumoniamnist", "breastmnist"):  # the shipped configs leave SimCLR's recipe to the preset
        raw = yaml.safe_load((Path(__file__).parents[1] / "configs" / f"{shipped}.yaml").read_text())
        simclr = next(run for run in raw["pretraining"] if run["name"] == "simclr")
        assert not {"views", "optim"} & set(simclr) and set(simclr["method"]) == {"name"}


@pytest.mark.parametrize(("fields", "message"), [
    ({"pretraining": [{"name": "test", "method": {"name": "simclr"}}], "initialisations": ["random", "ssl:test"]},
     "pretraining name 'test' is reserved; choose another (e.g. 'simclr')"),
    ({"external_test_sets": [{"name": "val", "data": {"source": "synthetic", "site": 2}}]},
     "external test set name 'val' is reserved; choose another (e.g. 'site2')"),
])
def test_reserved_entry_names_are_refused(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_study_config(_study(tmp_path, **fields))
