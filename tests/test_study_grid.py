"""Study grid: every cell once, shared pretraining, exact resume after a crash, ImageNet+SSL, CLI."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import radssl.engine.pretrain as engine
import radssl.transfer.features as features_module
import radssl.transfer.protocols.finetune as finetune_module
import radssl.transfer.protocols.knn as knn_module
import radssl.transfer.protocols.linear as probe_module
from radssl.data.splits import load_subsets
from radssl.engine.checkpoint import load_checkpoint
from radssl.errors import ConfigError
from radssl.study.commands import add_study_commands
from radssl.study.config import StudyConfig, load_study_config
from radssl.study.plan import PretrainTask, _check_compatible, prepare_study
from radssl.study.results_store import ResultsStore
from radssl.study.runner import run_study
from radssl.study.tasks import execute


QUIET = {"log": lambda _: None}
TRAIN = {"steps": 3, "batch_size": 16, "accelerator": "cpu", "devices": 1, "progress_bar": False,
         "checkpoint_every": 2, "log_every": 1}


def _tiny_study(output_dir: Path) -> StudyConfig:
    raw = {
        "name": "tiny",
        "output_dir": str(output_dir),
        "data": {"source": "synthetic", "n_patients": 40, "images_per_patient": 2, "image_size": 24},
        "external_test_sets": [{"name": "site1", "data": {"source": "synthetic", "n_patients": 12,
                                                          "images_per_patient": 2, "image_size": 24, "site": 1}}],
        "model": {"backbone": "small_cnn"},
        "pretraining": [{"name": "simclr", "optim": {"optimizer": "adamw", "lr": 0.002, "lr_scaling": "none"},
                         "train": TRAIN}],
        "initialisations": ["random", "ssl:simclr"],
        "label_fractions": [0.3, 1.0],
        "seeds": [0, 1],
        "protocols": {"linear": {"Cs": [0.1, 1.0]}, "knn": {"k": 5}, "finetune": {"epochs": 1, "batch_size": 16}},
        "bootstrap_samples": 100,
    }
    return StudyConfig.model_validate(raw)


def _cells(output_dir: Path) -> dict[str, dict[str, float]]:
    """cell key → {metric: value} of a finished study."""
    with ResultsStore(output_dir / "results.sqlite") as store:
        table: dict[str, dict[str, float]] = {}
        for row in store.cells("tiny"):
            table.setdefault(row["cell_key"], {})[row["metric"]] = row["value"]
        return table


class _Counter:
    """Wraps a function, counts calls, optionally raises on call number ``fail_on``."""

    def __init__(self, function, fail_on: int | None = None) -> None:  # noqa: ANN001
        self.function, self.fail_on, self.calls = function, fail_on, 0

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        self.calls += 1
        if self.fail_on is not None and self.calls >= self.fail_on:
            raise KeyboardInterrupt("simulated kill mid-grid")
        return self.function(*args, **kwargs)


class _PretrainCounter:
    """The study's ``work`` (:func:`radssl.study.tasks.execute`), counting the pretraining runs it starts."""

    def __init__(self) -> None:
        self.calls = 0

    def work(self, plan, task, state, log):  # noqa: ANN001, ANN201
        if isinstance(task, PretrainTask):
            self.calls += 1
        return execute(plan, task, state, log)


def _count_protocols(monkeypatch: pytest.MonkeyPatch, knn_fail_on: int | None = None) -> dict[str, Any]:
    """Counters of each read-out and of the pretraining runs; pass ``work=counters["pretrain"].work`` to run_study."""
    counters = {
        "linear": _Counter(probe_module.linear_probe),
        "knn": _Counter(knn_module.knn_evaluate, knn_fail_on),
        "finetune": _Counter(finetune_module.finetune),
        "pretrain": _PretrainCounter(),
        "features": _Counter(features_module.extract_features),
    }
    monkeypatch.setattr(probe_module, "linear_probe", counters["linear"])
    monkeypatch.setattr(knn_module, "knn_evaluate", counters["knn"])
    monkeypatch.setattr(finetune_module, "finetune", counters["finetune"])
    monkeypatch.setattr(features_module, "extract_features", counters["features"])
    return counters


CLEAN_CALLS: dict[str, int] = {}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(2)
    with pytest.MonkeyPatch.context() as patch:
        counters = _count_protocols(patch)
        output = run_study(_tiny_study(tmp_path_factory.mktemp("clean") / "study"), **QUIET,
                           work=counters["pretrain"].work)
    CLEAN_CALLS.update({name: c.calls for name, c in counters.items()})
    return output


