"""``radssl bakeoff``: which pretext task for *my* data? Every method that fits the data, at one stated budget.

A bake-off is a generator of studies. Its config names the data (any source a study reads: image folders, DICOM,
NIfTI, MedMNIST, synthetic; 2D or 3D), the shared backbone and training settings, the read-outs, label fractions and
seeds, and ONE budget. :func:`plan_bakeoff` then

1. selects the methods: every registered method whose view requirements the data meet (checked with the engine's own
   :func:`~radssl.engine.pretrain.check_pretraining`: image–text methods only when the images carry reports,
   3D-capable methods for volumes, pairings only with their metadata), or the ``methods`` list (``--methods``),
   where a method that does not fit is an error before any compute;
2. gives each method a backbone: the config's, or — for a method that insists on another family (MAE needs a ViT) —
   the first family it accepts, said in a note; methods are grouped by backbone and each group becomes one study
   with its own random-initialisation twin (same backbone spec, same seed: the pretraining runs' starting point);
3. turns the budget into steps, computed the same way for every arm:

   - ``budget: {images_seen: N}`` (the primary rule, Ericsson et al.'s and issue 19's "equal images seen"):
     ``steps = ceil(N / batch_size)`` with one ``batch_size`` for every arm, so ``steps × batch`` is equal;
   - ``budget: {wall_clock_s: T, threads: k}`` (a second, stated rule): each method's images/s is calibrated on
     this machine with ``k`` threads — ``calibration.steps`` timed steps after ``calibration.warmup_steps`` warm-up
     steps, median of the per-step rates — and ``steps = floor(T · img/s / batch_size)``. After the run, each arm's
     measured pretraining wall-clock (the run's ``run.json``) is compared with ``T`` and any arm off by more than
     ``wall_clock_tolerance`` (10 %) is flagged in the output and in ``bakeoff.json``.

:func:`run_one_bakeoff` runs each study through the study runner (:func:`radssl.study.runner.run_study`: the same checks
before compute, results store, resume, statistics and HTML report as ``radssl study``) and writes
``<output_dir>/bakeoff.json`` (atomic): per method the images seen, steps, pretraining wall-clock, img/s, peak
memory (where measured) and the headline numbers with 95 % intervals, each beside its images seen. Layout::

    <output_dir>/bakeoff.json                  the summary
    <output_dir>/calibration.json              wall-clock budgets: the measured rates (reused on resume)
    <output_dir>/<backbone>/report/report.html one study per backbone group (the page to read)

Pretraining runs (``pretraining_runs``). ``shared`` (default): each method pretrains ONCE (``seed``) and the
``seeds`` vary the label subsets and the read-outs' training — cheap, but the intervals then leave out the largest
source of variance in SSL, the pretraining run itself. ``per_seed``: every seed ``s`` is its own replicate bake-off —
the same config with ``seed = s`` (the pretraining runs AND the random twins) and ``seeds = [s]``, in
``<output_dir>/pretrain_seed<s>/`` with its own studies, bakeoff.json and reports, resumable like any bake-off. A
wall-clock budget is calibrated once (``<output_dir>/calibration.json``) and reused by every replicate, so every
replicate of a method runs the same steps. ``<output_dir>/bakeoff.json`` then pools the replicates
(:func:`radssl.study.bakeoff_replicates.combine_replicates`): one row per seed from its replicate's results store, the
same "seeds + test cases" intervals and SSL − random tests paired by seed (each replicate's own random twin), so the
pretraining run's variance is inside every interval — the project's rule "intervals include seed variance".
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError, field_validator, model_validator

from radssl.atomic import write_text_atomic
from radssl.config import (
    DataSection,
    MedMNISTData,
    ModelSection,
    PretrainConfig,
    Section,
    TrainSection,
    apply_overrides,
    format_validation_error,
    read_yaml_mapping,
)
from radssl.data.build import build_store
from radssl.engine.pretrain import check_pretraining, pretrain
from radssl.errors import ConfigError, DataError
from radssl.methods.registry import METHODS, method_class
from radssl.provenance import package_versions
from radssl.registry import did_you_mean
from radssl.study.config import ExternalTestSet, ProtocolsSection, StudyConfig
from radssl.study.plan import LABEL_FREE_FRACTION, Log, print_log
from radssl.study.report import render_report
from radssl.study.results_store import ResultsStore
from radssl.study.runner import REPORT_DIR, RESULTS_FILE, run_study
from radssl.study.statistics import seed_t_interval, seeds_and_cases_interval, seeds_and_cases_paired_test
from radssl.transfer.metrics import accuracy, binary_auc, case_mean, macro_auc

__all__ = [
    "BakeoffConfig", "BakeoffPlan", "Arm", "Budget", "load_bakeoff_config", "plan_bakeoff", "select_methods",
    "steps_for_images", "steps_for_wall_clock", "wall_clock_deviations", "run_one_bakeoff", "plan_lines",
    "calibrate", "check_calibration",
    "SUMMARY_FILE", "CellSource", "headline",
]

SUMMARY_FILE = "bakeoff.json"
CALIBRATION_FILE = "calibration.json"


# ------------------------------------------------------------------------------------------------- config
class Budget(Section):
    """ONE pretraining budget for every arm: ``images_seen`` (primary rule) or ``wall_clock_s`` with ``threads``."""

    images_seen: int | None = Field(None, gt=0, description="images every arm sees (steps × batch size)")
    wall_clock_s: float | None = Field(None, gt=0, description="measured pretraining seconds per arm")
    threads: int | None = Field(None, gt=0, description="torch threads of every arm (required with wall_clock_s)")

    @model_validator(mode="after")
    def _one_rule(self) -> "Budget":
        if (self.images_seen is None) == (self.wall_clock_s is None):
            raise ValueError("state exactly one budget: {images_seen: N} (equal images seen, the primary rule) or "
                             "{wall_clock_s: T, threads: k} (equal measured wall-clock with the same threads)")
        if self.wall_clock_s is not None and self.threads is None:
            raise ValueError("a wall-clock budget needs threads (the same torch threads for calibration and every "
                             "arm), e.g. {wall_clock_s: 300, threads: 2}")
        if self.images_seen is not None and self.threads is not None:
            raise ValueError("budget.threads belongs to a wall-clock budget; with images_seen set train.threads")
        return self

    @property
    def rule(self) -> Literal["images_seen", "wall_clock"]:
        return "images_seen" if self.images_seen is not None else "wall_clock"


class Calibration(Section):
    """How a wall-clock budget measures each method's speed: timed steps after warm-up steps at the run's own
    logging cadence (both rounded up to whole ``train.log_every`` windows), median window rate."""

    warmup_steps: int = Field(5, ge=1, description="untimed steps first (allocation, autotuning, caches)")
    steps: int = Field(20, ge=3, description="timed steps; the median window images/s sets the run's steps")


class MethodSettings(Section):
    """One method's own keys (under its radiology preset, as in a study's pretraining entry)."""

    method: dict[str, Any] = Field(default_factory=dict)
    views: dict[str, Any] = Field(default_factory=dict)
    optim: dict[str, Any] = Field(default_factory=dict)
    model: ModelSection | None = Field(None, description="default: the bake-off's model (or the family it needs)")

    @field_validator("method")
    @classmethod
    def _no_name(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "name" in value:
            raise ValueError("the method's name is the key of method_settings; leave 'name' out")
        return value


_BUDGET_TRAIN_KEYS = ("steps", "epochs", "pretrain_fraction")


class BakeoffConfig(Section):
    """Everything ``radssl bakeoff`` needs; study fields (label fractions, seeds, protocols, …) as in a study."""

    name: str = "bakeoff"
    seed: int = Field(0, description="seed of every pretraining run and of the random twins under pretraining_runs: "
                                     "shared (per_seed ignores it: replicate s uses seed s throughout)")
    pretraining_runs: Literal["shared", "per_seed"] = Field(
        "shared", description="shared: each method pretrains once (seed) and seeds vary only the label subsets and "
        "read-outs; per_seed: each seed s is its own pretraining run and random twin (seed s), a replicate bake-off "
        "in <output_dir>/pretrain_seed<s>/, pooled in bakeoff.json so the intervals include the pretraining run's "
        "variance")
    output_dir: Path = Path("runs/bakeoff")
    data: DataSection = Field(default_factory=MedMNISTData)
    external_test_sets: list[ExternalTestSet] = Field(default_factory=list)
    model: ModelSection = Field(default_factory=ModelSection)
    methods: list[str] | None = Field(None, description="null: every registered method that fits the data")
    method_settings: dict[str, MethodSettings] = Field(default_factory=dict)
    budget: Budget
    calibration: Calibration = Field(default_factory=Calibration)
    wall_clock_tolerance: float = Field(0.10, gt=0.0, lt=1.0,
                                        description="flag arms whose measured wall-clock is off the target by more")
    train: dict[str, Any] = Field(default_factory=dict,
                                  description="pretraining train section shared by every arm (no steps/epochs)")
    label_fractions: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    protocols: ProtocolsSection = Field(
        default_factory=lambda: ProtocolsSection.model_validate({"linear": {}, "knn": {}}))
    validation: Literal["full", "proportional"] = "proportional"
    validation_min_per_class: int = Field(5, gt=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    bootstrap_samples: int = Field(1000, ge=100)
    feature_batch_size: int = Field(512, gt=0)

    @field_validator("train")
    @classmethod
    def _train_section(cls, value: dict[str, Any]) -> dict[str, Any]:
        fixed = [k for k in _BUDGET_TRAIN_KEYS if k in value]
        if fixed:
            raise ValueError(f"train.{fixed[0]} is set by the budget for every arm alike; remove it")
        TrainSection.model_validate({**value, "steps": 1})  # unknown keys / bad values → errors naming them
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> "BakeoffConfig":
        for where, names in (("methods", self.methods or []), ("method_settings", list(self.method_settings))):
            for name in names:
                if name not in METHODS:
                    raise ValueError(unknown_method_message(name, where))
        if self.methods is not None and len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must not repeat, got {self.methods}")
        if self.budget.wall_clock_s is not None and self.train.get("threads") not in (None, self.budget.threads):
            raise ValueError(f"train.threads ({self.train['threads']}) differs from budget.threads "
                             f"({self.budget.threads}); a wall-clock budget runs every arm with budget.threads")
        # The study fields validate as a study would (fractions, seeds, names), before any data is read.
        StudyConfig.model_validate({**self._study_fields(), "name": self.name})
        return self

    def _study_fields(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "data": self.data.model_dump(mode="json"),
            "external_test_sets": [t.model_dump(mode="json") for t in self.external_test_sets],
            "label_fractions": self.label_fractions, "seeds": self.seeds,
            "protocols": self.protocols.model_dump(mode="json"), "validation": self.validation,
            "validation_min_per_class": self.validation_min_per_class, "device": self.device,
            "threads": self.threads, "bootstrap_samples": self.bootstrap_samples,
            "feature_batch_size": self.feature_batch_size,
        }

    @property
    def batch_size(self) -> int:
        return int(self.train.get("batch_size", TrainSection.model_fields["batch_size"].default))

    @property
    def threads(self) -> int | None:
        """Torch threads of every arm: the wall-clock budget's, else ``train.threads`` (None: torch default)."""
        return self.budget.threads if self.budget.threads is not None else self.train.get("threads")


