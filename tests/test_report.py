"""Tests of the self-contained HTML study report (and, when Chromium is installed, how a browser renders it)."""

from __future__ import annotations

import base64
import csv
import io
import math
import os
import re
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from radssl.study.report import render_report
from radssl.study.results_store import CellKey, ResultsStore
from radssl.study.statistics import (
    accuracy,
    binary_auc,
    bootstrap_ci,
    delong_seed_averaged,
    seed_t_interval,
    seeds_and_cases_interval,
    seeds_and_cases_paired_test,
)

STUDY = "synthetic"
INITS = {"random": ("none", 0.2), "ssl": ("simclr", 0.9)}  # init -> (pretraining run, skill)
FRACTIONS = (0.05, 0.25, 1.0)
SEEDS = (0, 1)
TEST_SETS = {"test": 240, "site_b": 160}


def _scores(init: str, fraction: float, seed: int, test_set: str, pretrain_fraction: float = 1.0) -> np.ndarray:
    y = _labels(test_set)
    skill = INITS[init][1] + 0.6 * math.log10(fraction * 100) - (0.3 if test_set != "test" else 0.0)
    skill -= 0.4 * (1.0 - pretrain_fraction)
    rng = np.random.default_rng([list(INITS).index(init), FRACTIONS.index(fraction), seed,
                                 list(TEST_SETS).index(test_set), int(pretrain_fraction * 10)])
    return 1 / (1 + np.exp(-(skill * y + rng.normal(size=y.size) - 0.5 * skill)))


def _labels(test_set: str) -> np.ndarray:
    return np.random.default_rng(list(TEST_SETS).index(test_set) + 100).integers(0, 2, TEST_SETS[test_set])


def _record(store: ResultsStore, init: str, fraction: float, seed: int, test_set: str, pf: float = 1.0) -> None:
    y, s = _labels(test_set), _scores(init, fraction, seed, test_set, pf)
    auc = bootstrap_ci(y, s, binary_auc, n_boot=100, seed=seed)
    key = CellKey(INITS[init][0], init, "finetune", fraction, pf, seed, test_set)
    store.record_cell(STUDY, key, {"auc": auc, "accuracy": accuracy(y, s)}, wall_time_s=30.0 + 300 * fraction,
                      device="cpu", versions={"radssl": "0.1.0"}, y_true=y, y_score=s)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ResultsStore]:
    root = tmp_path_factory.mktemp("report")
    store = ResultsStore(root / "results.sqlite")
    store.save_study_config(STUDY, {"label_fractions": list(FRACTIONS), "seeds": list(SEEDS),
                                    "marker": "config-marker-7f3a"})
    store.record_pretrain_run(STUDY, "simclr", "runs/simclr.ckpt", 3600.0, "cpu", images_seen=720_000)
    for init in INITS:
        for fraction in FRACTIONS:
            for seed in SEEDS:
                for test_set in TEST_SETS:
                    _record(store, init, fraction, seed, test_set)
                if init == "ssl":  # a half-size pretraining set: must stay out of the main curves
                    _record(store, init, fraction, seed, "test", pf=0.5)
    path = render_report(store, STUDY, root / "out")
    return path, store


class _TagBalance(HTMLParser):
    """Counts container tags left open (a cheap well-formedness check of the generated page)."""

    TAGS = {"section", "table", "thead", "tbody", "tr", "td", "th", "div", "figure", "ul", "li", "pre", "details",
            "header", "main", "nav", "span", "p", "small", "strong"}

    def __init__(self) -> None:
        super().__init__()
        self.open: dict[str, int] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.TAGS:
            self.open[tag] = self.open.get(tag, 0) + 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.TAGS:
            self.open[tag] = self.open.get(tag, 0) - 1
            if self.open[tag] == 0:
                del self.open[tag]


def _mean_auc(init: str, fraction: float, test_set: str) -> float:
    return float(np.mean([roc_auc_score(_labels(test_set), _scores(init, fraction, s, test_set)) for s in SEEDS]))


