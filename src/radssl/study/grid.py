"""The study grid runner: every {pretraining × init × label fraction × seed × protocol × test set} cell, resumable.

How a study runs (``run_study``):
1. :func:`prepare_study` loads the data once and checks everything that could fail later — splits, classes in
   every test set, each label fraction of each seed, batch sizes, weights files — *before any compute*.
2. Label-fraction subsets (nested, stratified, per seed) are written to ``subsets/seed{n}.json``.
3. Encoders are evaluated one after another. An SSL encoder's pretraining run happens once and is shared by all
   its cells; a run whose ``final.pt`` exists and that the results store knows is never touched again.
4. Frozen features (linear probe, kNN) are extracted once per (backbone weights, data) through the
   :class:`~radssl.transfer.features.FeatureCache` (also on disk, so a resumed study reuses them).
5. Each finished cell is committed at once (metrics with bootstrap CIs, per-case predictions, wall time, device,
   versions), so a killed study loses at most the cells in flight; rerunning skips every committed cell.
6. The HTML report is rendered into ``<output_dir>/report/``.

Fairness choices (stated in the report's configuration section too):
- ``random`` is the pretraining runs' own starting point: the backbone built under ``torch.manual_seed(seed)``
  exactly as the pretraining engine builds it, so "SSL vs random" isolates what pretraining changed.
- A cell's ``seed`` varies the label subset and the read-out's training randomness; every encoder is fixed across
  seeds (pretraining runs once), so seed spread measures label-sampling and head-training noise alike for all inits.
- Model selection (probe C, fine-tuning epoch and backbone LR scale) uses the study's ``validation`` rule:
  ``proportional`` (default) draws the same label fraction of the validation split per seed (stratified, nested,
  patient-grouped, with a per-class floor); ``full`` uses the whole split for every fraction.
- Fine-tuning gets the same optimiser-step budget at every label fraction (``steps_per_epoch: full``) and the same
  backbone-LR rule for every initialisation (one value, or the best of a candidate list on validation).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from radssl.atomic import write_text_atomic
from radssl.config import PretrainConfig, apply_overrides, dump_config, format_validation_error
from radssl.data.store import ImageStore
from radssl.errors import ConfigError, DataError
from radssl.study.config import (
    INTERNAL_TEST_SET,
    NO_PRETRAINING,
    InitSpec,
    StudyConfig,
    apply_named_override,
    checkpoint_run_name,
    legacy_study_settings,
    load_study_config,
)
from radssl.study.results_store import CellKey, ResultsStore

__all__ = ["Encoder", "PretrainJob", "StudyPlan", "prepare_study", "run_study"]

RESULTS_FILE = "results.sqlite"
REPORT_DIR = "report"
Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class PretrainJob:
    """One SSL pretraining run of the study: a ``pretraining`` entry at one pretraining fraction.

    ``from_imagenet`` marks the ``imagenet+ssl`` variant (pretraining continued from ImageNet weights).
    """

    run: str
    pretrain_fraction: float
    from_imagenet: bool = False

    @property
    def run_name(self) -> str:
        """Name in the results store's ``pretrain_runs`` table and of the run folder."""
        name = f"imagenet+{self.run}" if self.from_imagenet else self.run
        return name if self.pretrain_fraction == 1.0 else f"{name}@pf{self.pretrain_fraction:g}"

    def directory(self, output_dir: Path) -> Path:
        return Path(output_dir) / "pretraining" / self.run_name

    def checkpoint(self, output_dir: Path) -> Path:
        from radssl.engine.checkpoint import FINAL

        return self.directory(output_dir) / "checkpoints" / FINAL


@dataclass(frozen=True)
class Encoder:
    """One initialised backbone the grid reads out: the (init, pretrain, pretrain_fraction) part of a cell key."""

    init: str
    pretrain: str
    pretrain_fraction: float
    spec: InitSpec
    job: PretrainJob | None = None
    checkpoint: Path | None = None
    """An existing SSL checkpoint (``ssl:<file.pt>``), when the encoder comes from outside the study."""

    @property
    def label(self) -> str:
        """Readable name for progress lines: ``random``, ``ssl(simclr)``, ``ssl(simclr, pf=0.25)``."""
        if self.pretrain == NO_PRETRAINING:
            return self.init
        fraction = "" if self.pretrain_fraction == 1.0 else f", pf={self.pretrain_fraction:g}"
        return f"{self.init}({self.pretrain}{fraction})"


