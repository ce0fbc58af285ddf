"""benchmarks/lightly_bar.py (issue 19 points 1, 2, 10): lightly's example gets its budget exactly as radssl's arms do,
the strong arm is what the issue says, and every number stands beside its images seen."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from support import load_benchmark_script, make_tiny_store
from torch import nn

from radssl.study.bakeoff import steps_for_images


@pytest.fixture(scope="module")
def bar():  # noqa: ANN201 - a module
    return load_benchmark_script("lightly_bar")


def _args(**changes) -> SimpleNamespace:  # noqa: ANN003
    base = {"budget_images": None, "budget_minutes": None, "threads": 2, "arm": "documented"}
    return SimpleNamespace(**{**base, **changes})


@pytest.mark.parametrize("images", [51200, 83968, 1000])
def test_an_images_budget_gives_every_arm_the_images_radssls_arms_see(bar, images) -> None:  # noqa: ANN001
    # radssl's arms: the `radssl bakeoff` config method_bakeoff.py builds from the same --budget-images (its defaults).
    method_bakeoff = load_benchmark_script("method_bakeoff")
    flags = SimpleNamespace(dataset="breastmnist", tag="", budget_minutes=None, budget_images=images, threads=2,
                            batch_size=256, backbone="resnet18", stem="standard", finetune_epochs=0, size=28,
                            data_root=None, pretrain_seed=0, output_dir=None, methods=None, calibration_warmup=5,
                            calibration_steps=20, seeds=[0, 1, 2])
    config = method_bakeoff.bakeoff_config(flags)
    radssl_images = steps_for_images(config.budget.images_seen, config.batch_size) * config.batch_size
    for arm in ("documented", "strong"):
        steps = bar.plan_steps(_args(budget_images=images, arm=arm), None)
        assert steps * bar.BATCH_SIZE == radssl_images  # 1000 → 4 steps = 1024 images on both sides
        assert steps * bar.BATCH_SIZE >= images


def test_a_wall_clock_budget_fills_the_minutes_at_the_calibrated_rate(bar) -> None:  # noqa: ANN001
    steps = bar.plan_steps(_args(budget_minutes=5, threads=2), {"images_per_s": 100.0})
    assert steps == math.floor(300 * 100.0 / 256)  # 117: never longer than stated


def test_calibration_is_the_median_rate_after_warm_up_and_needs_twenty_steps(bar, monkeypatch) -> None:  # noqa: ANN001
    # Warm-up steps are slow (worker start-up); of the timed steps one in five is slow: the median ignores them.
    durations = [5.0, 5.0] + [1.0, 1.0, 1.0, 1.0, 4.0] * 4
    ends = [sum(durations[: i + 1]) for i in range(len(durations))]
    monkeypatch.setattr(bar, "train_example", lambda *a, **k: {"step_ends_s": ends, "losses": [1.0] * len(ends)})
    monkeypatch.setattr(bar.lib, "machine", lambda **k: {})
    result = bar.calibrate(None, "documented", 0, 2, 28, warmup=2, timed=20)
    assert result["images_per_s"] == pytest.approx(256.0)
    assert result["timed_steps"] == 20
    assert result["window_images_per_s"] == pytest.approx(20 * 256 / 32.0)
    with pytest.raises(SystemExit, match="at least 20"):
        bar.calibrate(None, "documented", 0, 2, 28, warmup=2, timed=4)


def _transform_parts(transform) -> dict:  # noqa: ANN001
    parts = transform.transforms[0].transform.transforms
    crop = next(p for p in parts if type(p).__name__ == "RandomResizedCrop")
    jitter = next(p for p in parts if type(p).__name__ == "RandomApply").transforms[0]
    grey = next(p for p in parts if type(p).__name__ == "RandomGrayscale")
    blur = next(p for p in parts if type(p).__name__ == "GaussianBlur")
    return {"crop": tuple(crop.scale), "brightness": tuple(jitter.brightness), "grey": grey.p, "blur": blur.prob}


def test_the_strong_arm_is_momentum_and_milder_views_and_the_documented_arm_is_lightlys_default(bar) -> None:  # noqa: ANN001
    strong = _transform_parts(bar.build_transform("strong", 28))
    assert strong == {"crop": (0.5, 1.0), "brightness": pytest.approx((0.6, 1.4)), "grey": 0.0, "blur": 0.0}
    documented = _transform_parts(bar.build_transform("documented", 28))
    assert documented == {"crop": (0.08, 1.0), "brightness": pytest.approx((0.2, 1.8)), "grey": 0.2, "blur": 0.5}
    params = [nn.Parameter(torch.zeros(1))]
    strong_sgd = bar.build_optimizer("strong", params).defaults
    assert (strong_sgd["lr"], strong_sgd["momentum"], strong_sgd["weight_decay"]) == (0.06, 0.9, 0)
    assert bar.build_optimizer("documented", params).defaults["momentum"] == 0.0
    with pytest.raises(SystemExit, match="unknown arm"):
        bar.arm_settings("tuned")


def test_seeds_share_one_calibration_and_every_number_stands_beside_its_images_seen(bar, monkeypatch, tmp_path) -> None:  # noqa: ANN001
    store = make_tiny_store(n=96, size=16)
    calls = {"calibrate": 0, "steps": []}

    def fake_train(store_, arm, seed, steps, workers, size):  # noqa: ANN001, ANN202 - the example loop, 2 s a step
        calls["steps"].append(steps)
        torch.manual_seed(seed)
        backbone = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 8))
        return {"backbone": backbone, "losses": [1.0] * steps, "step_ends_s": [2.0 * (i + 1) for i in range(steps)],
                "pretrain_images_available": 72}

    def fake_calibrate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["calibrate"] += 1
        return {"images_per_s": 256 / 1.5}  # calibrated faster than the run goes: the run overshoots by a third

    monkeypatch.setattr(bar, "train_example", fake_train)
    monkeypatch.setattr(bar, "calibrate", fake_calibrate)
    monkeypatch.setattr(bar.lib, "load_store", lambda *a: store)
    monkeypatch.setattr(bar.lib, "machine", lambda **k: {})
    argv = ["--dataset", "tiny", "--arm", "strong", "--budget-minutes", "0.25", "--threads", "1", "--seeds", "0", "1",
            "--results-dir", str(tmp_path)]
    assert bar.main(argv) == 0
    assert calls["calibrate"] == 1 and calls["steps"] == [10, 10]  # floor(15 s · 170.7 img/s / 256) for both seeds
    runs = sorted((tmp_path / "runs" / "lightly_bar_tiny").glob("seed*_strong_0.25min1t.json"))
    assert len(runs) == 2
    run = json.loads(runs[0].read_text())
    assert run["images_seen"] == 2560 and run["settings"]["momentum"] == 0.9
    assert run["wall_clock_check"]["flagged"] and run["wall_clock_check"]["deviation"] == pytest.approx(20 / 15 - 1)
    summary = json.loads((tmp_path / "lightly_bar_tiny_strong_0.25min1t.json").read_text())["summary"]
    assert summary["wall_clock_flagged_seeds"] == [0, 1]
    cells = [cell for protocol in ("linear", "knn") for cell in summary[protocol].values()]
    assert cells and all(cell["images_seen"] == 2560 for cell in cells)
    # A later seed, in another invocation (another load): the stored calibration, so the same steps and images.
    assert bar.main([*argv[:-4], "2", "--results-dir", str(tmp_path)]) == 0
    assert calls["calibrate"] == 1 and calls["steps"] == [10, 10, 10]