def test_report_is_self_contained_with_figures_and_tables(report: tuple[Path, ResultsStore]) -> None:
    path, store = report
    page = path.read_text()
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 3  # curves, gain over random, pretraining-set size
    for encoded in images:
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert image.format == "PNG" and image.width > 400 and image.height > 200
    assert page.count("<table") >= 5
    assert "<tbody><tr>" in page
    # Nothing is fetched from elsewhere: every src/href is inline data or an in-page anchor.
    assert not re.findall(r'(?:src|href)="(?!data:|#)', page)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert "config-marker-7f3a" in page and "<pre" in page
    assert "p<0" not in page  # "<" in text is escaped
    parser = _TagBalance()
    parser.feed(page)
    assert parser.open == {}, f"unbalanced tags: {parser.open}"
    assert not list(path.parent.glob(".*.tmp"))

    with (path.parent / "results.csv").open() as stream:
        assert len(list(csv.DictReader(stream))) == len(store.cells(STUDY))


def test_headline_numbers_come_from_the_data(report: tuple[Path, ResultsStore]) -> None:
    page = report[0].read_text()
    headline = page[page.index('id="summary"'):page.index('id="curves"')]
    gain = _mean_auc("ssl", 0.05, "test") - _mean_auc("random", 0.05, "test")
    assert gain > 0.05
    assert f"+{gain:.3f} AUC" in headline
    # The gain's CI and p cover seeds and test cases; DeLong (test cases only) is shown, labelled as such.
    y = _labels("test")
    both = seeds_and_cases_paired_test(y, [_scores("ssl", 0.05, s, "test") for s in SEEDS],
                                       [_scores("random", 0.05, s, "test") for s in SEEDS], binary_auc)
    delong = delong_seed_averaged(y, [_scores("ssl", 0.05, s, "test") for s in SEEDS],
                                  [_scores("random", 0.05, s, "test") for s in SEEDS])
    assert f"95% CI {both.low:+.3f} to {both.high:+.3f} over seeds + test cases".replace("-", "−") in headline
    verb = "beats" if both.low > 0 else "is not distinguishable from"
    assert f"SSL</strong> {verb} Random" in headline
    assert delong.p_value < 0.001 and "DeLong on the test cases alone p&lt;0.001" in headline
    assert f"{len(SEEDS)} paired seeds" in headline
    # Internal -> external change of each init at 5% labels.
    for init, name in (("random", "Random"), ("ssl", "SSL")):
        change = _mean_auc(init, 0.05, "site_b") - _mean_auc(init, 0.05, "test")
        assert f"{name} {change:+.3f}".replace("-", "−") in headline


def test_curve_points_show_every_interval_with_what_it_covers(report: tuple[Path, ResultsStore]) -> None:
    page = report[0].read_text()
    curves = page[page.index('id="curves"'):page.index('id="gain-random"')]
    y = _labels("test")
    scores = [_scores("ssl", 0.05, s, "test") for s in SEEDS]
    both = seeds_and_cases_interval(y, scores, binary_auc)
    _, seed_low, seed_high, _, _ = seed_t_interval([binary_auc(y, s) for s in scores], bounds=(0.0, 1.0))
    per_seed = [bootstrap_ci(y, s, binary_auc, n_boot=100, seed=seed) for seed, s in zip(SEEDS, scores, strict=True)]
    row = curves[curves.index("<td>test</td><td>SSL</td><td>fine-tune</td><td>5%</td>"):]
    row = row[:row.index("</tr>")]
    assert f"{both.low:.3f} – {both.high:.3f}<br><small>seeds + test cases</small>" in row
    assert f"{seed_low:.3f} – {seed_high:.3f}" in row
    low, high = np.mean([c[1] for c in per_seed]), np.mean([c[2] for c in per_seed])
    assert f"{low:.3f} – {high:.3f}" in row
    assert "bands: 95% interval over seeds and test cases" in curves
    methods = page[page.index('id="methods"'):page.index('id="curves"')]
    for covers in ("holds the test set fixed", "holds each trained model fixed", "conditions on the trained models",
                   "conditions on the test set"):
        assert covers in methods