@dataclass
class StudyPlan:
    """Everything :func:`run_study` needs, built and validated by :func:`prepare_study` before any training."""

    config: StudyConfig
    store: ImageStore
    train_rows: np.ndarray
    val_rows: np.ndarray
    test_sets: dict[str, tuple[ImageStore, np.ndarray]]
    subsets: dict[int, dict[float, np.ndarray]]
    jobs: list[PretrainJob]
    encoders: list[Encoder]
    pretrain_configs: dict[PretrainJob, PretrainConfig]
    notes: list[str] = field(default_factory=list)
    val_subsets: dict[int, dict[float, np.ndarray]] = field(default_factory=dict)
    """Proportional validation rows per seed and label fraction (empty: every cell uses ``val_rows``)."""

    def validation_rows(self, seed: int, fraction: float) -> np.ndarray:
        """The validation rows that select a cell's model (see the study's ``validation`` rule)."""
        if self.config.validation == "proportional":
            return self.val_subsets[seed][fraction]
        return self.val_rows

    def finetune_steps_per_epoch(self, subset_rows: int) -> int:
        """Optimiser steps per fine-tuning epoch under the protocol's budget rule (see FinetuneProtocol)."""
        options = self.config.protocols.finetune
        assert options is not None
        rule = options.steps_per_epoch
        one_pass = _one_pass_steps(subset_rows, options.batch_size)
        if rule == "subset":
            return one_pass
        if rule == "full":  # the 100 % fraction's steps, for every fraction
            return _one_pass_steps(len(self.train_rows), options.batch_size)
        return int(rule)

    def cell_keys(self) -> list[CellKey]:
        """Every cell of the grid, in the order they run."""
        keys = []
        for encoder in self.encoders:
            for protocol in self.config.protocols.enabled():
                for seed in self.config.seeds:
                    for fraction in self.config.label_fractions:
                        keys += [_cell_key(encoder, protocol, fraction, seed, name) for name in self.test_sets]
        return keys


def _one_pass_steps(rows: int, batch_size: int) -> int:
    """Steps of one pass over ``rows`` images, as :func:`radssl.transfer.finetune.finetune` counts them."""
    return max(1, rows // batch_size + (1 if rows % batch_size >= 2 else 0))


def _cell_key(encoder: Encoder, protocol: str, fraction: float, seed: int, test_set: str) -> CellKey:
    return CellKey(encoder.pretrain, encoder.init, protocol, fraction, encoder.pretrain_fraction, seed, test_set)


def _where(store: ImageStore) -> str:
    return store.origin or store.name


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was requested but no CUDA device is available — use device: auto or cpu")
    return torch.device(name)


def _check_split_labels(store: ImageStore, train_rows: np.ndarray, splits: dict[str, np.ndarray]) -> None:
    """Each evaluated split holds labels on every row and only classes seen in training; then AUC is defined.

    Coverage is checked first for all splits: "class 2 is in the test set but not in training" is the message
    that points at the real problem, before "AUC is undefined on the validation set".
    """
    from radssl.transfer.metrics import check_auc_defined, check_classes_covered

    train_y = store.labels[torch.from_numpy(train_rows)].numpy()
    labels = {what: store.labels[torch.from_numpy(rows)].numpy() for what, rows in splits.items()}
    for what, y in labels.items():
        if (y < 0).any():
            raise DataError(what, f"{int((y < 0).sum())} rows have no label (-1)",
                            "a test or validation set needs a label on every row")
        check_classes_covered(store.task, train_y, y, what)
    for what, y in labels.items():
        check_auc_defined(store.task, y, what)


def _external_store(config: StudyConfig, index: int, internal: ImageStore, train_y: np.ndarray) -> ImageStore:
    """Load one external test set, all rows as ``test``, and check it fits the internal task and images."""
    from radssl.data.build import build_store
    from radssl.transfer.metrics import check_auc_defined, check_classes_covered

    entry = config.external_test_sets[index]
    field_name = f"external_test_sets[{index}] ('{entry.name}')"
    store = build_store(entry.data)
    where = f"{_where(store)} [{field_name}]"
    if (store.task.kind, store.task.num_classes) != (internal.task.kind, internal.task.num_classes):
        raise DataError(where, f"its task is {store.task.kind} with {store.task.num_classes} classes but the study "
                        f"data's is {internal.task.kind} with {internal.task.num_classes}",
                        "use a test set of the same diagnostic task")
    if store.channels != internal.channels or store.image_shape != internal.image_shape:
        raise DataError(where, f"images are {store.channels}×{'×'.join(map(str, store.image_shape))} but the study "
                        f"data's are {internal.channels}×{'×'.join(map(str, internal.image_shape))}",
                        "load the external set at the same size and channels (e.g. data.size / image_size)")
    labels = store.labels.numpy()
    if (labels < 0).any():
        raise DataError(where, f"{int((labels < 0).sum())} rows have no label (-1)", "every test row needs a label")
    check_classes_covered(store.task, train_y, labels, where)
    check_auc_defined(store.task, labels, where)
    return replace(store, name=entry.name, split=np.full(len(store), "test", dtype="<U10"), _fingerprint=None)


def _pretrain_config(config: StudyConfig, job: PretrainJob) -> PretrainConfig:
    """The :class:`PretrainConfig` of one job: the study's seed, data and model + the entry's sections."""
    run = config.pretraining_run(job.run)
    model = (run.model or config.model).model_dump(mode="json")
    if job.from_imagenet:
        # ImageNet weights fit only the ImageNet stem (see radssl.transfer.initialisation).
        model["small_input"] = False
    raw = {
        "seed": config.seed,
        "output_dir": str(job.directory(config.output_dir)),
        "data": config.data.model_dump(mode="json"),
        "model": model,
        "method": run.method.model_dump(mode="json"),
        "views": run.views.model_dump(mode="json"),
        "optim": run.optim.model_dump(mode="json"),
        "train": {**run.train.model_dump(mode="json"), "pretrain_fraction": job.pretrain_fraction},
        "eval": {"enabled": False},
    }
    from pydantic import ValidationError

    try:
        return PretrainConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, f"pretraining '{job.run}'", PretrainConfig, raw)) from None


