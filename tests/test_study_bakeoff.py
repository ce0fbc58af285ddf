"""``radssl bakeoff``: method selection by the data, one budget for every arm (images seen or calibrated
wall-clock), the wall-clock deviation flag, and a tiny end-to-end bake-off producing the study report + bakeoff.json."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import radssl.study.bakeoff as bakeoff
from radssl.cli import main
from radssl.data.build import build_store
from radssl.errors import ConfigError
from radssl.methods.registry import method_class
from radssl.study.bakeoff import (
    BakeoffConfig,
    load_bakeoff_config,
    plan_bakeoff,
    select_methods,
    steps_for_images,
    steps_for_wall_clock,
    wall_clock_deviations,
)
from radssl.study.results_store import ResultsStore

QUIET = {"log": lambda _: None}
EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "bakeoff_example.yaml"
DATA_2D = {"source": "synthetic", "n_patients": 30, "images_per_patient": 2, "image_size": 24}
DATA_3D = {"source": "synthetic3d", "n_patients": 20, "volumes_per_patient": 2, "volume_size": 16}
TRAIN = {"batch_size": 16, "accelerator": "cpu", "devices": 1, "progress_bar": False, "log_every": 1}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _config(**changes) -> BakeoffConfig:  # noqa: ANN003
    raw = {"name": "tiny", "data": DATA_2D, "model": {"backbone": "small_cnn"}, "budget": {"images_seen": 64},
           "train": TRAIN, "label_fractions": [0.5, 1.0], "seeds": [0], "protocols": {"linear": {"Cs": [1.0]}},
           "bootstrap_samples": 100}
    raw.update(changes)
    return BakeoffConfig.model_validate(raw)


def _selected(config: BakeoffConfig) -> tuple[set[str], dict[str, str]]:
    arms, excluded = select_methods(config, build_store(config.data), **QUIET)
    return set(arms), excluded


# ------------------------------------------------------------------------------------------------ selection
def test_2d_images_without_reports_leave_out_the_image_text_methods_and_say_why() -> None:
    selected, excluded = _selected(_config())
    assert {"convirt", "clip"} <= set(excluded)
    assert not {"convirt", "clip"} & selected
    assert all("report" in excluded[m] for m in ("convirt", "clip"))
    assert {"simclr", "byol", "models_genesis", "mae", "dino"} <= selected


def test_images_with_reports_include_the_image_text_methods() -> None:
    selected, excluded = _selected(_config(data={**DATA_2D, "reports": True}))
    assert {"convirt", "clip", "simclr"} <= selected
    assert "convirt" not in excluded and "clip" not in excluded


def test_3d_data_select_only_3d_capable_methods() -> None:
    config = _config(data=DATA_3D, model={"backbone": "small_cnn_3d", "options": {"width": 8}})
    arms, excluded = select_methods(config, build_store(config.data), **QUIET)
    assert {"simclr", "byol", "models_genesis"} <= set(arms)
    assert {"dino", "mae", "convirt", "clip"} <= set(excluded)  # 2D-only, ViT (2D), no reports
    for method in arms:
        cls = method_class(method)
        assert 3 in cls.requirements(cls.Params()).spatial_dims
    assert {arm.group for arm in arms.values()} == {"small_cnn_3d"}


def test_mae_gets_its_own_backbone_group_and_random_twin() -> None:
    config = _config(methods=["simclr", "mae"])
    plan = plan_bakeoff(config, **QUIET)
    assert set(plan.studies) == {"small_cnn", "vit_tiny"}
    for group, study in plan.studies.items():
        assert study.model.backbone == group
        assert study.initialisations[0] == "random"  # each backbone group reads out its own random twin
    assert plan.studies["vit_tiny"].initialisations == ["random", "ssl:mae"]


def test_an_unknown_method_is_a_did_you_mean_error_before_any_data_is_read(monkeypatch: pytest.MonkeyPatch,
                                                                            capsys: pytest.CaptureFixture) -> None:
    def no_data(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("data were loaded before the config was checked")

    monkeypatch.setattr("radssl.study.bakeoff.build_store", no_data)
    with pytest.raises(ConfigError, match="did you mean 'simclr'"):
        load_bakeoff_config(EXAMPLE, methods=["simclrr"])
    assert main(["bakeoff", str(EXAMPLE), "--methods", "simclrr", "byol"]) == 2
    assert "did you mean 'simclr'" in capsys.readouterr().err


def test_a_listed_method_that_does_not_fit_the_data_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="convirt.*report"):
        plan_bakeoff(_config(methods=["simclr", "convirt"]), **QUIET)


# -------------------------------------------------------------------------------------------------- budgets
def test_every_arm_sees_the_same_images_under_an_images_budget() -> None:
    config = _config(methods=["simclr", "byol", "models_genesis"], budget={"images_seen": 100},
                     method_settings={"byol": {"method": {"momentum_start": 0.95}}})
    plan = plan_bakeoff(config, **QUIET)
    entries = [entry for study in plan.studies.values() for entry in study.pretraining]
    assert {entry.name for entry in entries} == {"simclr", "byol", "models_genesis"}
    seen = {entry.name: entry.train.steps * entry.train.batch_size for entry in entries}
    assert len(set(seen.values())) == 1, seen
    assert next(iter(seen.values())) == 112  # ceil(100 / 16) = 7 steps of 16: never fewer images than stated
    assert steps_for_images(100, 16) == 7 and steps_for_images(96, 16) == 6


def test_an_arm_cannot_change_its_batch_size_or_length() -> None:
    with pytest.raises(Exception, match="train"):
        _config(method_settings={"byol": {"train": {"batch_size": 8}}})
    with pytest.raises(Exception, match="train.steps is set by the budget"):
        _config(train={**TRAIN, "steps": 10})


def test_the_budget_states_exactly_one_rule() -> None:
    with pytest.raises(Exception, match="exactly one budget"):
        _config(budget={"images_seen": 64, "wall_clock_s": 10, "threads": 1})
    with pytest.raises(Exception, match="exactly one budget"):
        _config(budget={})
    with pytest.raises(Exception, match="needs threads"):
        _config(budget={"wall_clock_s": 10})


def test_wall_clock_budget_sets_steps_from_each_calibrated_rate_and_reuses_the_calibration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rates = {"simclr": 200.0, "byol": 100.0}
    calls: list[str] = []

    def fake_calibrate(config, arm, store):  # noqa: ANN001, ANN202
        calls.append(arm.method)
        return {"images_per_s": rates[arm.method], "peak_memory_mb": 1.0, "peak_memory_source": "test"}

    monkeypatch.setattr(bakeoff, "calibrate", fake_calibrate)
    config = _config(output_dir=str(tmp_path), methods=["simclr", "byol"],
                     budget={"wall_clock_s": 10, "threads": 1})
    plan = plan_bakeoff(config, **QUIET)
    assert {m: a.steps for m, a in plan.arms.items()} == {"simclr": 125, "byol": 62}  # floor(10 · rate / 16)
    assert steps_for_wall_clock(10, 100.0, 16) == 62
    assert all(run.train.threads == 1 for run in plan.studies["small_cnn"].pretraining)
    again = plan_bakeoff(config, **QUIET)  # a resumed bake-off keeps its steps: no new calibration
    assert calls == ["simclr", "byol"]
    assert {m: a.steps for m, a in again.arms.items()} == {"simclr": 125, "byol": 62}


def test_calibration_times_the_runs_own_logging_cadence_and_only_windows_after_warm_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A logging step also reduces the method's diagnostics, so the calibration times the loop the run runs: the
    run's ``log_every``, whole windows, and only the windows after warm-up."""
    config = _config(methods=["vicreg"], budget={"wall_clock_s": 10, "threads": 1},
                     train={**TRAIN, "log_every": 4}, calibration={"warmup_steps": 5, "steps": 6})
    store = build_store(config.data)
    arms, _ = select_methods(config, store, **QUIET)
    seen: dict[str, int] = {}

    def fake_pretrain(pretrain_config, store):  # noqa: ANN001, ANN202
        seen.update(steps=pretrain_config.train.steps, log_every=pretrain_config.train.log_every)
        out = Path(pretrain_config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # warm-up windows (steps 4, 8) are slow, the timed windows (12, 16) are what counts
        rows = [(4, 10.0), (8, 20.0), (12, 100.0), (16, 120.0)]
        (out / "metrics.csv").write_text("step,loss,images_per_s\n" + "".join(f"{s},1.0,{r}\n" for s, r in rows))

    monkeypatch.setattr(bakeoff, "pretrain", fake_pretrain)
    result = bakeoff.calibrate(config, arms["vicreg"], store)
    assert seen == {"steps": 16, "log_every": 4}  # 5 warm-up → 8 and 6 timed → 8: whole windows of 4
    assert result["images_per_s"] == pytest.approx(110.0)  # median of the windows after step 8 only
    assert (result["warmup_steps"], result["timed_steps"], result["log_every"]) == (8, 8, 4)


def test_calibration_check_runs_the_calibrated_steps_at_once_with_the_runs_own_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``check_calibration`` (issue 19 point 2): the run after the calibration is the bake-off's run — the steps
    the calibration gives, the arm's own logging and checkpoints — and its deviation is the engine's wall-clock
    against the budget."""
    config = _config(methods=["vicreg"], budget={"wall_clock_s": 10, "threads": 1},
                     train={**TRAIN, "log_every": 2}, calibration={"warmup_steps": 2, "steps": 4})
    store = build_store(config.data)
    arms, _ = select_methods(config, store, **QUIET)
    calls: list[dict[str, int]] = []

    def fake_pretrain(pretrain_config, store):  # noqa: ANN001, ANN202
        train = pretrain_config.train
        calls.append({"steps": train.steps, "log_every": train.log_every, "checkpoint_every": train.checkpoint_every})
        out = Path(pretrain_config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = [(s, 32.0) for s in range(2, train.steps + 1, 2)]  # 32 img/s in every window
        (out / "metrics.csv").write_text("step,loss,images_per_s\n" + "".join(f"{s},1.0,{r}\n" for s, r in rows))
        return SimpleNamespace(wall_time_s=12.0)  # the run took 12 s of a 10 s budget

    monkeypatch.setattr(bakeoff, "pretrain", fake_pretrain)
    result = bakeoff.check_calibration(config, arms["vicreg"], store)
    assert calls[0] == {"steps": 6, "log_every": 2, "checkpoint_every": 7}  # 2 warm-up + 4 timed, no checkpoint
    # the run: 10 s × 32 img/s / batch 16 steps, the arm's own cadence and checkpoints (the config's default 200)
    assert calls[1] == {"steps": 20, "log_every": 2, "checkpoint_every": 200}
    assert result["steps"] == 20 and result["images_seen"] == 320
    assert result["deviation"] == pytest.approx(0.2) and result["flagged"] is True
    assert result["run_images_per_s"] == pytest.approx(320 / 12.0)
    with pytest.raises(ConfigError, match="wall-clock budget"):
        bakeoff.check_calibration(_config(methods=["vicreg"]), arms["vicreg"], store)


def test_arms_off_the_wall_clock_budget_by_more_than_ten_percent_are_flagged() -> None:
    result = wall_clock_deviations(100.0, {"on_time": 109.0, "slow": 111.0, "fast": 89.0})
    assert {arm: r["flagged"] for arm, r in result.items()} == {"on_time": False, "slow": True, "fast": True}
    assert result["slow"]["deviation"] == pytest.approx(0.11)


def test_summary_flags_an_arm_whose_run_overran_the_wall_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(output_dir=str(tmp_path), methods=["simclr"], budget={"wall_clock_s": 10, "threads": 1})
    monkeypatch.setattr(bakeoff, "calibrate", lambda *_: {"images_per_s": 32.0})
    plan = plan_bakeoff(config, **QUIET)
    monkeypatch.setattr(bakeoff, "headline", lambda *_args, **_kwargs: [])
    runs = tmp_path / "runs" / "checkpoints"
    runs.mkdir(parents=True)
    (tmp_path / "runs" / "run.json").write_text(json.dumps({"wall_time_s": 12.5, "steps": 20,
                                                            "global_batch_size": 16}))

    with ResultsStore(tmp_path / "results.sqlite") as results:  # what the study runner records
        results.record_pretrain_run(plan.studies["small_cnn"].name, "simclr", runs / "final.pt", wall_time_s=12.5,
                                    device="cpu", images_seen=320)
    summary = bakeoff.summarise(plan, {"small_cnn": tmp_path})
    assert summary["arms"]["simclr"]["wall_clock_flagged"] is True
    assert summary["arms"]["simclr"]["images_seen"] == 320
    assert summary["flags"] and "simclr" in summary["flags"][0] and "+25.0%" in summary["flags"][0]


# ------------------------------------------------------------------------------------------------ end to end
def test_a_tiny_bakeoff_runs_end_to_end_from_the_example_config(tmp_path: Path) -> None:
    out = tmp_path / "bk"
    # An override right after --methods stays an override (argparse would hand it to --methods).
    code = main(["bakeoff", str(EXAMPLE), "--methods", "simclr", "byol", "data.n_patients=30", "--output-dir", str(out),
                 "data.image_size=24", "budget.images_seen=48", "train.batch_size=16",
                 "train.accelerator=cpu", "train.progress_bar=false", "seeds=[0]", "label_fractions=[0.5,1.0]",
                 "protocols={linear: {Cs: [1.0]}}", "bootstrap_samples=100"])
    assert code == 0
    summary = json.loads((out / "bakeoff.json").read_text())
    assert set(summary["arms"]) == {"simclr", "byol"}
    for arm in summary["arms"].values():
        assert arm["steps"] == 3 and arm["images_seen"] == 48 and arm["pretrain_wall_s"] > 0
    page = Path(summary["reports"]["small_cnn"]).read_text()
    assert "equal images seen: 48 per arm" in page  # the report states the budget and each arm's images
    assert "bake-off arm simclr (small_cnn): 3 steps × batch 16 = 48 images seen" in page
    assert summary["flags"] == []
    rows = summary["headline"]
    assert {(r["method"], r["label_fraction"]) for r in rows} == {(m, f) for m in ("simclr", "byol")
                                                                   for f in (0.5, 1.0)}
    for row in rows:
        assert row["images_seen"] == 48
        assert 0.0 <= row["ssl"]["mean"] <= 1.0 and 0.0 <= row["random"]["mean"] <= 1.0
        assert row["ssl"]["low"] <= row["ssl"]["mean"] <= row["ssl"]["high"]
        assert row["gain_over_random"]["mean"] == pytest.approx(row["ssl"]["mean"] - row["random"]["mean"],
                                                                abs=1e-9)


def test_the_example_config_validates() -> None:
    config = load_bakeoff_config(EXAMPLE)
    assert config.budget.rule == "images_seen" and config.methods is None
    assert bakeoff.steps_for_images(config.budget.images_seen, config.batch_size) == 200


def test_the_benchmark_is_a_thin_caller_with_one_budget_and_outputs_outside_the_checkout() -> None:
    import argparse

    from support import load_benchmark_script

    script = load_benchmark_script("method_bakeoff")
    flags = dict(dataset="breastmnist", size=28, backbone="resnet18", stem="standard", batch_size=256, threads=2,
                 budget_minutes=5.0, budget_images=None, calibration_warmup=5, calibration_steps=20, methods=None,
                 seeds=[0, 1, 2], pretrain_seed=0, finetune_epochs=0, tag="", output_dir=None, data_root=None)
    config = script.bakeoff_config(argparse.Namespace(**flags))
    assert config.budget.wall_clock_s == 300.0 and config.budget.threads == 2 and config.threads == 2
    assert config.data.name == "breastmnist" and config.methods is None and config.label_fractions == [0.01, 0.1, 1]
    assert config.output_dir == Path("runs") / "method_bakeoff_breastmnist"
    images = script.bakeoff_config(argparse.Namespace(**{**flags, "budget_minutes": None, "budget_images": 51200,
                                                         "finetune_epochs": 3, "methods": ["simclr"]}))
    assert images.budget.images_seen == 51200 and images.train["threads"] == 2
    assert images.protocols.finetune.epochs == 3 and images.methods == ["simclr"]


def test_a_png_folder_with_a_caption_column_brings_in_the_image_text_methods(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = ["path,label,patient_id,caption"]
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(tmp_path / f"img{i:03d}.png")
        lines.append(f"img{i:03d}.png,{'normal' if i % 2 else 'lesion'},p{i // 2:03d},"
                     f"{'no lesion seen' if i % 2 else 'irregular hypoechoic mass'} case {i}")
    (tmp_path / "images.csv").write_text("\n".join(lines) + "\n")
    source = {"kind": "folder", "root": str(tmp_path), "csv": "images.csv", "label_columns": ["label"],
              "patient_column": "patient_id"}
    data = {"source": source, "cache_dir": str(tmp_path / "cache")}
    with_captions, _ = _selected(_config(data={**data, "source": {**source, "report_column": "caption"}}))
    assert {"simclr", "convirt", "clip"} <= with_captions
    plain, excluded = _selected(_config(data=data))
    assert "simclr" in plain and {"convirt", "clip"} <= set(excluded)


def test_plan_only_prints_the_steps_and_trains_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(bakeoff, "calibrate", lambda *_: {"images_per_s": 100.0})
    code = main(["bakeoff", str(EXAMPLE), "--plan-only", "--methods", "simclr", "--output-dir", str(tmp_path),
                 "budget={wall_clock_s: 10, threads: 1}", "train.batch_size=16", "data.n_patients=30",
                 "data.image_size=24"])
    assert code == 0
    out = capsys.readouterr().out
    assert "simclr" in out and "62 steps × batch 16 = 992 images (calibrated 100.0 img/s)" in out
    assert (tmp_path / "calibration.json").is_file()  # kept for the real run
    assert not (tmp_path / "small_cnn").exists()  # no study was run