def test_old_results_state_the_rules_they_were_computed_with(tmp_path: Path) -> None:
    """A store written before the budget/validation/LR rules existed opens and says what those cells did."""
    with ResultsStore(tmp_path / "old.sqlite") as store:
        store.save_study_config("old", {"seeds": [0, 1], "protocols": {"finetune": {
            "epochs": 8, "batch_size": 128, "lr": 0.001, "backbone_lr_scale": 0.1, "random_backbone_lr_scale": 1.0,
            "early_stopping_patience": 10}}})
        for init in INITS:
            for seed in SEEDS:
                y, s = _labels("test"), _scores(init, 0.05, seed, "test")
                store.record_cell("old", CellKey(INITS[init][0], init, "finetune", 0.05, 1.0, seed, "test"),
                                  {"auc": bootstrap_ci(y, s, binary_auc, n_boot=100)}, wall_time_s=1.0,
                                  device="cpu", versions={}, y_true=y, y_score=s)
        page = render_report(store, "old", tmp_path / "out").read_text()
    methods = page[page.index('id="methods"'):page.index('id="curves"')]
    assert "grows with the label fraction" in methods and "rule not recorded" in methods
    assert "different per initialisation" in methods and "random init used 1.0×" in methods
    assert "<strong>full</strong>" in methods and "always used the full split" in methods


def test_label_fraction_matching_the_supervised_baseline(report: tuple[Path, ResultsStore]) -> None:
    page = report[0].read_text()
    section = page[page.index('id="matching"'):page.index('id="pretrain-size"')]
    baseline = _mean_auc("random", 1.0, "test")
    curve = [(f, _mean_auc("ssl", f, "test")) for f in FRACTIONS]
    (f0, v0), (f1, v1) = next((a, b) for a, b in zip(curve[:-1], curve[1:], strict=True) if a[1] < baseline <= b[1])
    expected = 10 ** (math.log10(f0) + (baseline - v0) / (v1 - v0) * (math.log10(f1) - math.log10(f0)))
    assert f"≈{100 * expected:.2g}%" in section
    assert f"{baseline:.3f}" in section


def test_missing_imagenet_is_skipped_with_a_note(report: tuple[Path, ResultsStore]) -> None:
    page = report[0].read_text()
    section = page[page.index('id="gain-imagenet"'):page.index('id="generalisation"')]
    assert 'class="note"' in section and "no “imagenet” initialisation" in section
    assert "<img" not in section


def test_empty_study_renders_a_placeholder(tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "r.sqlite") as store:
        path = render_report(store, "nothing-yet", tmp_path / "out")
    page = path.read_text()
    assert "No finished cells" in page and "No configuration was saved" in page
    assert (tmp_path / "out" / "results.csv").read_text().startswith("study,cell_key,")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


NEEDS_CHROMIUM = pytest.mark.skipif(
    _chromium() is None and not _in_ci(),
    reason="no Chromium binary on PATH (apt-get install chromium to run this); under CI=true this fails instead")
"""Outside CI a missing browser skips the rendering checks; in CI (.ci/run installs Chromium) it fails them."""