def _encoders(config: StudyConfig) -> tuple[list[Encoder], list[PretrainJob]]:
    names = {run.name for run in config.pretraining}
    encoders: list[Encoder] = []
    jobs: list[PretrainJob] = []
    for spec in config.init_specs():
        if spec.kind in ("random", "imagenet"):
            encoders.append(Encoder(spec.kind, NO_PRETRAINING, 1.0, spec))
        elif spec.kind == "ssl" and spec.target not in names:
            encoders.append(Encoder("ssl", checkpoint_run_name(str(spec.target)), 1.0, spec,
                                    checkpoint=Path(str(spec.target))))
        else:
            for fraction in config.pretrain_fractions:
                job = PretrainJob(str(spec.target), fraction, from_imagenet=spec.kind == "imagenet+ssl")
                jobs.append(job)
                encoders.append(Encoder(spec.kind, str(spec.target), fraction, spec, job=job))
    order = {"random": 0, "imagenet": 1, "ssl": 2, "imagenet+ssl": 3}  # cheap encoders first: early results
    encoders.sort(key=lambda e: order[e.init])
    return encoders, jobs


def _check_weights(config: StudyConfig, store: ImageStore, plan_configs: dict[PretrainJob, PretrainConfig],
                   encoders: list[Encoder]) -> None:
    """Every weights file exists and fits its backbone (a quick load; still no training)."""
    from radssl.transfer.initialisation import initialise_backbone

    for encoder in encoders:
        if encoder.init in ("imagenet", "imagenet+ssl"):
            path = config.imagenet_file(encoder.spec)
            field_name = "imagenet_weights" if encoder.spec.target is None or encoder.init != "imagenet" \
                else f"initialisations ('{encoder.spec.text}')"
            if path is None or not path.is_file():
                raise ConfigError(
                    f"{path}: ImageNet weights file not found (study field {field_name}) — download torchvision's "
                    f"{config.model.backbone} ImageNet weights on a networked machine (see radssl.transfer."
                    f"initialisation.try_download_imagenet_weights) and point {field_name} at the .pth file"
                    + ("" if config.require_imagenet else ", or set imagenet_weights: null to skip ImageNet inits")
                )
            backbone_name = config.model.backbone
            if encoder.job is not None:
                backbone_name = plan_configs[encoder.job].model.backbone
            initialise_backbone(f"imagenet:{path}", backbone_name, in_channels=store.channels, small_input=None)
        if encoder.checkpoint is not None:
            if not encoder.checkpoint.is_file():
                raise ConfigError(f"{encoder.checkpoint}: SSL checkpoint not found (initialisations "
                                  f"'{encoder.spec.text}') — check the path, or add a pretraining entry instead")
            initialise_backbone(f"ssl:{encoder.checkpoint}", None, in_channels=store.channels,
                                image_size=max(store.image_shape))