def unknown_method_message(name: str, where: str = "methods") -> str:
    """``unknown method 'simclrr' — did you mean 'simclr'?`` plus the registered names."""
    names = sorted(METHODS)
    return f"{where}: unknown method '{name}'{did_you_mean(name, names)} (registered: {', '.join(names)})"


def load_bakeoff_config(path: Path | str | None, overrides: list[str] | None = None,
                        methods: list[str] | None = None) -> BakeoffConfig:
    """Load a bake-off YAML, apply ``key=value`` overrides and ``--methods``, validate; ConfigError naming the key."""
    source = str(path) if path else "<defaults>"
    raw = read_yaml_mapping(Path(path) if path else None, "bake-off fields")
    apply_overrides(raw, list(overrides or []))
    if methods:
        raw["methods"] = list(methods)
    try:
        return BakeoffConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source, BakeoffConfig, raw)) from None


# --------------------------------------------------------------------------------------------- budgets
def steps_for_images(images_seen: int, batch_size: int) -> int:
    """Steps that show ``images_seen`` images at ``batch_size`` (rounded up: never fewer images than stated)."""
    return max(1, math.ceil(images_seen / batch_size))


def steps_for_wall_clock(wall_clock_s: float, images_per_s: float, batch_size: int) -> int:
    """Steps that fill ``wall_clock_s`` at a measured ``images_per_s`` (rounded down: never longer than stated)."""
    if not (images_per_s > 0 and math.isfinite(images_per_s)):
        raise DataError("calibration", f"measured {images_per_s} images/s", "rerun the calibration on a quiet machine")
    return max(1, math.floor(wall_clock_s * images_per_s / batch_size))