def test_grid_writes_every_cell_once_with_metrics_predictions_and_report(clean_run: Path) -> None:
    config = _tiny_study(clean_run)
    plan = prepare_study(config, **QUIET)
    cells = _cells(clean_run)
    expected = {key.key for key in plan.cell_keys()}
    assert len(expected) == 2 * 3 * 2 * 2 * 2  # encoders × protocols × seeds × fractions × test sets
    assert set(cells) == expected
    # One pretraining run, features once per (encoder, store), one protocol run per (encoder, seed, fraction):
    # each protocol run scores both test sets.
    # Fine-tuning runs once per backbone_lr_scale candidate (default [0.1, 1.0]) and keeps the best on validation.
    assert CLEAN_CALLS == {"pretrain": 1, "features": 2 * 2, "linear": 2 * 2 * 2, "knn": 2 * 2 * 2,
                           "finetune": 2 * 2 * 2 * 2}
    with ResultsStore(clean_run / "results.sqlite") as store:
        rows = [r for r in store.cells("tiny") if r["metric"] == "auc"]
        for row in rows:
            assert row["ci_low"] <= row["value"] <= row["ci_high"], row["cell_key"]
            assert row["device"] and row["wall_time_s"] >= 0 and row["has_predictions"]
            prediction = store.predictions("tiny", row["cell_key"])
            test_store, test_rows = plan.test_sets[row["test_set"]]
            np.testing.assert_array_equal(prediction.y_true, test_store.labels[torch.from_numpy(test_rows)].numpy())
            assert prediction.y_score.shape == (len(test_rows),)
        runs = store.pretrain_runs("tiny")
        assert [r["run_name"] for r in runs] == ["simclr"] and Path(runs[0]["checkpoint"]).is_file()
        assert runs[0]["images_seen"] == 3 * 16
        assert store.study_config("tiny")["label_fractions"] == [0.3, 1.0]
    # Linear-probe cells used as many training images as their label-fraction subset holds.
    for seed in (0, 1):
        subsets, meta = load_subsets(clean_run / "subsets" / f"seed{seed}.json")
        assert meta["data_fingerprint"] == plan.store.fingerprint()
        for fraction, rows in subsets.items():
            np.testing.assert_array_equal(rows, plan.subsets[seed][fraction])
            key = f"none|random|linear|lf={fraction!r}|pf=1.0|seed={seed}|test"
            assert cells[key]["train_images"] == len(rows)
    html = (clean_run / "report" / "report.html").read_text()
    assert "site1" in html and "SSL" in html
    assert (clean_run / "report" / "results.csv").is_file()