def prepare_study(config: StudyConfig, log: Log = _print) -> StudyPlan:
    """Load the data and validate the whole grid; raises ConfigError/DataError naming the file and field.

    Nothing is trained here: stores are built, label-fraction subsets drawn, pretraining configs validated
    (including whether the data fill a batch) and weights files opened.
    """
    from radssl.data.build import build_store
    from radssl.data.splits import label_fraction_subsets
    from radssl.engine.pretrain import check_pretraining, plan_steps, pretrain_rows

    store = build_store(config.data)
    where = _where(store)
    if store.task.kind not in ("binary", "multiclass"):
        raise DataError(where, f"task kind '{store.task.kind}' is not supported by the study grid",
                        "use a binary or multiclass dataset (multilabel studies are not implemented yet)")
    if store.spatial_dims != 2:
        raise DataError(where, f"holds {store.spatial_dims}D volumes; the study grid's backbones and protocols are 2D",
                        "use 2D images (e.g. slices) for a label-efficiency study")
    train_rows, val_rows, test_rows = (store.indices(s) for s in ("train", "val", "test"))
    for split, rows in (("train", train_rows), ("val", val_rows), ("test", test_rows)):
        if len(rows) == 0:
            raise DataError(where, f"the '{split}' split is empty (study field data)",
                            "a study needs train (label fractions), val (model selection) and test splits")
    train_y = store.labels[torch.from_numpy(train_rows)].numpy()
    if (train_y < 0).any():
        raise DataError(where, f"{int((train_y < 0).sum())} training rows have no label",
                        "mark unlabelled images as split 'unlabelled' (they are still used for pretraining)")
    _check_split_labels(store, train_rows, {f"{where} [test split]": test_rows,
                                            f"{where} [validation split]": val_rows})
    test_sets: dict[str, tuple[ImageStore, np.ndarray]] = {INTERNAL_TEST_SET: (store, test_rows)}
    for index in range(len(config.external_test_sets)):
        external = _external_store(config, index, store, train_y)
        test_sets[config.external_test_sets[index].name] = (external, np.arange(len(external)))

    labels = store.labels.numpy()
    subsets: dict[int, dict[float, np.ndarray]] = {}
    for seed in config.seeds:
        drawn = label_fraction_subsets(labels, train_rows, config.label_fractions, seed, store.patient_id,
                                       source=f"{where} [label_fractions, seed {seed}]")
        for fraction, rows in drawn.items():
            present = set(np.unique(labels[rows]).tolist())
            missing = sorted(set(np.unique(train_y).tolist()) - present)
            if missing:
                raise DataError(f"{where} [label_fractions, seed {seed}]",
                                f"label fraction {fraction:g} leaves class(es) {missing} with no example",
                                "raise the smallest label fraction")
            if config.protocols.finetune is not None and len(rows) < 2:
                raise DataError(f"{where} [label_fractions, seed {seed}]",
                                f"label fraction {fraction:g} keeps {len(rows)} image(s); fine-tuning needs ≥ 2",
                                "raise the smallest label fraction")
        subsets[seed] = drawn
    val_subsets = _validation_subsets(config, store, val_rows, train_y)

    encoders, jobs = _encoders(config)
    pretrain_configs: dict[PretrainJob, PretrainConfig] = {}
    for job in jobs:
        pretrain_config = _pretrain_config(config, job)
        index = [r.name for r in config.pretraining].index(job.run)
        rows = pretrain_rows(store, job.pretrain_fraction, pretrain_config.seed)
        plan_steps(pretrain_config, len(rows), 1, f"{where} [pretraining[{index}] '{job.run}', "
                   f"pretrain_fraction {job.pretrain_fraction:g}]")
        check_pretraining(pretrain_config, store)  # backbone × policy × method fit, before any compute
        pretrain_configs[job] = pretrain_config
    _check_weights(config, store, pretrain_configs, encoders)

    notes = []
    dropped = config.dropped_initialisations()
    if dropped:
        notes.append(f"initialisations {dropped} skipped: imagenet_weights is not set (require_imagenet: false)")
    used = {job.run for job in jobs}
    unused = [run.name for run in config.pretraining if run.name not in used]
    if unused:
        notes.append(f"pretraining runs {unused} are not used by any initialisation and will not run")
    for note in notes:
        log(f"radssl study: note: {note}")
    return StudyPlan(config, store, train_rows, val_rows, test_sets, subsets, jobs, encoders, pretrain_configs, notes,
                     val_subsets)