def wall_clock_deviations(target_s: float, actual_s: dict[str, float], tolerance: float = 0.10
                          ) -> dict[str, dict[str, Any]]:
    """Per arm: measured pretraining seconds, relative deviation from ``target_s`` and whether it exceeds
    ``tolerance`` (issue 19: a calibration at one load and a run at another give unequal budgets; flag them)."""
    out = {}
    for arm, actual in actual_s.items():
        deviation = float(actual) / float(target_s) - 1.0
        out[arm] = {"target_s": float(target_s), "actual_s": float(actual), "deviation": deviation,
                    "flagged": bool(abs(deviation) > tolerance)}
    return out


# --------------------------------------------------------------------------------------------- planning
@dataclass
class Arm:
    """One method of the bake-off: its pretraining entry, backbone group and budget."""

    method: str
    group: str
    model: dict[str, Any]
    entry: dict[str, Any]
    """Raw study ``pretraining`` entry (``train.steps`` filled in by the budget)."""
    steps: int = 0
    calibration: dict[str, Any] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.entry["train"]["batch_size"])

    @property
    def images_seen(self) -> int:
        return self.steps * self.batch_size


@dataclass
class BakeoffPlan:
    """What :func:`run_one_bakeoff` runs: the arms, one StudyConfig per backbone group, and the selection's reasons."""

    config: BakeoffConfig
    arms: dict[str, Arm]
    studies: dict[str, StudyConfig]
    excluded: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _method_model(config: BakeoffConfig, method: str) -> tuple[dict[str, Any], str | None]:
    """The model section of a method: its own setting, the bake-off's, or the first family the method accepts."""
    settings = config.method_settings.get(method)
    if settings is not None and settings.model is not None:
        return settings.model.model_dump(mode="json"), None
    cls = method_class(method)
    params = (settings.method if settings else {})
    families = cls.requirements(cls.Params(**params)).backbone_families
    model = config.model.model_dump(mode="json")
    if families is not None and config.model.backbone not in families:
        note = (f"method '{method}' needs a backbone from {list(families)}: it runs on {families[0]} with its own "
                f"random-init twin ({config.model.backbone} is the others' backbone)")
        return {"backbone": families[0]}, note
    return model, None


def _entry(config: BakeoffConfig, method: str, steps: int) -> dict[str, Any]:
    settings = config.method_settings.get(method) or MethodSettings()
    train = {**config.train, "steps": int(steps)}
    if config.threads is not None:
        train["threads"] = config.threads
    entry: dict[str, Any] = {"name": method, "method": {"name": method, **settings.method}, "train": train}
    if settings.views:
        entry["views"] = dict(settings.views)
    if settings.optim:
        entry["optim"] = dict(settings.optim)
    return entry


def _pretrain_config(config: BakeoffConfig, arm: Arm, output_dir: Path, train_changes: dict[str, Any] | None = None
                     ) -> PretrainConfig:
    """The PretrainConfig the study will build for an arm (method preset merged under the arm's own keys)."""
    entry = arm.entry
    raw = {
        "seed": config.seed, "output_dir": str(output_dir), "data": config.data.model_dump(mode="json"),
        "model": arm.model, "method": dict(entry["method"]), "views": dict(entry.get("views") or {}),
        "optim": dict(entry.get("optim") or {}), "train": {**entry["train"], **(train_changes or {})},
        "eval": {"enabled": False},
    }
    try:
        return PretrainConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, f"bake-off method '{arm.method}'", PretrainConfig, raw)) \
            from None