def test_random_init_is_the_pretraining_starting_point(clean_run: Path) -> None:
    """random = the backbone the engine builds before step 0, so SSL vs random isolates pretraining."""
    from radssl.study.tasks import _backbone

    config = _tiny_study(clean_run)
    plan = prepare_study(config, **QUIET)
    random_encoder = next(e for e in plan.encoders if e.init == "random")
    ours = _backbone(plan, random_encoder).state_dict()
    torch.manual_seed(config.seed)
    theirs = engine.build_pretraining_method(plan.pretrain_configs[plan.jobs[0]], plan.store).backbone.state_dict()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def test_rerun_recomputes_nothing(clean_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _cells(clean_run)
    counters = _count_protocols(monkeypatch)
    run_study(_tiny_study(clean_run), **QUIET, work=counters["pretrain"].work)
    assert {name: c.calls for name, c in counters.items()} == dict.fromkeys(counters, 0)
    assert _cells(clean_run) == before


def test_killed_study_resumes_to_the_clean_result(clean_run: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    crashed = tmp_path / "study"
    # random has 4 kNN groups (2 seeds × 2 fractions); the kill hits SSL's second kNN group, after pretraining.
    with monkeypatch.context() as patch:
        counters = _count_protocols(patch, knn_fail_on=6)
        with pytest.raises(KeyboardInterrupt):
            run_study(_tiny_study(crashed), **QUIET, work=counters["pretrain"].work)
        assert counters["pretrain"].calls == 1
    partial = _cells(crashed)
    assert 0 < len(partial) < len(_cells(clean_run))

    counters = _count_protocols(monkeypatch)
    run_study(_tiny_study(crashed), **QUIET, work=counters["pretrain"].work)
    done_groups = {(k.split("|")[1], k.split("|")[2], k.split("|")[3], k.split("|")[5]) for k in partial}
    resumed = {name: c.calls for name, c in counters.items()}
    assert resumed["pretrain"] == 0, "the finished pretraining run was repeated"
    assert resumed["features"] == 0, "features cached on disk before the kill were extracted again"
    scales = len(_tiny_study(crashed).protocols.finetune.backbone_lr_scale)  # fine-tuning runs per cell
    assert resumed["linear"] + resumed["knn"] + resumed["finetune"] // scales == 2 * 3 * 2 * 2 - len(done_groups)
    assert resumed["linear"] == 0  # both encoders' probes finished before the kill

    clean, final = _cells(clean_run), _cells(crashed)
    assert set(final) == set(clean)
    for key in clean:
        for metric, value in clean[key].items():
            assert final[key][metric] == pytest.approx(value, abs=1e-6), (key, metric)


def test_changed_settings_are_refused_but_growth_is_allowed() -> None:
    base = _tiny_study(Path("unused")).to_dict()
    grown = {**base, "seeds": [0, 1, 2], "label_fractions": [0.1, 0.3, 1.0], "initialisations": ["random"]}
    _check_compatible(base, grown, Path("results.sqlite"))
    changed = {**base, "protocols": {**base["protocols"], "finetune": {**base["protocols"]["finetune"], "epochs": 5}}}
    with pytest.raises(ConfigError, match=r"protocols\.finetune"):
        _check_compatible(base, changed, Path("results.sqlite"))
    run = {**base["pretraining"][0], "method": {"name": "byol"}}
    with pytest.raises(ConfigError, match=r"pretraining\['simclr'\]"):
        _check_compatible(base, {**base, "pretraining": [run]}, Path("results.sqlite"))


def test_imagenet_and_imagenet_plus_ssl_cells(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    from radssl.transfer.initialisation import adapt_first_conv

    torch.manual_seed(0)
    imagenet = resnet18(weights=None).state_dict()  # stands in for the real file (no download in tests)
    weights = tmp_path / "resnet18-test.pth"
    torch.save(imagenet, weights)
    config = load_study_config(None, [
        "name=tiny", f"output_dir={tmp_path / 'study'}", "model.backbone=resnet18",
        "data={source: synthetic, n_patients: 30, images_per_patient: 2, image_size: 16}",
        "pretraining=[{name: simclr, optim: {optimizer: sgd, lr: 1.0e-9, lr_scaling: none}, "
        "train: {steps: 1, batch_size: 16, accelerator: cpu, devices: 1, progress_bar: false}}]",
        f"imagenet_weights={weights}", "initialisations=[imagenet, imagenet+ssl:simclr]",
        "label_fractions=[1.0]", "protocols=[linear]", "bootstrap_samples=100",
    ])
    output = run_study(config, **QUIET)
    cells = _cells(output)
    assert set(cells) == {"none|imagenet|linear|lf=1.0|pf=1.0|seed=0|test",
                          "simclr|imagenet+ssl|linear|lf=1.0|pf=1.0|seed=0|test"}
    final = load_checkpoint(output / "pretraining" / "imagenet+simclr" / "checkpoints" / "final.pt")["backbone"]
    torch.testing.assert_close(final["net.conv1.weight"], adapt_first_conv(imagenet["conv1.weight"], 1),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(final["net.layer4.1.conv2.weight"], imagenet["layer4.1.conv2.weight"],
                               rtol=0, atol=1e-6)


def test_cli_study_and_report_commands(clean_run: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="radssl")
    add_study_commands(parser.add_subparsers(dest="command", required=True))
    for command in ("study", "report"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
    assert "resumes a killed study" in " ".join(capsys.readouterr().out.split())
    args = parser.parse_args(["study", "s.yaml", "seeds=[0]", "--output-dir", "x"])
    assert args.config == Path("s.yaml") and args.overrides == ["seeds=[0]"] and args.output_dir == "x"

    copy = tmp_path / "copy"
    shutil.copy(clean_run / "results.sqlite", tmp_path / "results.sqlite")
    args = parser.parse_args(["report", str(tmp_path / "results.sqlite"), "--out", str(copy)])
    assert args.func(args) == 0
    assert (copy / "report.html").is_file() and "report.html" in capsys.readouterr().out
    args = parser.parse_args(["report", str(tmp_path / "nothing-here")])
    with pytest.raises(Exception, match="no study results found"):
        args.func(args)