def _validation_subsets(config: StudyConfig, store: ImageStore, val_rows: np.ndarray,
                        train_y: np.ndarray) -> dict[int, dict[float, np.ndarray]]:
    """Proportional validation: per seed, nested stratified patient-grouped subsets with a per-class floor.

    Drawn with :func:`radssl.data.splits.label_fraction_subsets` like the training subsets, from an independent
    stream of the same seed (``[seed, 1]``); each is checked to define an AUC before any compute.
    """
    from radssl.data.splits import label_fraction_subsets
    from radssl.transfer.metrics import check_auc_defined

    if config.validation != "proportional":
        return {}
    where = _where(store)
    labels = store.labels.numpy()
    out: dict[int, dict[float, np.ndarray]] = {}
    for seed in config.seeds:
        source = f"{where} [validation: proportional, seed {seed}]"
        drawn = label_fraction_subsets(labels, val_rows, config.label_fractions, [seed, 1], store.patient_id,
                                       source=source, min_rows_per_class=config.validation_min_per_class)
        for fraction, rows in drawn.items():
            try:
                check_auc_defined(store.task, labels[rows], source)
            except DataError as error:
                raise DataError(source, f"label fraction {fraction:g} keeps {len(rows)} validation images: "
                                f"{error.problem}",
                                "raise validation_min_per_class, or set validation: full") from None
        out[seed] = drawn
    return out


# ------------------------------------------------------------------------------------- study config changes
_FIXED_FIELDS = ("seed", "data", "model", "bootstrap_samples", "imagenet_weights", "validation",
                 "validation_min_per_class")
"""Fields whose change would make existing cells incomparable with new ones (axes may grow freely)."""

def _check_compatible(stored: dict[str, Any] | None, current: dict[str, Any], where: Path) -> None:
    """Refuse to resume a study whose result-defining settings changed; growing the grid is fine.

    A config stored by an older radssl is read with :func:`~radssl.study.config.legacy_study_settings`, so a
    study whose cells were computed under other fine-tuning or validation rules is refused rather than mixed with
    new cells.
    """
    if stored is None:
        return
    stored = legacy_study_settings(stored)
    changed = [name for name in _FIXED_FIELDS if stored.get(name) != current.get(name)
               and not (name == "validation_min_per_class" and current.get("validation") != "proportional")]
    for name in ("protocols",):
        old, new = stored.get(name) or {}, current.get(name) or {}
        changed += [f"{name}.{k}" for k in new if old.get(k) is not None and new[k] is not None and old[k] != new[k]]
    for name in ("pretraining", "external_test_sets"):
        old = {entry["name"]: entry for entry in stored.get(name) or []}
        changed += [f"{name}['{e['name']}']" for e in current.get(name) or [] if e["name"] in old
                    and old[e["name"]] != e]
    if changed:
        raise ConfigError(
            f"{where}: this study already holds results computed with different settings for {changed} — "
            "results would not be comparable: use a new study name or output_dir (or delete the old results); "
            "adding seeds, label fractions, initialisations, protocols, test sets or pretraining runs is fine"
        )


# ------------------------------------------------------------------------------------------- pretraining
def _run_pretraining(plan: StudyPlan, results: ResultsStore, job: PretrainJob, log: Log) -> Path:
    """Run (or resume, or skip) one pretraining job; record its cost from what the engine returns."""
    from radssl.engine.pretrain import pretrain

    config = plan.config
    checkpoint = job.checkpoint(config.output_dir)
    if checkpoint.is_file() and results.is_pretrain_done(config.name, job.run_name):
        return checkpoint
    pretrain_config = plan.pretrain_configs[job]
    initial, source = None, ""
    if job.from_imagenet:
        from radssl.transfer.initialisation import initialise_backbone

        weights = config.imagenet_file(InitSpec("imagenet+ssl", job.run))
        initial = initialise_backbone(f"imagenet:{weights}", pretrain_config.model.backbone,
                                      in_channels=plan.store.channels, small_input=None)
        source = f"imagenet:{weights}"
        log(f"radssl study: pretraining '{job.run_name}' starts from the ImageNet weights {weights}")
    log(f"radssl study: pretraining '{job.run_name}' ({pretrain_config.method.name}, "
        f"{pretrain_config.model.backbone}) → {job.directory(config.output_dir)}")
    result = pretrain(pretrain_config, store=plan.store, initial_backbone=initial, initial_backbone_source=source)
    results.record_pretrain_run(
        config.name, job.run_name, result.checkpoint, wall_time_s=result.wall_time_s,
        device=str(result.run_record["device"]), images_seen=result.images_seen,
        config=pretrain_config.to_dict(), device_hours=result.device_hours,
    )
    log(f"radssl study: pretraining '{job.run_name}' done in {result.wall_time_s:.0f} s")
    return result.checkpoint