def select_methods(config: BakeoffConfig, store: Any, log: Log = print_log) -> tuple[dict[str, Arm], dict[str, str]]:
    """(arms that fit the data, {method: why not} for those that do not), before any compute.

    Each candidate's config is checked exactly as pretraining would check it (backbone for the data, view policy
    and pairing for the metadata, method requirements for the views). A method the user listed that does not fit is
    an error; an automatically considered one is left out with its reason.
    """
    explicit = config.methods is not None
    candidates = list(config.methods) if explicit else sorted(METHODS)
    arms: dict[str, Arm] = {}
    excluded: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in candidates:
            model, note = _method_model(config, method)
            arm = Arm(method, "", model, _entry(config, method, 1))
            try:
                check_pretraining(_pretrain_config(config, arm, Path(tmp) / method), store)
            except (ConfigError, DataError) as error:
                if explicit or method in config.method_settings:
                    raise ConfigError(f"bake-off method '{method}' does not fit the data: {error}") from None
                excluded[method] = str(error)
                continue
            if note:
                log(f"radssl bakeoff: note: {note}")
            arms[method] = arm
    if not arms:
        raise DataError(store.origin or store.name, "no registered method fits these data",
                        "why each was left out: " + "; ".join(f"{m}: {r}" for m, r in excluded.items()))
    groups: dict[str, str] = {}
    for arm in arms.values():  # one group (one study, one random twin) per distinct backbone section
        key = json.dumps(arm.model, sort_keys=True)
        if key not in groups:
            base = str(arm.model.get("backbone"))
            groups[key] = base if base not in groups.values() else f"{base}-{len(groups)}"
        arm.group = groups[key]
    return arms, excluded


def _peak_memory_reset(device: str) -> None:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: writing 5 resets this process's resident-memory high-water mark (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory_mb(device: str) -> tuple[float | None, str]:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0, "process peak resident memory (VmHWM)"
    except OSError:
        pass
    return None, "unavailable"


def calibrate(config: BakeoffConfig, arm: Arm, store: Any) -> dict[str, Any]:
    """Measure an arm's images/s here: ``warmup_steps`` untimed + ``steps`` timed engine steps, median window rate.

    Runs the arm's own pretraining config (method, views, backbone, batch size, threads) through the engine in a
    temporary folder; also the peak memory of those steps where the platform reports it. The steps are timed at the
    run's own logging cadence (``train.log_every``), both counts rounded up to whole logging windows, so the loop
    timed is the loop the run runs (a logging step also reduces the method's diagnostics). Run at once after it
    (:func:`check_calibration`), four methods landed within −7 to +6 % of a 90 s budget in five of six runs; a
    calibration made long before the run misses by as much as the machine's speed moves in between (on the shared
    2-core CPU: MoCo v3 118 → 84 img/s within 90 minutes, identical runs up to 27 % apart), so every run's
    wall-clock is still checked against the budget and flagged (``benchmarks/calibration_check.py``).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / arm.method
        every = _pretrain_config(config, arm, out).train.log_every
        warmup, timed = (whole_windows(n, every) for n in (config.calibration.warmup_steps, config.calibration.steps))
        pretrain_config = _pretrain_config(config, arm, out, {
            "steps": warmup + timed, "log_every": every, "checkpoint_every": warmup + timed + 1,
            "progress_bar": False})
        device = "cuda" if pretrain_config.train.accelerator in ("cuda", "gpu") or (
            pretrain_config.train.accelerator == "auto" and _cuda()) else "cpu"
        _peak_memory_reset(device)
        started = time.perf_counter()
        pretrain(pretrain_config, store=store)
        elapsed = time.perf_counter() - started
        peak, peak_source = _peak_memory_mb(device)
        rates = timed_window_rates((out / "metrics.csv").read_text(), warmup)
    if len(rates) * every < timed:
        raise DataError("calibration", f"{arm.method}: {len(rates) * every} timed steps logged, expected {timed}")
    return {"images_per_s": float(statistics.median(rates)), "timed_steps": timed, "warmup_steps": warmup,
            "log_every": every, "rate_min": min(rates), "rate_max": max(rates), "calibration_wall_s": elapsed,
            "peak_memory_mb": peak, "peak_memory_source": peak_source, "threads": config.threads,
            "batch_size": arm.batch_size}


def check_calibration(config: BakeoffConfig, arm: Arm, store: Any) -> dict[str, Any]:
    """Calibrate an arm, then at once pretrain it for the steps that calibration gives and measure the run's
    wall-clock as the bake-off does (the engine's ``wall_time_s``): how far a calibration misses its run when no
    time passes between them. Separates a calibration that measures the wrong loop (misses now too) from a machine
    whose speed moves between calibration and run (misses only with a lag), the question issue 19 point 2 left."""
    if config.budget.wall_clock_s is None:
        raise ConfigError("check_calibration needs a wall-clock budget (budget.wall_clock_s)")
    calibration = calibrate(config, arm, store)
    steps = steps_for_wall_clock(config.budget.wall_clock_s, calibration["images_per_s"], arm.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / arm.method
        result = pretrain(_pretrain_config(config, arm, out, {"steps": steps, "progress_bar": False}), store=store)
        rates = timed_window_rates((out / "metrics.csv").read_text(), 0)
    images = steps * arm.batch_size
    deviation = wall_clock_deviations(config.budget.wall_clock_s, {arm.method: result.wall_time_s},
                                      config.wall_clock_tolerance)[arm.method]
    return {"method": arm.method, "calibrated_images_per_s": calibration["images_per_s"],
            "calibration_rate_min": calibration["rate_min"], "calibration_rate_max": calibration["rate_max"],
            "steps": steps, "images_seen": images, "run_wall_s": result.wall_time_s,
            "run_images_per_s": images / result.wall_time_s, "run_window_rates": rates,
            "deviation": deviation["deviation"], "flagged": deviation["flagged"]}


def whole_windows(steps: int, every: int) -> int:
    """``steps`` rounded up to a whole number of logging windows of ``every`` steps."""
    return -(-steps // every) * every


def timed_window_rates(metrics_csv: str, warmup: int) -> list[float]:
    """The images/s of each logged window that starts after the ``warmup`` steps (``metrics.csv`` rows)."""
    lines = metrics_csv.splitlines()
    header = lines[0].split(",")
    step_col, rate_col = header.index("step"), header.index("images_per_s")
    rows = [line.split(",") for line in lines[1:]]
    return [float(row[rate_col]) for row in rows if int(row[step_col]) > warmup]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _calibration_key(config: BakeoffConfig, arm: Arm, fingerprint: str) -> str:
    """What a stored calibration depends on: the arm's config, threads, budget, calibration rule and the data."""
    return json.dumps({"entry": {**arm.entry, "train": {k: v for k, v in arm.entry["train"].items() if k != "steps"}},
                       "model": arm.model, "threads": config.threads, "data": fingerprint,
                       "budget": config.budget.model_dump(mode="json"),
                       "calibration": config.calibration.model_dump(mode="json")}, sort_keys=True, default=str)


def _set_budget(config: BakeoffConfig, arms: dict[str, Arm], store: Any, log: Log,
                calibration_path: Path | None = None) -> None:
    """Fill every arm's steps from the one budget (calibrating under a wall-clock budget, reusing a stored
    calibration of the same settings so a resumed bake-off keeps its steps). ``calibration_path`` (default
    ``<output_dir>/calibration.json``): per-seed replicates share their parent's, so every replicate of a method
    runs the same steps (the stored key holds no seed and no output folder)."""
    budget = config.budget
    if budget.images_seen is not None:
        for arm in arms.values():
            arm.steps = steps_for_images(budget.images_seen, arm.batch_size)
    else:
        path = Path(calibration_path or Path(config.output_dir) / CALIBRATION_FILE)
        stored = json.loads(path.read_text()) if path.is_file() else {}
        fingerprint = store.fingerprint()
        for arm in arms.values():
            key = _calibration_key(config, arm, fingerprint)
            previous = stored.get(arm.method)
            if previous and previous.get("key") == key:
                arm.calibration = previous["result"]
                log(f"radssl bakeoff: {arm.method}: calibration reused from {path}")
            else:
                log(f"radssl bakeoff: calibrating {arm.method} ({config.calibration.warmup_steps} warm-up + "
                    f"{config.calibration.steps} timed steps, {config.threads} threads)")
                arm.calibration = calibrate(config, arm, store)
                stored[arm.method] = {"key": key, "result": arm.calibration}
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, json.dumps(stored, indent=2))
            arm.steps = steps_for_wall_clock(budget.wall_clock_s, arm.calibration["images_per_s"], arm.batch_size)
            log(f"radssl bakeoff: {arm.method}: {arm.calibration['images_per_s']:.1f} img/s → {arm.steps} steps")
    for arm in arms.values():
        arm.entry["train"]["steps"] = arm.steps