def _run_chromium(binary: str, args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium in its own process group so a hang never leaves helpers behind."""
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"headless Chromium did not finish within 120 s: {' '.join(command)}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@NEEDS_CHROMIUM
def test_report_renders_in_headless_chromium(report: tuple[Path, ResultsStore], tmp_path: Path) -> None:
    binary = _chromium()
    assert binary is not None, "CI=true but no Chromium on PATH: the browser rendering checks cannot run"
    url = report[0].resolve().as_uri()
    dom = _run_chromium(binary, ["--dump-dom", url], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(re.findall(r"<img[^>]+src=\"data:image/png;base64,", dom.stdout)) >= 3
    assert dom.stdout.count("<table") >= 5
    assert "Labels needed to match full supervision" in dom.stdout

    shot = tmp_path / "report.png"
    result = _run_chromium(binary, [f"--screenshot={shot}", "--window-size=1280,2400", url],
                           tmp_path / "profile-shot")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (2400, 1280)
    assert shot.stat().st_size > 50_000  # a blank page compresses to a few kB
    assert pixels.std() > 20  # text, plots and the header band, not a uniform page
    colours = {tuple(c) for c in pixels[::8, ::8].reshape(-1, 3).astype(int)}
    assert len(colours) > 200  # anti-aliased plots and text produce many distinct colours
    keep = os.environ.get("RADSSL_KEEP_SCREENSHOT")
    if keep:  # lets a developer look at the rendering
        shutil.copy(shot, keep)


# ------------------------------------------------------------------------------------- segmentation + zero-shot
SEG = "segmentation"
SEG_CASES = 30


def _dice(init: str, fraction: float, seed: int, test_set: str) -> dict[str, np.ndarray]:
    """Per-case Dice of two foreground classes (and their mean), HD95 with an undefined case."""
    rng = np.random.default_rng([list(INITS).index(init), FRACTIONS.index(fraction), seed,
                                 list(TEST_SETS).index(test_set), 7])
    level = 0.45 + (0.15 if init == "ssl" else 0.0) + 0.1 * math.log10(fraction * 100)
    organ = np.clip(level + 0.05 + rng.normal(0, 0.08, SEG_CASES), 0, 1)
    finding = np.clip(level - 0.1 + rng.normal(0, 0.12, SEG_CASES), 0, 1)
    hd95 = np.abs(rng.normal(8 - 4 * level, 1.0, SEG_CASES))
    hd95[3] = np.nan  # both prediction and reference empty: undefined for this case
    return {"dice": (organ + finding) / 2, "dice_organ": organ, "dice_finding": finding, "hd95": hd95}


@pytest.fixture(scope="module")
def seg_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ResultsStore]:
    from radssl.study.statistics import case_mean

    root = tmp_path_factory.mktemp("seg")
    store = ResultsStore(root / "results.sqlite")
    store.save_study_config(SEG, {"seeds": list(SEEDS), "protocols": {"segmentation_finetune": {"epochs": 3}}})
    store.save_study_notes(SEG, ["data: no patient ids: splits per image, patients may leak"])
    for init in INITS:
        for fraction in FRACTIONS:
            for seed in SEEDS:
                for test_set in TEST_SETS:
                    values = _dice(init, fraction, seed, test_set)
                    metrics = {name: bootstrap_ci(np.zeros(SEG_CASES), v, case_mean, n_boot=100, stratified=False)
                               for name, v in values.items()}
                    key = CellKey(INITS[init][0], init, "segmentation_finetune", fraction, 1.0, seed, test_set)
                    store.record_cell(SEG, key, metrics, wall_time_s=5.0, device="cpu", versions={},
                                      primary_metric="dice", case_values=values)
    for test_set in TEST_SETS:  # a label-free protocol: one cell per encoder and test set at label fraction 0
        y, s = _labels(test_set), _scores("ssl", 0.25, 0, test_set)
        store.record_cell(SEG, CellKey("convirt", "ssl", "zero_shot", 0.0, 1.0, 0, test_set),
                          {"auc": bootstrap_ci(y, s, binary_auc, n_boot=100)}, wall_time_s=1.0, device="cpu",
                          versions={}, y_true=y, y_score=s)
    return render_report(store, SEG, root / "out"), store


def test_segmentation_report_follows_dice_with_wilcoxon_and_seeds_plus_cases(
        seg_report: tuple[Path, ResultsStore]) -> None:
    from radssl.study.statistics import case_mean, wilcoxon_paired

    path, _ = seg_report
    page = path.read_text()
    parser = _TagBalance()
    parser.feed(page)
    assert parser.open == {}
    assert "Dice / AUC" in page or "AUC / Dice" in page  # the header names both protocols' metrics
    headline = page[page.index('id="summary"'):page.index('id="curves"')]
    side_a = [_dice("ssl", 0.05, s, "test")["dice"] for s in SEEDS]
    side_b = [_dice("random", 0.05, s, "test")["dice"] for s in SEEDS]
    both = seeds_and_cases_paired_test(np.zeros(SEG_CASES), side_a, side_b, case_mean, bounds=(0.0, 1.0))  # Dice
    wilcoxon = wilcoxon_paired(side_a, side_b)
    assert f"{both.estimate:+.3f} Dice".replace("-", "−") in headline
    assert f"95% CI {both.low:+.3f} to {both.high:+.3f} over seeds + test cases".replace("-", "−") in headline
    assert "Wilcoxon signed-rank on the test cases alone" in headline
    p_text = "p&lt;0.001" if wilcoxon.p_value < 0.001 else (
        f"p={wilcoxon.p_value:.3f}" if wilcoxon.p_value < 0.1 else f"p={wilcoxon.p_value:.2f}")
    assert f"Wilcoxon signed-rank on the test cases alone {p_text}" in headline
    # The label-free protocol: one value per encoder, its interval over test cases, no label fraction.
    y, s = _labels("test"), _scores("ssl", 0.25, 0, "test")
    # Two SSL encoders (simclr, convirt) share the init "ssl", so the report names their runs.
    assert ("Zero-shot without any training label (internal test set, AUC): SSL (convirt) "
            f"<strong>{binary_auc(y, s):.3f}") in headline
    curves = page[page.index('id="curves"'):page.index('id="secondary"')]
    assert "<td>test</td><td>SSL (convirt)</td><td>zero-shot</td><td>no labels</td><td>AUC</td>" in curves
    assert "<td>test</td><td>SSL (simclr)</td><td>segmentation (fine-tuned)</td><td>5%</td><td>Dice</td>" in curves
    assert "Dashed horizontal lines: label-free protocols" in curves
    matching = page[page.index('id="matching"'):page.index('id="cost"')]
    assert "zero-shot" not in matching, "a label-free line has no label fraction to match"


def test_segmentation_report_lists_per_class_dice_and_hd95_and_the_data_notes(
        seg_report: tuple[Path, ResultsStore]) -> None:
    from radssl.study.statistics import case_mean

    page = seg_report[0].read_text()
    section = page[page.index('id="secondary"'):page.index('id="gain-random"')]
    assert "Dice (organ)" in section and "Dice (finding)" in section and "HD95" in section
    hd95 = [_dice("ssl", 1.0, s, "site_b")["hd95"] for s in SEEDS]
    mean = float(np.mean([case_mean(None, v) for v in hd95]))  # the undefined case is left out
    assert np.isnan(hd95[0][3]) and f"{mean:.3f}<br>" in section
    # The stated rule is segmentation_metrics': one empty mask → the image diagonal; both empty → left out.
    assert "only one of prediction and reference empty — scores the image diagonal" in section
    assert "both are empty are undefined and left out" in section
    assert "no patient ids: splits per image, patients may leak" in page[:page.index('id="summary"')]


@NEEDS_CHROMIUM
def test_segmentation_report_renders_in_headless_chromium(seg_report: tuple[Path, ResultsStore],
                                                          tmp_path: Path) -> None:
    binary = _chromium()
    assert binary is not None, "CI=true but no Chromium on PATH: the browser rendering checks cannot run"
    dom = _run_chromium(binary, ["--dump-dom", seg_report[0].resolve().as_uri()], tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(re.findall(r"<img[^>]+src=\"data:image/png;base64,", dom.stdout)) >= 2
    assert "Per-class Dice and HD95" in dom.stdout and "Wilcoxon signed-rank" in dom.stdout