# ------------------------------------------------------------------------------------------------- cells
def _backbone(plan: StudyPlan, encoder: Encoder) -> nn.Module:
    from radssl.transfer.initialisation import initialise_backbone

    config, store = plan.config, plan.store
    if encoder.init == "random":
        # Same spec and seed as the pretraining engine: random = the SSL runs' starting point.
        spec = config.model.spec_for(store.channels, store.image_shape)
        return initialise_backbone("random", backbone_spec=spec, seed=config.seed)
    if encoder.init == "imagenet":
        return initialise_backbone(f"imagenet:{config.imagenet_file(encoder.spec)}", config.model.backbone,
                                   store.channels, small_input=None)
    path = encoder.checkpoint or encoder.job.checkpoint(config.output_dir)  # type: ignore[union-attr]
    return initialise_backbone(f"ssl:{path}", None, store.channels)


class _Features:
    """Frozen features of one backbone on the internal store and each external test set, extracted lazily once."""

    def __init__(self, plan: StudyPlan, backbone: nn.Module, cache_dir: Path, device: torch.device) -> None:
        from radssl.transfer.features import FeatureCache

        self.plan, self.backbone, self.device = plan, backbone, device
        self.cache = FeatureCache(cache_dir)  # one per encoder: memory is freed when the encoder is done
        self._by_store: dict[int, torch.Tensor] = {}
        self.pending_time = 0.0

    def of(self, store: ImageStore) -> torch.Tensor:
        key = id(store)
        if key not in self._by_store:
            start = time.perf_counter()
            self._by_store[key] = self.cache.features(self.backbone, store, self.plan.config.feature_batch_size,
                                                      self.device)
            self.pending_time += time.perf_counter() - start
        return self._by_store[key]

    def take_time(self) -> float:
        """Extraction time not yet charged to a cell (charged to the first cells that needed the features)."""
        spent, self.pending_time = self.pending_time, 0.0
        return spent


@dataclass
class _Outcome:
    scores: dict[str, np.ndarray]
    extra: dict[str, float]
    balanced_accuracy: dict[str, float]
    wall_time_s: float


def _run_protocol(plan: StudyPlan, encoder: Encoder, backbone: nn.Module, features: _Features, protocol: str,
                  rows: np.ndarray, seed: int, test_names: list[str], device: torch.device,
                  val_rows: np.ndarray | None = None) -> _Outcome:
    from radssl.engine.pretrain import derived_seed

    config, store = plan.config, plan.store
    options = config.protocols.enabled()[protocol]
    labels = store.labels
    val_rows = plan.val_rows if val_rows is None else val_rows
    start = time.perf_counter()
    if protocol in ("linear", "knn"):
        internal = features.of(store)
        tests = {}
        for name in test_names:
            test_store, test_rows = plan.test_sets[name]
            feats = internal if test_store is store else features.of(test_store)
            index = torch.from_numpy(test_rows)
            tests[name] = (feats[index], test_store.labels[index])
        train_index, val_index = torch.from_numpy(rows), torch.from_numpy(val_rows)
        start = time.perf_counter()
        if protocol == "linear":
            from radssl.transfer.linear_probe import linear_probe

            result = linear_probe(internal[train_index], labels[train_index], internal[val_index], labels[val_index],
                                  tests, store.task, Cs=options.Cs, seed=seed, max_iter=options.max_iter)
            extra = {"val_auc": result.val_metric, "selected_C": result.best_C}
        else:
            from radssl.transfer.knn import knn_evaluate

            result = knn_evaluate(internal[train_index], labels[train_index], tests, store.task, k=options.k,
                                  temperature=options.temperature, device=device)
            extra = {"k": float(min(options.k, len(rows)))}
        scores, metrics = result.scores, result.metrics
    else:
        from radssl.transfer.finetune import finetune

        # Equal budgets: exactly this many steps per epoch at every fraction ("subset": the legacy one pass).
        steps_per_epoch = None if options.steps_per_epoch == "subset" else plan.finetune_steps_per_epoch(len(rows))
        result = None
        for scale in options.backbone_lr_scale:  # same candidates and rule for every initialisation
            candidate = finetune(
                backbone, store, rows, val_rows, {n: plan.test_sets[n] for n in test_names}, task=store.task,
                epochs=options.epochs, batch_size=options.batch_size, lr=options.lr, backbone_lr_scale=scale,
                weight_decay=options.weight_decay, early_stopping_patience=options.early_stopping_patience,
                augment=options.augment, hflip=options.hflip, class_balanced=options.class_balanced,
                seed=derived_seed(config.seed, seed, 31), device=device, precision=options.precision,
                steps_per_epoch=steps_per_epoch, min_epochs=options.early_stopping_floor,
            )
            if result is None or candidate.val_metric > result[1].val_metric:  # ties keep the earlier candidate
                result = (scale, candidate)
        assert result is not None
        scale, chosen = result
        scores, metrics = chosen.scores, chosen.metrics
        extra = {"val_auc": chosen.val_metric, "best_epoch": float(chosen.best_epoch),
                 "epochs_run": float(chosen.epochs_run), "backbone_lr_scale": float(scale),
                 "steps_per_epoch": float(chosen.steps_per_epoch), "finetune_steps": float(chosen.steps_run),
                 "finetune_budget_steps": float(options.epochs * chosen.steps_per_epoch)}
    if protocol != "knn":  # kNN selects nothing on validation
        extra["val_images"] = float(len(val_rows))
    wall = time.perf_counter() - start + features.take_time()
    balanced = {name: float(metrics[name].get("balanced_accuracy", math.nan)) for name in test_names}
    return _Outcome(scores, extra, balanced, wall)