def study_configs(config: BakeoffConfig, arms: dict[str, Arm]) -> dict[str, StudyConfig]:
    """One StudyConfig per backbone group: a pretraining entry per method, inits ``random`` + ``ssl:<method>``."""
    out: dict[str, StudyConfig] = {}
    for group in dict.fromkeys(arm.group for arm in arms.values()):
        members = [arm for arm in arms.values() if arm.group == group]
        raw = {
            **config._study_fields(), "name": f"{config.name}-{group}",
            "output_dir": str(Path(config.output_dir) / group), "model": members[0].model,
            "pretraining": [arm.entry for arm in members],
            "initialisations": ["random"] + [f"ssl:{arm.method}" for arm in members],
        }
        try:
            out[group] = StudyConfig.model_validate(raw)
        except ValidationError as error:
            raise ConfigError(format_validation_error(error, f"bake-off study '{group}'", StudyConfig, raw)) \
                from None
    return out


def plan_bakeoff(config: BakeoffConfig, log: Log = print_log, store: Any = None,
                 calibration_path: Path | None = None) -> BakeoffPlan:
    """Select the methods, set the budget (calibrating under a wall-clock budget, stored in ``calibration_path``,
    default ``<output_dir>/calibration.json``) and build the studies."""
    if store is None:
        store = build_store(config.data)
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    arms, excluded = select_methods(config, store, log)
    for method, reason in excluded.items():
        log(f"radssl bakeoff: {method} left out: {reason}")
    _set_budget(config, arms, store, log, calibration_path)
    notes = [f"{method} left out: {reason}" for method, reason in excluded.items()]
    return BakeoffPlan(config, arms, study_configs(config, arms), excluded, notes)


def plan_lines(plan: BakeoffPlan) -> list[str]:
    """The plan in a few lines: budget, each arm's backbone, steps and images, and the methods left out."""
    lines = [f"budget: {budget_statement(plan.config)}"]
    if plan.config.pretraining_runs == "per_seed":
        lines.append(f"pretraining runs: one per seed ({len(plan.config.seeds)} replicates, seeds {plan.config.seeds}, "
                     f"each in {plan.config.output_dir}/pretrain_seed<s>/ with these steps)")
    for method, arm in plan.arms.items():
        rate = f" (calibrated {arm.calibration['images_per_s']:.1f} img/s)" if arm.calibration else ""
        lines.append(f"{method:<15} {arm.group:<14} {arm.steps} steps × batch {arm.batch_size} = "
                     f"{arm.images_seen} images{rate}")
    lines += [f"{method} left out: {reason}" for method, reason in plan.excluded.items()]
    return lines


