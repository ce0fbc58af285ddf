"""Fair comparisons in the study grid (issue 7, points 1–3): equal fine-tuning budgets across label fractions, one
backbone-LR rule for every initialisation, and a proportional validation split — and the report says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import radssl.transfer.protocols.finetune as finetune_module  # patched where the protocols look them up
import radssl.transfer.protocols.linear as probe_module
from radssl.data.splits import load_subsets
from radssl.errors import ConfigError, DataError
from radssl.study.config import StudyConfig, legacy_study_settings, load_study_config
from radssl.study.plan import _check_compatible, prepare_study
from radssl.study.results_store import ResultsStore
from radssl.study.runner import run_study

QUIET = {"log": lambda _: None}
FRACTIONS = [0.25, 1.0]
BATCH = 48


def _one_pass(rows: int) -> int:
    return rows // BATCH + (1 if rows % BATCH >= 2 else 0)


def _raw(output_dir: Path) -> dict:
    return {
        "name": "fair",
        "output_dir": str(output_dir),
        "threads": 1,  # tiny tensors on a shared 2-core machine: one thread is several times faster
        "data": {"source": "synthetic", "n_patients": 100, "images_per_patient": 2, "image_size": 16},
        "model": {"backbone": "small_cnn"},
        "pretraining": [{"name": "simclr", "optim": {"optimizer": "adamw", "lr": 0.002, "lr_scaling": "none"},
                         "train": {"steps": 2, "batch_size": 16, "accelerator": "cpu", "devices": 1,
                                   "progress_bar": False, "checkpoint_every": 2, "log_every": 1, "threads": 1}}],
        "initialisations": ["random", "ssl:simclr"],
        "label_fractions": FRACTIONS,
        "seeds": [0, 1],
        "protocols": {"linear": {"Cs": [0.1, 1.0]}, "finetune": {"epochs": 2, "batch_size": BATCH, "min_epochs": 2}},
        "validation_min_per_class": 3,
        "bootstrap_samples": 100,
    }


class _Recorder:
    """Wraps a protocol function and keeps (kwargs summary, result) of every call."""

    def __init__(self, function, summarise) -> None:  # noqa: ANN001
        self.function, self.summarise, self.calls = function, summarise, []

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        result = self.function(*args, **kwargs)
        self.calls.append((self.summarise(args, kwargs), result))
        return result


@pytest.fixture(scope="module")
def fair_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, list]:
    torch.set_num_threads(1)
    finetunes = _Recorder(finetune_module.finetune, lambda a, k: {
        "train": len(a[2]), "val": tuple(np.asarray(a[3]).tolist()), "scale": k["backbone_lr_scale"],
        "steps_per_epoch": k["steps_per_epoch"], "min_epochs": k["recipe"].recipe(k["steps_per_epoch"]).min_epochs})
    probes = _Recorder(probe_module.linear_probe, lambda a, k: {"train": len(a[0]), "val": len(a[2])})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune_module, "finetune", finetunes)
        patch.setattr(probe_module, "linear_probe", probes)
        output = run_study(StudyConfig.model_validate(_raw(tmp_path_factory.mktemp("fair") / "study")), **QUIET)
    return output, finetunes.calls, probes.calls


def _records(output: Path, protocol: str) -> dict[tuple[str, float, int], dict[str, float]]:
    """(init, label fraction, seed) → metrics of the internal-test cell of ``protocol``."""
    table: dict[tuple[str, float, int], dict[str, float]] = {}
    with ResultsStore(output / "results.sqlite") as store:
        for row in store.cells("fair"):
            if row["protocol"] == protocol and row["test_set"] == "test":
                table.setdefault((row["init"], row["label_fraction"], row["seed"]), {})[row["metric"]] = row["value"]
    return table


def test_every_label_fraction_gets_the_same_finetuning_budget(fair_run: tuple[Path, list, list]) -> None:
    output, finetunes, _ = fair_run
    plan = prepare_study(StudyConfig.model_validate(_raw(output)), **QUIET)
    full_pass = _one_pass(len(plan.train_rows))
    assert full_pass > _one_pass(len(plan.subsets[0][0.25]))  # the small fraction would get fewer steps
    assert {call["steps_per_epoch"] for call, _ in finetunes} == {full_pass}
    assert {call["min_epochs"] for call, _ in finetunes} == {2}
    assert {call["train"] for call, _ in finetunes} == {len(plan.subsets[0][0.25]), len(plan.subsets[0][1.0]),
                                                         len(plan.subsets[1][0.25])}
    cells = _records(output, "finetune")
    assert len(cells) == 2 * 2 * 2
    for metrics in cells.values():
        assert metrics["finetune_budget_steps"] == 2 * full_pass  # the same at 25 % and 100 % of the labels
        assert metrics["steps_per_epoch"] == full_pass
        assert metrics["finetune_steps"] == metrics["epochs_run"] * full_pass
    html = (output / "report" / "report.html").read_text()
    methods = html[html.index('id="methods"'):html.index('id="curves"')]
    assert "same number of optimiser steps" in methods
    assert f"planned steps per cell: 25%: {2 * full_pass}, 100%: {2 * full_pass}" in methods
    assert "never before epoch 2" in methods


def test_every_initialisation_follows_the_same_backbone_lr_rule(fair_run: tuple[Path, list, list]) -> None:
    output, finetunes, _ = fair_run
    cells = _records(output, "finetune")
    # Calls come per cell, one per candidate, in the candidates' order: pair them up.
    assert [call["scale"] for call, _ in finetunes] == [0.1, 1.0] * len(cells)
    by_val: dict[tuple, list] = {}
    for call, result in finetunes:
        by_val.setdefault((call["train"], call["val"]), []).append((call["scale"], result.val_metric))
    chosen = {}
    for (init, fraction, seed), metrics in sorted(cells.items()):
        assert metrics["backbone_lr_scale"] in (0.1, 1.0)
        chosen[init] = chosen.get(init, 0) + 1
    assert chosen == {"random": 4, "ssl": 4}
    # The kept candidate is the one with the best validation AUC (ties keep the first).
    for call_group in zip(finetunes[::2], finetunes[1::2], strict=True):
        (low_call, low), (high_call, high) = call_group
        assert (low_call["scale"], high_call["scale"]) == (0.1, 1.0)
        best = 0.1 if low.val_metric >= high.val_metric else 1.0
        assert any(m["backbone_lr_scale"] == best and m["val_auc"] == max(low.val_metric, high.val_metric)
                   for m in cells.values())
    html = (output / "report" / "report.html").read_text()
    methods = html[html.index('id="methods"'):html.index('id="curves"')]
    assert "the same rule for every initialisation" in methods and "0.1, 1" in methods


def test_validation_is_proportional_nested_and_per_seed(fair_run: tuple[Path, list, list]) -> None:
    output, finetunes, probes = fair_run
    plan = prepare_study(StudyConfig.model_validate(_raw(output)), **QUIET)
    labels = plan.store.labels.numpy()
    val = set(plan.val_rows.tolist())
    for seed in (0, 1):
        small, full = plan.validation_rows(seed, 0.25), plan.validation_rows(seed, 1.0)
        assert set(small) < set(full) == val  # nested; 100 % of the labels = the whole split
        assert np.bincount(labels[small], minlength=2).min() >= 3  # the per-class floor
        assert len(small) == pytest.approx(0.25 * len(val), abs=4)
        patients = set(plan.store.patient_id[small])
        assert set(np.flatnonzero(np.isin(plan.store.patient_id, list(patients)))) & val == set(small)
        saved, meta = load_subsets(output / "subsets" / f"val_seed{seed}.json")
        assert np.array_equal(saved[0.25], small) and meta["validation"] == "proportional"
    assert not np.array_equal(plan.validation_rows(0, 0.25), plan.validation_rows(1, 0.25))
    # The read-outs selected on exactly those rows.
    sizes = {len(plan.validation_rows(s, f)) for s in (0, 1) for f in FRACTIONS}
    assert {len(call["val"]) for call, _ in finetunes} == sizes
    assert {call["val"] for call, _ in probes} == sizes
    for (init, fraction, seed), metrics in _records(output, "linear").items():
        assert metrics["val_images"] == len(plan.validation_rows(seed, fraction))
    html = (output / "report" / "report.html").read_text()
    methods = html[html.index('id="methods"'):html.index('id="curves"')]
    assert "<strong>proportional</strong>" in methods and "at least 3 images per class" in methods


def test_full_validation_and_budget_rules_are_options(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    plan = prepare_study(StudyConfig.model_validate({**raw, "validation": "full"}), **QUIET)
    assert plan.val_subsets == {} and np.array_equal(plan.validation_rows(0, 0.25), plan.val_rows)
    n = len(plan.train_rows)
    small = len(plan.subsets[0][0.25])
    full_pass = _one_pass(n)
    assert plan.finetune_steps_per_epoch(small) == plan.finetune_steps_per_epoch(n) == full_pass
    for rule, expected_small, expected_full in (("subset", _one_pass(small), full_pass), (40, 40, 40), (1, 1, 1)):
        finetune = {**raw["protocols"]["finetune"], "steps_per_epoch": rule}
        config = StudyConfig.model_validate({**raw, "protocols": {**raw["protocols"], "finetune": finetune}})
        plan = prepare_study(config, **QUIET)
        assert plan.finetune_steps_per_epoch(small) == expected_small
        assert plan.finetune_steps_per_epoch(n) == expected_full


def test_a_validation_subset_without_both_classes_is_refused_before_compute(tmp_path: Path) -> None:
    import radssl.data.splits as splits

    drawn = splits.label_fraction_subsets

    def negatives_only(labels, rows, fractions, seed, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        subsets = drawn(labels, rows, fractions, seed, *args, **kwargs)
        if isinstance(seed, list):  # the validation stream: keep one class only
            subsets = {f: r[labels[r] == 0] for f, r in subsets.items()}
        return subsets

    with pytest.raises(DataError, match=r"validation: proportional, seed 0.*label fraction 0\.25 keeps \d+ "
                                        r"validation images.*AUC is undefined.*raise validation_min_per_class, or "
                                        r"set validation: full"):
        prepare_study(StudyConfig.model_validate(_raw(tmp_path)), **QUIET, draw=negatives_only)
    prepare_study(StudyConfig.model_validate({**_raw(tmp_path), "validation": "full"}), **QUIET, draw=negatives_only)


@pytest.mark.parametrize(("override", "expected"), [
    ("protocols.finetune.random_backbone_lr_scale=1.0", "random_backbone_lr_scale was removed"),
    ("protocols.finetune.steps_per_epoch=0", "steps_per_epoch"),
    ("protocols.finetune.steps_per_epoch=half", "steps_per_epoch"),
    ("protocols.finetune.min_epochs=40", "min_epochs (40) is larger than epochs (30)"),
    ("protocols.finetune.backbone_lr_scale=[0.1,0.1]", "must not repeat"),
    ("validation=some", "validation"),
    ("validation_min_per_class=0", "validation_min_per_class"),
])
def test_fairness_settings_are_validated(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_study_config(None, ["protocols={finetune: {}}", override])


def test_one_number_is_the_rule_for_every_initialisation() -> None:
    config = load_study_config(None, ["protocols={finetune: {}}", "protocols.finetune.backbone_lr_scale=0.5"])
    assert config.protocols.finetune.backbone_lr_scale == [0.5]
    assert load_study_config(None, ["protocols={finetune: {}}"]).protocols.finetune.backbone_lr_scale == [0.1, 1.0]
    assert load_study_config(None, ["protocols={finetune: {}}", "protocols.finetune.epochs=3"]
                             ).protocols.finetune.early_stopping_floor == 3


def test_results_computed_under_the_old_rules_are_not_mixed_with_new_ones() -> None:
    new = StudyConfig.model_validate(_raw(Path("unused"))).to_dict()
    old = {k: v for k, v in new.items() if k not in ("validation", "validation_min_per_class")}
    old_finetune = {k: v for k, v in new["protocols"]["finetune"].items() if k not in ("steps_per_epoch", "min_epochs")}
    old["protocols"] = {**new["protocols"], "finetune": {**old_finetune, "backbone_lr_scale": 0.1,
                                                         "random_backbone_lr_scale": 1.0}}
    with pytest.raises(ConfigError, match=r"validation.*protocols\.finetune|protocols\.finetune.*validation"):
        _check_compatible(old, new, Path("results.sqlite"))
    # An old study whose two scales agreed followed one rule: read as such.
    settled = legacy_study_settings({**old, "protocols": {**old["protocols"], "finetune": {
        **old_finetune, "backbone_lr_scale": 0.3, "random_backbone_lr_scale": 0.3}}})
    assert settled["protocols"]["finetune"]["backbone_lr_scale"] == [0.3]
    assert settled["protocols"]["finetune"]["steps_per_epoch"] == "subset" and settled["validation"] == "full"
    _check_compatible(new, new, Path("results.sqlite"))
    floor = {**new, "validation_min_per_class": 7}
    with pytest.raises(ConfigError, match="validation_min_per_class"):
        _check_compatible(new, floor, Path("results.sqlite"))  # proportional: the floor changes the cells
    full = {**new, "validation": "full"}
    _check_compatible(full, {**full, "validation_min_per_class": 7}, Path("results.sqlite"))  # unused when full


@pytest.mark.parametrize("bn_stats", ["reestimate", "checkpoint"])
def test_frozen_read_outs_get_the_bn_stats_rule_and_finetuning_the_encoder_as_initialised(
        tmp_path: Path, bn_stats: str) -> None:
    """Issue 19, point 7: one re-estimation per encoder, used by the linear probe only; fine-tuning starts from
    the initialisation's own statistics (BatchNorm defaults for random init) under either rule."""
    import radssl.transfer.bn_stats as bn_module

    torch.set_num_threads(1)
    raw = {**_raw(tmp_path / "study"), "pretraining": [], "initialisations": ["random"], "seeds": [0],
           "label_fractions": [1.0], "bn_stats": bn_stats,
           "protocols": {"linear": {"Cs": [1.0]}, "finetune": {"epochs": 1, "batch_size": BATCH, "min_epochs": 1,
                                                                 "backbone_lr_scale": 1.0}}}
    estimates = _Recorder(bn_module.reestimate_bn_statistics, lambda a, k: len(a[2]))
    first_bn = lambda module: next(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))  # noqa: E731
    finetunes = _Recorder(finetune_module.finetune, lambda a, k: first_bn(a[0]).running_var.clone())
    probes = _Recorder(probe_module.linear_probe, lambda a, k: np.asarray(k["standardisation_feats"]).mean(0))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bn_module, "reestimate_bn_statistics", estimates)
        patch.setattr(finetune_module, "finetune", finetunes)
        patch.setattr(probe_module, "linear_probe", probes)
        output = run_study(StudyConfig.model_validate(raw), **QUIET)
    assert len(probes.calls) == 1 and len(finetunes.calls) == 1
    torch.testing.assert_close(finetunes.calls[0][0], torch.ones_like(finetunes.calls[0][0]))  # BatchNorm defaults
    if bn_stats == "checkpoint":
        assert estimates.calls == []
        return
    plan = prepare_study(StudyConfig.model_validate(raw), **QUIET)
    assert [rows for rows, _ in estimates.calls] == [len(plan.store.pretrain_indices())]
    frozen = first_bn(estimates.calls[0][1])
    assert not torch.allclose(frozen.running_var, torch.ones_like(frozen.running_var))  # data statistics
    from radssl.transfer.features import extract_features

    features = extract_features(estimates.calls[0][1], plan.store.images)[torch.from_numpy(plan.train_rows)]
    np.testing.assert_allclose(probes.calls[0][0], features.numpy().mean(0), rtol=1e-5)  # the probe read them
    assert (output / "results.sqlite").is_file()


def test_bn_stats_is_a_result_defining_setting() -> None:
    new = StudyConfig.model_validate(_raw(Path("unused"))).to_dict()
    assert new["bn_stats"] == "reestimate"
    with pytest.raises(ConfigError, match="bn_stats"):
        _check_compatible(new, {**new, "bn_stats": "checkpoint"}, Path("results.sqlite"))
    before = {k: v for k, v in new.items() if k != "bn_stats"}  # a study stored before the setting existed
    assert legacy_study_settings(before)["bn_stats"] == "checkpoint"
    with pytest.raises(ConfigError, match="one of|checkpoint"):
        load_study_config(None, ["bn_stats=adabn"])
