"""benchmarks/demo_time.py (issue 19, points 5 and 8): the demo's timing artefact reads its headline numbers from
the results store with the seeds + test-cases interval, bounded to [-1, 1] however few seeds there are."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from radssl.study.results_store import CellKey, ResultsStore
from radssl.study.statistics import binary_auc, seeds_and_cases_paired_test

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():  # noqa: ANN202 - a module
    spec = importlib.util.spec_from_file_location("demo_time", ROOT / "benchmarks" / "demo_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_headline_is_the_bounded_seeds_and_cases_gain_of_ssl_over_random(tmp_path: Path) -> None:
    y = np.r_[np.zeros(60), np.ones(60)].astype(int)
    skills = {"ssl": (0.3, 3.0), "random": (0.2, 0.4)}  # two seeds that disagree a lot: t(1) = 12.7
    scores = {init: [d * y + np.random.default_rng(i).normal(size=y.size) for i, d in enumerate(skill)]
              for init, skill in skills.items()}
    with ResultsStore(tmp_path / "results.sqlite") as store:
        for init, per_seed in scores.items():
            for seed, s in enumerate(per_seed):
                key = CellKey("simclr" if init == "ssl" else "none", init, "linear", 1.0, 1.0, seed, "test")
                store.record_cell("demo", key, {"auc": binary_auc(y, s)}, wall_time_s=1.0, device="cpu",
                                  versions={}, y_true=y, y_score=s)
    out = _benchmark().headline(tmp_path / "results.sqlite")
    gain = out["ssl_minus_random_auc"]["linear"]["1"]
    expected = seeds_and_cases_paired_test(y, [s.astype(np.float32) for s in scores["ssl"]],
                                           [s.astype(np.float32) for s in scores["random"]], binary_auc)
    assert gain["mean"] == round(expected.estimate, 4) and gain["seeds"] == 2
    assert gain["ci95_seeds_and_cases"] == [round(expected.low, 4), round(expected.high, 4)]
    assert -1.0 < gain["ci95_seeds_and_cases"][0] < gain["ci95_seeds_and_cases"][1] < 1.0
    assert out["cells"] == 4 and out["seeds"] == [0, 1]
    json.dumps(out)  # JSON-safe