# --------------------------------------------------------------------------------------------- headline
def _binary_column(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray | None:
    if y_true.ndim != 1 or not np.isin(np.unique(y_true), [0, 1]).all():
        return None
    if y_score.ndim == 1:
        return y_score
    if y_score.ndim == 2 and y_score.shape[1] in (1, 2):
        return y_score[:, -1]
    return None


@dataclass(frozen=True)
class CellSource:
    """Where headline rows come from: one study in one results store, read at ``seeds`` only.

    A store can hold extra seeds from an earlier, wider run of the same output folder, and a per-seed replicate
    contributes only the seed it was pretrained with; label-free cells (fraction 0) carry the pretraining seed.
    """

    results_path: Path
    study: str
    seeds: tuple[int, ...]
    pretrain_seed: int


def _source_rows(results: ResultsStore, source: CellSource) -> list[dict[str, Any]]:
    """The source's primary-metric cells of full pretraining at its seeds, each knowing the store it came from
    (so one headline row can pool cells of several stores: per-seed replicates)."""
    out = []
    for r in results.cells(source.study):
        if r["metric"] != r["primary_metric"] or r["value"] is None or r["pretrain_fraction"] != 1.0:
            continue
        label_free = float(r["label_fraction"]) == LABEL_FREE_FRACTION
        wanted = r["seed"] == source.pretrain_seed if label_free else r["seed"] in source.seeds
        if wanted:
            out.append({**r, "_results": results, "_study": source.study})
    return out


def _case_outputs(rows: list[dict[str, Any]]) -> tuple[np.ndarray, list[np.ndarray], Any] | None:
    """(y_true, per-seed scores or values, metric function) when every seed stored the same cases, else None."""
    metric = rows[0]["metric"]
    if all(r["has_case_values"] for r in rows):
        values = [r["_results"].case_values(r["_study"], r["cell_key"])[metric] for r in rows]
        if len({len(v) for v in values}) != 1:
            return None
        return np.zeros(len(values[0]), dtype=np.int64), [np.asarray(v, dtype=np.float64) for v in values], case_mean
    if not all(r["has_predictions"] for r in rows):
        return None
    stored = [r["_results"].predictions(r["_study"], r["cell_key"]) for r in rows]
    y_true = stored[0].y_true
    if any(p is None or p.y_true.shape != y_true.shape or not np.array_equal(p.y_true, y_true) for p in stored):
        return None
    binary = [_binary_column(y_true, p.y_score) for p in stored]
    if metric in ("auc", "macro_auc", "roc_auc", "auroc"):
        if all(b is not None for b in binary):
            return y_true, [np.asarray(b, dtype=np.float64) for b in binary], binary_auc
        return y_true, [p.y_score for p in stored], macro_auc
    if metric == "accuracy":
        return y_true, [p.y_score for p in stored], accuracy
    return None


def _interval(rows: list[dict[str, Any]], n_boot: int) -> dict[str, Any]:
    """Mean over seeds with the study's interval: over seeds and test cases where per-case outputs exist."""
    values = [float(r["value"]) for r in rows]
    out: dict[str, Any] = {"mean": float(np.mean(values)), "low": None, "high": None, "n_seeds": len(rows),
                           "interval": "none", "per_seed": [{"seed": r["seed"], "value": v}
                                                            for r, v in zip(rows, values, strict=True)]}
    outputs = _case_outputs(rows)
    if outputs is not None:
        try:
            r = seeds_and_cases_interval(outputs[0], outputs[1], outputs[2], n_boot=n_boot, seed=0)
            return {**out, "mean": r.estimate, "low": r.low, "high": r.high,
                    "interval": "seeds + test cases" if r.seeds_included else "test cases only (1 seed)"}
        except (DataError, ValueError) as error:
            out["note"] = f"seeds + test cases interval skipped: {error}"
    if len(values) >= 2:
        mean, low, high, _, _ = seed_t_interval(values)
        return {**out, "mean": mean, "low": low, "high": high, "interval": "seeds only"}
    if len(rows) == 1 and rows[0]["ci_low"] is not None:
        return {**out, "low": rows[0]["ci_low"], "high": rows[0]["ci_high"], "interval": "test cases only (1 seed)"}
    return out


def _gain(ssl: list[dict[str, Any]], random: list[dict[str, Any]], n_boot: int) -> dict[str, Any] | None:
    """SSL − random paired by seed (same label subset; per-seed replicates: the replicate's own random twin),
    tested over seeds and test cases as the report does."""
    by_seed = {r["seed"]: r for r in random}
    pairs = [(a, by_seed[a["seed"]]) for a in sorted(ssl, key=lambda r: r["seed"]) if a["seed"] in by_seed]
    if not pairs:
        return None
    differences = [float(a["value"]) - float(b["value"]) for a, b in pairs]
    out: dict[str, Any] = {"mean": float(np.mean(differences)), "low": None, "high": None, "p_value": None,
                           "n_seeds": len(pairs), "interval": "none"}
    outputs = _case_outputs([a for a, _ in pairs] + [b for _, b in pairs])
    if outputs is not None:
        y_true, scores, metric = outputs
        try:
            r = seeds_and_cases_paired_test(y_true, scores[:len(pairs)], scores[len(pairs):], metric, n_boot=n_boot,
                                            seed=0)
            return {**out, "mean": r.estimate, "low": r.low, "high": r.high, "p_value": r.p_value,
                    "interval": "seeds + test cases" if r.seeds_included else "test cases only (1 seed)"}
        except (DataError, ValueError) as error:
            out["note"] = f"seeds + test cases test skipped: {error}"
    if len(differences) >= 2:
        mean, low, high, p, _ = seed_t_interval(differences)
        return {**out, "mean": mean, "low": low, "high": high, "p_value": p, "interval": "seeds only"}
    return out


def _grouped_rows(sources: Sequence[CellSource], stack: ExitStack
                  ) -> dict[tuple[str, str, str, str, float], list[dict[str, Any]]]:
    """Rows of every source by (init, method, protocol, test set, fraction); a seed twice in one group is an error
    (pairing by seed would be ambiguous)."""
    grouped: dict[tuple[str, str, str, str, float], list[dict[str, Any]]] = {}
    for source in sources:
        results = stack.enter_context(ResultsStore(source.results_path))
        for r in _source_rows(results, source):
            key = (r["init"], r["pretrain"], r["protocol"], r["test_set"], float(r["label_fraction"]))
            if any(other["seed"] == r["seed"] for other in grouped.get(key, [])):
                raise DataError(str(source.results_path), f"seed {r['seed']} of {key} comes from two sources",
                                "give each replicate its own pretraining seed")
            grouped.setdefault(key, []).append(r)
    return grouped


def headline(sources: Sequence[CellSource], arms: dict[str, dict[str, Any]], n_boot: int = 1000
             ) -> list[dict[str, Any]]:
    """Per method × protocol × test set × label fraction: SSL and its random twin (mean, 95 % interval) and the
    paired gain, each row beside the arm's images seen. Computed from one study's results store (``shared``) or
    pooled from several (per-seed replicates, one seed each) with the study's own statistics
    (:mod:`radssl.study.statistics`), reading only each source's seeds."""
    rows_out: list[dict[str, Any]] = []
    with ExitStack() as stack:
        grouped = _grouped_rows(sources, stack)
        for (init, method, protocol, test_set, fraction), ssl_rows in sorted(grouped.items()):
            if init != "ssl" or method not in arms:
                continue
            ssl_rows = sorted(ssl_rows, key=lambda r: r["seed"])
            random_rows = sorted(next((v for (i, _, p, t, f), v in grouped.items()
                                       if i == "random" and p == protocol and t == test_set and f == fraction), []),
                                 key=lambda r: r["seed"])
            rows_out.append({
                "method": method, "protocol": protocol, "test_set": test_set, "label_fraction": fraction,
                "metric": ssl_rows[0]["metric"], "images_seen": arms[method]["images_seen"],
                "ssl": _interval(ssl_rows, n_boot),
                "random": _interval(random_rows, n_boot) if random_rows else None,
                "gain_over_random": _gain(ssl_rows, random_rows, n_boot) if random_rows else None,
            })
    return rows_out


# --------------------------------------------------------------------------------------------- running
def _run_record(checkpoint: str | None) -> dict[str, Any]:
    """The engine's ``run.json`` of a pretraining run (beside its ``checkpoints/`` folder), or {}."""
    if not checkpoint:
        return {}
    path = Path(checkpoint).parent.parent / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def budget_statement(config: BakeoffConfig) -> str:
    budget = config.budget
    if budget.images_seen is not None:
        return (f"equal images seen: {budget.images_seen} per arm (steps = ceil(images / batch {config.batch_size}), "
                f"the same for every arm)")
    return (f"equal measured wall-clock: {budget.wall_clock_s:g} s of pretraining per arm with {budget.threads} "
            f"threads (steps from each method's median img/s over {config.calibration.steps} timed steps after "
            f"{config.calibration.warmup_steps} warm-up steps; arms off by > {config.wall_clock_tolerance:.0%} are "
            f"flagged)")


def summarise(plan: BakeoffPlan, study_dirs: dict[str, Path]) -> dict[str, Any]:
    """The ``bakeoff.json`` record of a finished bake-off (read from each study's results store and run.json)."""
    config = plan.config
    arms: dict[str, dict[str, Any]] = {}
    for group, study in plan.studies.items():
        with ResultsStore(study_dirs[group] / RESULTS_FILE) as results:
            runs = {r["run_name"]: r for r in results.pretrain_runs(study.name)}
        for arm in (a for a in plan.arms.values() if a.group == group):
            run = runs.get(arm.method, {})
            record = _run_record(run.get("checkpoint"))
            wall = record.get("wall_time_s", run.get("wall_time_s"))
            images = int(record["steps"] * record["global_batch_size"]) if record else run.get("images_seen")
            calibration = arm.calibration or {}
            arms[arm.method] = {
                "backbone": arm.model.get("backbone"), "study": study.name, "group": group,
                "batch_size": arm.batch_size, "steps": arm.steps, "images_seen": images,
                "planned_images_seen": arm.images_seen, "pretrain_wall_s": wall,
                "images_per_s": (images / wall) if images and wall else None,
                "calibrated_images_per_s": calibration.get("images_per_s"),
                "peak_memory_mb": calibration.get("peak_memory_mb"),
                "peak_memory_source": calibration.get("peak_memory_source",
                                                      "not measured (measured in a wall-clock budget's calibration)"),
                "final_loss": record.get("final_loss"), "device": record.get("device", run.get("device")),
                "threads": config.threads, "calibration": arm.calibration,
            }
    flags: list[str] = []
    deviations: dict[str, Any] = {}
    if config.budget.wall_clock_s is not None:
        measured = {m: a["pretrain_wall_s"] for m, a in arms.items() if a["pretrain_wall_s"] is not None}
        deviations = wall_clock_deviations(config.budget.wall_clock_s, measured, config.wall_clock_tolerance)
        for method, d in deviations.items():
            arms[method]["wall_clock_deviation"] = d["deviation"]
            arms[method]["wall_clock_flagged"] = d["flagged"]
            if d["flagged"]:
                flags.append(f"{method}: pretraining took {d['actual_s']:.1f} s against a {d['target_s']:g} s budget "
                             f"({d['deviation']:+.1%}, beyond ±{config.wall_clock_tolerance:.0%}): its budget was not "
                             "equal — rerun it on a quieter machine or compare at equal images seen")
    seen = {m: a["images_seen"] for m, a in arms.items() if a["images_seen"] is not None}
    for method, images in seen.items():
        if images != arms[method]["planned_images_seen"]:  # e.g. several devices: the global batch grew
            flags.append(f"{method}: saw {images} images, planned {arms[method]['planned_images_seen']} "
                         "(steps × batch × devices): set train.devices: 1 or read the budget per device")
    if config.budget.images_seen is not None and len(set(seen.values())) > 1:
        flags.append(f"images seen differ between arms: {seen}")
    rows: list[dict[str, Any]] = []
    for group, study in plan.studies.items():
        members = {m: a for m, a in arms.items() if a["group"] == group}
        source = CellSource(study_dirs[group] / RESULTS_FILE, study.name, tuple(config.seeds), config.seed)
        rows += headline([source], members, config.bootstrap_samples)
    return {
        "name": config.name, "seed": config.seed, "seeds": list(config.seeds), "pretraining_runs": "shared",
        "budget": config.budget.model_dump(mode="json", exclude_none=True),
        "budget_statement": budget_statement(config),
        "selection": {"methods": list(plan.arms), "excluded": plan.excluded,
                      "rule": "listed methods" if config.methods is not None else "every registered method that "
                      "fits the data (view requirements checked against the data before compute)"},
        "seeds_note": f"each method pretrains once (seed {config.seed}); seeds {config.seeds} vary the label subsets "
                      "and the read-outs' training, as in a study",
        "arms": arms, "wall_clock": deviations, "flags": flags, "headline": rows,
        "reports": {group: str(study_dirs[group] / REPORT_DIR / "report.html") for group in plan.studies},
        "studies": {group: str(study_dirs[group]) for group in plan.studies},
        "notes": plan.notes, "versions": package_versions(), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def report_notes(summary: dict[str, Any], group: str) -> list[str]:
    """What a group's study report states about the bake-off: the budget, each arm's images and time, flags."""
    notes = [f"bake-off '{summary['name']}': {summary['budget_statement']}"]
    for method, arm in summary["arms"].items():
        if arm["group"] != group:
            continue
        wall = arm["pretrain_wall_s"]
        notes.append(f"bake-off arm {method} ({arm['backbone']}): {arm['steps']} steps × batch {arm['batch_size']} = "
                     f"{arm['images_seen']} images seen" + (f", {wall:.0f} s of pretraining" if wall else "")
                     + (f", calibrated {arm['calibrated_images_per_s']:.1f} img/s"
                        if arm["calibrated_images_per_s"] else ""))
    notes += [f"bake-off: {reason}" for reason in summary["notes"]]
    notes += [f"bake-off FLAG: {flag}" for flag in summary["flags"]]
    return notes


def run_one_bakeoff(config: BakeoffConfig, log: Log = print_log, store: Any = None,
                    calibration_path: Path | None = None) -> Path:
    """Plan, run every study (resumable) and write ``<output_dir>/bakeoff.json``; returns its path. Each method
    pretrains once (``config.seed``), whatever ``pretraining_runs`` says: the entry point that honours
    ``pretraining_runs: per_seed`` is :func:`radssl.study.bakeoff_replicates.run_bakeoff`, which builds on this one.

    Each study's report is rendered again with the bake-off's budget, arms and flags among its notes, so the page
    says what every arm was given and whether it got it. ``calibration_path``: see :func:`plan_bakeoff`.
    """
    plan = plan_bakeoff(config, log, store, calibration_path)
    log(f"radssl bakeoff '{config.name}': {len(plan.arms)} methods ({', '.join(plan.arms)}) in "
        f"{len(plan.studies)} stud{'y' if len(plan.studies) == 1 else 'ies'}; budget: {budget_statement(config)}")
    study_dirs = {group: Path(run_study(study, log=log)) for group, study in plan.studies.items()}
    summary = summarise(plan, study_dirs)
    for group, study in plan.studies.items():
        with ResultsStore(study_dirs[group] / RESULTS_FILE) as results:
            notes = [n for n in results.study_notes(study.name) if not n.startswith("bake-off")]
            results.save_study_notes(study.name, notes + report_notes(summary, group))
            render_report(results, study.name, study_dirs[group] / REPORT_DIR)
    path = Path(config.output_dir) / SUMMARY_FILE
    write_text_atomic(path, json.dumps(summary, indent=2, default=float))
    for method, arm in summary["arms"].items():
        wall = arm["pretrain_wall_s"]
        log(f"radssl bakeoff: {method:<15} {arm['backbone']:<12} {arm['steps']} steps × {arm['batch_size']} = "
            f"{arm['images_seen']} images, {wall:.0f} s" if wall is not None else f"radssl bakeoff: {method}")
    for flag in summary["flags"]:
        log(f"radssl bakeoff: FLAG: {flag}")
    return path
