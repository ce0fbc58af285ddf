"""The study's analysis on its own: numbers and verdicts from a results store, no HTML anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from radssl.study import analysis as study_analysis
from radssl.study.analysis import (
    SEEDS_AND_CASES,
    Line,
    Predictions,
    analyse,
    baseline_matches,
    compute_bands,
    gains_over,
    verdict,
)
from radssl.study.results_store import CellKey, ResultsStore
from radssl.study.statistics import binary_auc, bootstrap_ci, seeds_and_cases_paired_test

STUDY = "analysis"
SEEDS = (0, 1, 2)
FRACTIONS = (0.1, 1.0)
SKILL = {"random": 0.3, "ssl": 1.2}


def _labels() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 2, 200)


def _scores(init: str, fraction: float, seed: int) -> np.ndarray:
    y = _labels()
    rng = np.random.default_rng([list(SKILL).index(init), FRACTIONS.index(fraction), seed])
    skill = SKILL[init] + fraction
    return skill * y + rng.normal(size=y.size)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ResultsStore:
    results = ResultsStore(tmp_path_factory.mktemp("analysis") / "results.sqlite")
    y = _labels()
    for init, pretrain in (("random", "none"), ("ssl", "simclr")):
        for fraction in FRACTIONS:
            for seed in SEEDS:
                s = _scores(init, fraction, seed)
                key = CellKey(pretrain, init, "linear", fraction, 1.0, seed, "test")
                results.record_cell(STUDY, key, {"auc": bootstrap_ci(y, s, binary_auc, n_boot=50, seed=seed)},
                                    wall_time_s=1.0, device="cpu", versions={}, y_true=y, y_score=s)
    return results


def test_gains_and_verdicts_are_numbers_from_the_cells(store: ResultsStore) -> None:
    found = analyse(store, STUDY, None)
    predictions = Predictions(store, STUDY)
    compute_bands(found, predictions)
    ssl, random = Line("ssl", "simclr", "linear"), Line("random", "none", "linear")
    assert found.lines == [random, ssl] and found.fractions == list(FRACTIONS) and found.seeds == list(SEEDS)
    gains = gains_over(found, predictions, "random", [ssl])
    assert [(g.treatment, g.baseline, g.label_fraction) for g in gains] == [(ssl, random, f) for f in FRACTIONS]
    y = _labels()
    for gain in gains:
        expected = seeds_and_cases_paired_test(y, [_scores("ssl", gain.label_fraction, s) for s in SEEDS],
                                               [_scores("random", gain.label_fraction, s) for s in SEEDS],
                                               binary_auc, n_boot=study_analysis.N_BOOT, seed=0)
        assert gain.difference == pytest.approx(expected.estimate)
        assert (gain.ci_low, gain.ci_high) == pytest.approx((expected.low, expected.high))
        assert gain.method == SEEDS_AND_CASES and gain.n_paired == len(SEEDS)
        assert verdict(gain) == ("beats" if expected.low > 0 else "trails" if expected.high < 0
                                 else "is not distinguishable from")
    assert verdict(gains[0]) == "beats"  # SSL's skill is far above random's at every fraction
    band = found.bands[(ssl, "test", 1.0)]
    assert band.low <= band.mean <= band.high and band.method == SEEDS_AND_CASES


def test_no_supervised_baseline_without_finetune_or_random_full_labels(store: ResultsStore) -> None:
    found = analyse(store, STUDY, None)
    matches = baseline_matches(found)
    # Random linear probe at 100 % is the baseline for the SSL linear curve (no fine-tuning in this study).
    fraction, value, base = matches[(Line("ssl", "simclr", "linear"), "test")]
    assert base == Line("random", "none", "linear")
    assert fraction == pytest.approx(FRACTIONS[0])  # SSL starts above the baseline: its smallest fraction
    assert 0.5 < value < 1.0


def test_analysis_imports_no_presentation_module() -> None:
    """analysis.py computes; formatting, figures, pages and report present. The arrow must not point back."""
    tree = ast.parse(Path(study_analysis.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    presentation = {f"radssl.study.{m}" for m in ("formatting", "figures", "pages", "report")}
    assert not imported & presentation
    assert not {m for m in imported if m.startswith(("matplotlib", "jinja2", "html"))}