def _cell_metrics(task_kind: str, y_true: np.ndarray, y_score: np.ndarray, n_boot: int) -> dict[str, Any]:
    """AUC and accuracy with percentile-bootstrap 95% CIs over test cases (same resamples for every cell)."""
    from radssl.study.statistics import accuracy, binary_auc, bootstrap_ci, macro_auc

    auc = binary_auc if task_kind == "binary" else macro_auc
    return {
        "auc": bootstrap_ci(y_true, y_score, auc, n_boot=n_boot, seed=0),
        "accuracy": bootstrap_ci(y_true, y_score, accuracy, n_boot=n_boot, seed=0),
    }


def _run_cells(plan: StudyPlan, results: ResultsStore, encoder: Encoder, device: torch.device, log: Log,
               progress: list[int]) -> None:
    """Every missing cell of one encoder; each committed as soon as its protocol run finishes."""
    from radssl.provenance import device_description, package_versions

    config = plan.config
    done = results.done_keys(config.name)
    work = []
    for protocol in config.protocols.enabled():
        for seed in config.seeds:
            for fraction in config.label_fractions:
                missing = [n for n in plan.test_sets
                           if _cell_key(encoder, protocol, fraction, seed, n).key not in done]
                if missing:
                    work.append((protocol, seed, fraction, missing))
                else:
                    progress[0] += len(plan.test_sets)
    if not work:
        return
    backbone = _backbone(plan, encoder)
    features = _Features(plan, backbone, Path(config.output_dir) / "features", device)
    versions = package_versions()
    device_name = device_description(device)
    for protocol, seed, fraction, missing in work:
        rows = plan.subsets[seed][fraction]
        outcome = _run_protocol(plan, encoder, backbone, features, protocol, rows, seed, missing, device,
                                plan.validation_rows(seed, fraction))
        shares = outcome.wall_time_s / len(missing)  # one protocol run scores all its test sets
        summary = []
        for name in missing:
            test_store, test_rows = plan.test_sets[name]
            y_true = test_store.labels[torch.from_numpy(test_rows)].numpy()
            y_score = np.asarray(outcome.scores[name], dtype=np.float64)
            metrics = _cell_metrics(test_store.task.kind, y_true, y_score, config.bootstrap_samples)
            metrics["balanced_accuracy"] = outcome.balanced_accuracy[name]
            metrics["train_images"] = float(len(rows))
            metrics.update(outcome.extra)
            key = _cell_key(encoder, protocol, fraction, seed, name)
            results.record_cell(config.name, key, metrics, wall_time_s=shares, device=device_name,
                                versions=versions, y_true=y_true, y_score=y_score)
            summary.append(f"{name} AUC {metrics['auc'][0]:.3f}")
        progress[0] += len(plan.test_sets)
        log(f"[{progress[0]}/{progress[1]}] {encoder.label} {protocol} labels={fraction:g} seed={seed}: "
            f"{', '.join(summary)} ({outcome.wall_time_s:.1f} s)")


# -------------------------------------------------------------------------------------------------- main
def _load(config: StudyConfig | str | Path, overrides: list[str] | None) -> StudyConfig:
    if not isinstance(config, StudyConfig):
        return load_study_config(Path(config), overrides)
    if not overrides:
        return config
    raw = config.to_dict()
    plain = [text for text in overrides if not apply_named_override(raw, text)]
    apply_overrides(raw, plain)
    from pydantic import ValidationError

    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, f"study '{config.name}'", StudyConfig, raw)) from None


