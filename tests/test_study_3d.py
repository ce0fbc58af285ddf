"""3D in the study grid: a tiny volume classification study (linear, kNN, 3D fine-tuning, a 3D SSL run), and 3D
fine-tuning's augmentation moving a volume's voxels consistently."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radssl.errors import DataError
from radssl.study.config import StudyConfig
from radssl.study.plan import prepare_study
from radssl.study.results_store import ResultsStore
from radssl.study.runner import run_study

QUIET = {"log": lambda _: None}
DATA = {"source": "synthetic3d", "n_patients": 30, "volumes_per_patient": 2, "volume_size": 16}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _study(output_dir: Path, **changes) -> StudyConfig:
    raw = {
        "name": "vol", "output_dir": str(output_dir), "data": DATA,
        "model": {"backbone": "small_cnn_3d", "options": {"width": 8}},
        "pretraining": [{"name": "simclr", "views": {"output_size": 16},
                         "train": {"steps": 4, "batch_size": 16, "accelerator": "cpu", "devices": 1,
                                   "progress_bar": False, "checkpoint_every": 4, "log_every": 2}}],
        "initialisations": ["random", "ssl:simclr"],
        "label_fractions": [0.5, 1.0], "seeds": [0], "bootstrap_samples": 100,
        "protocols": {"linear": {"Cs": [1.0]}, "knn": {"k": 5},
                      "finetune": {"epochs": 2, "min_epochs": 1, "batch_size": 8, "backbone_lr_scale": 1.0}},
    }
    raw.update(changes)
    return StudyConfig.model_validate(raw)


def test_a_3d_classification_study_runs_every_protocol_on_volumes(tmp_path: Path) -> None:
    config = _study(tmp_path / "study")
    plan = prepare_study(config, **QUIET)
    assert plan.store.spatial_dims == 3
    output = run_study(config, **QUIET)
    with ResultsStore(output / "results.sqlite") as results:
        rows = [r for r in results.cells("vol") if r["metric"] == "auc"]
        assert {r["cell_key"] for r in rows} == {k.key for k in plan.cell_keys()}
        assert len(rows) == 2 * 3 * 2  # encoders × protocols × label fractions (one seed, one test set)
        assert all(r["has_predictions"] for r in rows)
        from sklearn.metrics import roc_auc_score

        for r in rows:  # the stored AUC is the AUC of the stored test predictions (not merely a number in [0, 1])
            stored = results.predictions("vol", r["cell_key"])
            score = stored.y_score[:, -1] if stored.y_score.ndim == 2 else stored.y_score
            assert r["value"] == pytest.approx(roc_auc_score(stored.y_true, score), abs=1e-9), r["cell_key"]
        steps = [r for r in results.cells("vol") if r["metric"] == "finetune_steps"]
        assert steps and all(r["value"] >= 1 for r in steps)
        assert len(results.pretrain_runs("vol")) == 1
    checkpoint = torch.load(tmp_path / "study" / "pretraining" / "simclr" / "checkpoints" / "final.pt",
                            weights_only=True)
    assert checkpoint["backbone_spec"]["spatial_dims"] == 3
    assert "report.html" in {p.name for p in (output / "report").iterdir()}


def test_a_2d_backbone_on_volumes_is_refused_before_compute(tmp_path: Path) -> None:
    config = _study(tmp_path / "study", model={"backbone": "small_cnn"}, pretraining=[], initialisations=["random"])
    with pytest.raises(Exception, match="3D"):
        prepare_study(config, **QUIET)
    assert not (tmp_path / "study").exists()


def test_multilabel_studies_are_refused_clearly(tmp_path: Path) -> None:
    from dataclasses import replace

    from radssl.data.store import TaskInfo
    from support import make_tiny_store

    store = make_tiny_store()
    labels = torch.stack([store.labels.float(), 1 - store.labels.float()], dim=1)
    multilabel = replace(store, labels=labels, task=TaskInfo("multilabel", 2, ("a", "b")), _fingerprint=None)
    config = StudyConfig.model_validate({"output_dir": str(tmp_path / "s"), "protocols": ["linear"]})
    with pytest.raises(DataError, match="multilabel studies are not implemented"):
        prepare_study(config, **QUIET, load=lambda section: multilabel)


def test_3d_shift_and_flip_move_every_voxel_of_a_volume_together() -> None:
    from radssl.transfer.finetune import random_shift_flip

    volume = torch.zeros(1, 1, 8, 8, 8)
    volume[0, 0, 2, 3, 1] = 1.0  # one marked voxel (d, h, w)
    volume[0, 0, 5, 6, 6] = 0.5
    for seed in range(20):
        out = random_shift_flip(volume.repeat(4, 2, 1, 1, 1), 2, True, torch.Generator().manual_seed(seed))
        assert out.shape == (4, 2, 8, 8, 8)
        for b in range(4):
            ones = (out[b, 0] == 1.0).nonzero().tolist()
            halves = (out[b, 0] == 0.5).nonzero().tolist()
            torch.testing.assert_close(out[b, 0], out[b, 1])  # channels move together
            if ones and halves:  # both inside after the shift: their offset is kept, w mirrored or not
                (d1, h1, w1), (d2, h2, w2) = ones[0], halves[0]
                assert (d2 - d1, h2 - h1) == (3, 3) and abs(w2 - w1) == 5
    flipped = random_shift_flip(volume, 0, True, torch.Generator().manual_seed(1))
    assert torch.equal(flipped, volume) or torch.equal(flipped, volume.flip(-1)), "shift 0: identity or L–R flip"


@pytest.mark.slow
def test_vesselmnist3d_study_runs_on_real_volumes(medmnist_file, tmp_path: Path) -> None:  # noqa: ANN001
    """The shipped 3D config passes every check on the real file, and a CPU-sized variant of it runs."""
    from radssl.study.config import load_study_config

    folder = medmnist_file("vesselmnist3d.npz").parent
    root = Path(__file__).resolve().parents[1] / "configs" / "vesselmnist3d.yaml"
    common = [f"data.root={folder}", "data.download=false", f"output_dir={tmp_path / 'study'}"]
    full = prepare_study(load_study_config(root, common), **QUIET)
    assert full.store.spatial_dims == 3 and len(full.train_rows) == 1335
    assert len(full.cell_keys()) == 2 * 3 * 3 * 3  # encoders × protocols × seeds × fractions
    small = load_study_config(root, common + [
        "model.backbone=small_cnn_3d", "model.options={width: 8}", "pretraining=[]", "initialisations=[random]",
        "seeds=[0]", "label_fractions=[0.1, 1.0]", "protocols={linear: {Cs: [0.1, 1.0]}, knn: {k: 20}}",
        "bootstrap_samples=200"])
    output = run_study(small, **QUIET)
    with ResultsStore(output / "results.sqlite") as results:
        aucs = {r["cell_key"]: r["value"] for r in results.cells("vesselmnist3d") if r["metric"] == "auc"}
    assert len(aucs) == 4 and all(0.5 < v <= 1.0 for v in aucs.values()), aucs  # random 3D features beat chance