def _save_subsets(plan: StudyPlan, directory: Path) -> None:
    from radssl.data.splits import save_subsets

    fingerprint = plan.store.fingerprint()
    for seed, subsets in plan.subsets.items():
        path = directory / f"seed{seed}.json"
        if path.is_file():
            previous = json.loads(path.read_text()).get("meta", {}).get("data_fingerprint")
            if previous != fingerprint:
                raise DataError(str(path), f"was drawn from different data (fingerprint {str(previous)[:12]}… vs "
                                f"{fingerprint[:12]}…)", "the study data changed: use a new output_dir")
        save_subsets(path, subsets, {"seed": seed, "data": plan.store.name, "data_fingerprint": fingerprint,
                                     "train_images": int(len(plan.train_rows))})
        if seed in plan.val_subsets:  # proportional validation rows of each label fraction
            save_subsets(directory / f"val_seed{seed}.json", plan.val_subsets[seed],
                         {"seed": seed, "data": plan.store.name, "data_fingerprint": fingerprint,
                          "val_images": int(len(plan.val_rows)), "validation": plan.config.validation,
                          "validation_min_per_class": plan.config.validation_min_per_class})


def _rules_line(plan: StudyPlan) -> str:
    """The comparison rules in one line (also stated in the report's "How the numbers were made")."""
    config = plan.config
    if config.validation == "proportional":
        rule = f"validation: proportional (same fraction of {len(plan.val_rows)} images, ≥ " \
               f"{config.validation_min_per_class} per class)"
    else:
        rule = f"validation: full ({len(plan.val_rows)} images for every fraction)"
    finetune = config.protocols.finetune
    if finetune is not None:
        steps = "one pass over each subset (grows with the fraction)" if finetune.steps_per_epoch == "subset" else \
            f"{finetune.epochs} × {plan.finetune_steps_per_epoch(len(plan.train_rows))} steps at every fraction"
        scales = finetune.backbone_lr_scale
        lr = f"backbone LR scale {scales[0]:g} for every init" if len(scales) == 1 else \
            f"backbone LR scale chosen on validation from {[float(v) for v in scales]} for every init"
        rule += f"; fine-tuning: {steps}, {lr}"
    return rule


def run_study(config: StudyConfig | str | Path, overrides: list[str] | None = None, log: Log = _print) -> Path:
    """Run (or resume) a whole study and render its report; returns the study's output folder.

    Outputs: ``config.yaml``, ``results.sqlite`` (cells, metrics, predictions, pretraining runs),
    ``subsets/seed{n}.json``, ``pretraining/<run>/`` (checkpoints, metrics), ``features/`` (cache) and
    ``report/report.html`` + ``report/results.csv``.
    """
    from radssl.study.report import render_report

    config = _load(config, overrides)
    if config.threads:
        torch.set_num_threads(config.threads)
    plan = prepare_study(config, log)  # every check, before any compute
    device = _resolve_device(config.device)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / RESULTS_FILE
    with ResultsStore(results_path) as results:
        _check_compatible(results.study_config(config.name), config.to_dict(), results_path)
        results.save_study_config(config.name, config.to_dict())
        write_text_atomic(output_dir / "config.yaml", dump_config(config))
        _save_subsets(plan, output_dir / "subsets")
        total = len(plan.encoders) * len(config.protocols.enabled()) * len(config.seeds) * \
            len(config.label_fractions) * len(plan.test_sets)
        progress = [0, total]
        started = time.perf_counter()
        log(f"radssl study '{config.name}': {total} cells ({len(plan.encoders)} encoders × "
            f"{len(config.protocols.enabled())} protocols × {len(config.seeds)} seeds × "
            f"{len(config.label_fractions)} label fractions × {len(plan.test_sets)} test sets), "
            f"{len(plan.jobs)} pretraining runs; {len(results.done_keys(config.name))} cells already done")
        log(f"radssl study: {_rules_line(plan)}")
        for encoder in plan.encoders:
            if encoder.job is not None:
                _run_pretraining(plan, results, encoder.job, log)
            _run_cells(plan, results, encoder, device, log, progress)
        report = render_report(results, config.name, output_dir / REPORT_DIR)
    log(f"radssl study '{config.name}' finished in {time.perf_counter() - started:.0f} s; report: {report}")
    return output_dir


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - thin wrapper for `python -m`
    from radssl.errors import RadsslError

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m radssl.study.grid study.yaml [key=value ...]", file=sys.stderr)
        return 2
    try:
        run_study(Path(args[0]), args[1:])
    except RadsslError as error:
        print(f"radssl: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
