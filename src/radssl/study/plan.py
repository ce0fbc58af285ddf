"""The study as a plan: every check and every task, computed before any compute.

A study is a grid of {pretraining × init × label fraction × seed × protocol × test set} cells. This module turns a
:class:`~radssl.study.config.StudyConfig` into a :class:`StudyPlan` and a list of tasks, and runs no training:

1. :func:`prepare_study` loads the data once and checks everything that could fail later — splits, classes in
   every test set (class-scored protocols) or masks (segmentation), each label fraction of each seed, batch
   sizes, weights files, every protocol's own checks — *before any compute*. 2D and 3D data alike, as far as
   the enabled protocols support them.
2. :func:`plan_tasks` lists what is left to do given what the results store already holds: one
   :class:`PretrainTask` per SSL pretraining run not yet finished, and one :class:`CellTask` per (encoder,
   protocol, seed, label fraction) with missing cells, depending on its encoder's pretraining task — or on the
   encoder's :class:`FeaturesTask` (frozen features extracted once into the on-disk cache) for frozen-feature
   protocols. A cell task scores all its missing test sets with one protocol run.

The tasks are run by :mod:`radssl.study.runner` through an executor (:mod:`radssl.study.executors`: serial, Ray);
what a task computes is :mod:`radssl.study.tasks`. Protocols are plugins (:mod:`radssl.transfer.protocols`): the
plan knows no protocol by name. Label-free protocols (zero-shot) run once per encoder and test set (label
fraction 0, the study's seed); a protocol that cannot read out an encoder (zero-shot of a non-image–text encoder)
skips it with a note.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import ValidationError

from radssl.config import PretrainConfig, format_validation_error
from radssl.data.build import build_store
from radssl.data.splits import label_fraction_subsets
from radssl.data.store import ImageStore
from radssl.engine.checkpoint import FINAL, load_checkpoint
from radssl.engine.pretrain import check_pretraining, plan_steps, pretrain_rows
from radssl.errors import ConfigError, DataError
from radssl.methods.registry import METHODS, method_class
from radssl.study.config import (
    FOUNDATION_KINDS,
    INTERNAL_TEST_SET,
    NO_PRETRAINING,
    InitSpec,
    StudyConfig,
    checkpoint_run_name,
    foundation_run_name,
    legacy_study_settings,
)
from radssl.study.results_store import CellKey
from radssl.transfer.initialisation import initialise_backbone
from radssl.transfer.metrics import check_auc_defined, check_classes_covered
from radssl.transfer.protocols import EncoderInfo, Protocol, StudySetup

__all__ = ["CellTask", "Encoder", "FeaturesTask", "PretrainJob", "PretrainTask", "StudyPlan", "Task", "cell_key", "plan_tasks",
           "prepare_study", "proportional_validation_rows", "subset_strata", "VALIDATION_MIN_PER_CLASS"]

LABEL_FREE_FRACTION = 0.0
"""Cell label fraction of label-free protocols (zero-shot): no training label is used."""
Log = Callable[[str], None]
StoreLoader = Callable[[Any], ImageStore]
"""Builds a store from a data section (default :func:`radssl.data.build.build_store`; tests pass in-memory stores)."""
SubsetDrawer = Callable[..., dict[float, np.ndarray]]
"""Draws nested label-fraction subsets (default :func:`radssl.data.splits.label_fraction_subsets`)."""


def print_log(message: str) -> None:
    """The default :data:`Log` of a study or bake-off: each message on stdout at once."""
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
    protocols: dict[str, Protocol] = field(default_factory=dict)
    """Enabled protocols (plugins) by name, in the order they run."""
    encoder_infos: dict[Encoder, EncoderInfo] = field(default_factory=dict)
    skipped: dict[tuple[Encoder, str], str] = field(default_factory=dict)
    """(encoder, protocol) pairs the protocol cannot read out (e.g. zero-shot of a non-image–text encoder) → why."""

    def validation_rows(self, seed: int, fraction: float) -> np.ndarray:
        """The validation rows that select a cell's model (see the study's ``validation`` rule)."""
        if self.config.validation == "proportional":
            return self.val_subsets[seed][fraction]
        return self.val_rows

    def finetune_steps_per_epoch(self, subset_rows: int) -> int:
        """Optimiser steps per fine-tuning epoch under the protocol's budget rule (see FinetuneParams)."""
        options = self.config.protocols.finetune
        assert options is not None
        return options.steps_for(subset_rows, len(self.train_rows))

    def cell_axes(self, protocol: str) -> list[tuple[int, float]]:
        """(seed, label fraction) pairs a protocol runs at; a label-free protocol runs once (fraction 0, the
        study's seed: its only randomness is the encoder's)."""
        if not self.protocols[protocol].uses_labels:
            return [(self.config.seed, LABEL_FREE_FRACTION)]
        return [(seed, fraction) for seed in self.config.seeds for fraction in self.config.label_fractions]

    def cell_keys(self) -> list[CellKey]:
        """Every cell of the grid, in the order they run (skipped encoder × protocol pairs left out)."""
        keys = []
        for encoder in self.encoders:
            for protocol in self.protocols:
                if (encoder, protocol) in self.skipped:
                    continue
                for seed, fraction in self.cell_axes(protocol):
                    keys += [cell_key(encoder, protocol, fraction, seed, name) for name in self.test_sets]
        return keys


def cell_key(encoder: Encoder, protocol: str, fraction: float, seed: int, test_set: str) -> CellKey:
    return CellKey(encoder.pretrain, encoder.init, protocol, fraction, encoder.pretrain_fraction, seed, test_set)


def _where(store: ImageStore) -> str:
    return store.origin or store.name


def _check_split_labels(store: ImageStore, train_rows: np.ndarray, splits: dict[str, np.ndarray]) -> None:
    """Each evaluated split holds labels on every row and only classes seen in training; then AUC is defined.

    Coverage is checked first for all splits: "class 2 is in the test set but not in training" is the message
    that points at the real problem, before "AUC is undefined on the validation set".
    """
    train_y = store.labels[torch.from_numpy(train_rows)].numpy()
    labels = {what: store.labels[torch.from_numpy(rows)].numpy() for what, rows in splits.items()}
    for what, y in labels.items():
        if (y < 0).any():
            raise DataError(what, f"{int((y < 0).sum())} rows have no label (-1)",
                            "a test or validation set needs a label on every row")
        check_classes_covered(store.task, train_y, y, what)
    for what, y in labels.items():
        check_auc_defined(store.task, y, what)


def _external_store(config: StudyConfig, index: int, internal: ImageStore, train_y: np.ndarray,
                    class_target: bool = True, mask_target: bool = False, load: StoreLoader = build_store
                    ) -> ImageStore:
    """Load one external test set, all rows as ``test``, and check it fits the internal task and images."""
    entry = config.external_test_sets[index]
    field_name = f"external_test_sets[{index}] ('{entry.name}')"
    store = load(entry.data)
    where = f"{_where(store)} [{field_name}]"
    if class_target and (store.task.kind, store.task.num_classes) != (internal.task.kind, internal.task.num_classes):
        raise DataError(where, f"its task is {store.task.kind} with {store.task.num_classes} classes but the study "
                        f"data's is {internal.task.kind} with {internal.task.num_classes}",
                        "use a test set of the same diagnostic task")
    if store.channels != internal.channels or store.image_shape != internal.image_shape:
        raise DataError(where, f"images are {store.channels}×{'×'.join(map(str, store.image_shape))} but the study "
                        f"data's are {internal.channels}×{'×'.join(map(str, internal.image_shape))}",
                        "load the external set at the same size and channels (e.g. data.size / image_size)")
    if class_target:
        labels = store.labels.numpy()
        if (labels < 0).any():
            raise DataError(where, f"{int((labels < 0).sum())} rows have no label (-1)", "every test row needs a label")
        check_classes_covered(store.task, train_y, labels, where)
        check_auc_defined(store.task, labels, where)
    if mask_target:
        _check_masks(store, where)
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
        # Only the keys the study wrote: the method's radiology preset fills the rest (user keys win), as in
        # `radssl pretrain` — dumping every default would hide the preset (ConVIRT's image_text views, …).
        "views": run.views.model_dump(mode="json", exclude_unset=True),
        "optim": run.optim.model_dump(mode="json", exclude_unset=True),
        "train": {**run.train.model_dump(mode="json"), "pretrain_fraction": job.pretrain_fraction},
        "eval": {"enabled": False},
    }
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
        elif spec.kind in FOUNDATION_KINDS:  # foundation weights from a local file: no pretraining run
            encoders.append(Encoder(spec.kind, foundation_run_name(str(spec.target)), 1.0, spec))
        elif spec.kind == "ssl" and spec.target not in names:
            encoders.append(Encoder("ssl", checkpoint_run_name(str(spec.target)), 1.0, spec,
                                    checkpoint=Path(str(spec.target))))
        else:
            for fraction in config.pretrain_fractions:
                job = PretrainJob(str(spec.target), fraction, from_imagenet=spec.kind == "imagenet+ssl")
                jobs.append(job)
                encoders.append(Encoder(spec.kind, str(spec.target), fraction, spec, job=job))
    # cheap encoders first: early results
    order = {"random": 0, "imagenet": 1, **dict.fromkeys(FOUNDATION_KINDS, 1), "ssl": 2, "imagenet+ssl": 3}
    encoders.sort(key=lambda e: order[e.init])
    return encoders, jobs


def _check_weights(config: StudyConfig, store: ImageStore, plan_configs: dict[PretrainJob, PretrainConfig],
                   encoders: list[Encoder]) -> None:
    """Every weights file exists and fits its backbone (a quick load; still no training)."""
    for encoder in encoders:
        if encoder.init in FOUNDATION_KINDS:  # files exist, weights fit (strict), patch size fits: before compute
            initialise_backbone(encoder.spec.text, in_channels=store.channels, image_size=store.image_shape)
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


def _check_protocols_fit(protocols: dict[str, Protocol], store: ImageStore) -> None:
    """Every enabled protocol reads out this data's task and dimensionality (before anything is loaded further)."""
    where = _where(store)
    available = {store.task.kind} | ({"segmentation"} if "mask" in store.meta else set())
    if store.task.kind == "multilabel" and any(p.target == "class" for p in protocols.values()):
        raise DataError(where, "multilabel studies are not implemented: label-fraction subsets, the proportional "
                        "validation floor and the paired statistics stratify by one class per case",
                        "use a binary or multiclass task (e.g. one label column), or run the transfer functions "
                        "(radssl.transfer.linear_probe / finetune support multilabel) outside a study")
    for name, protocol in protocols.items():
        if store.spatial_dims not in protocol.spatial_dims:
            dims = " or ".join(f"{d}D" for d in sorted(protocol.spatial_dims))
            raise DataError(where, f"holds {store.spatial_dims}D data; protocol '{name}' reads out {dims} data",
                            f"remove '{name}' from protocols, or use {dims} data")
        if not protocol.task_kinds & available:
            if protocol.target == "mask":
                raise DataError(where, f"protocol '{name}' needs segmentation masks (store.meta['mask']) and the data "
                                "have none", "use a source with masks (synthetic3d; synthetic with masks; files "
                                "with a mask column) or remove the protocol")
            kinds = ", ".join(sorted(protocol.task_kinds))
            raise DataError(where, f"protocol '{name}' reads out {kinds} tasks; the data's task is "
                            f"'{store.task.kind}'", "use labelled data for it, or remove the protocol")


def _check_masks(store: ImageStore, where: str) -> None:
    """Segmentation protocols score against masks: every evaluated store must have them (the store validated their
    grid and labels when it was built, see ``ImageStore.mask_classes``)."""
    if "mask" not in store.meta:
        raise DataError(where, "has no segmentation masks (store.meta['mask'])",
                        "every evaluated store of a segmentation study needs masks (e.g. synthetic masks: true, "
                        "NIfTI mask_folder / mask_suffix)")


def _encoder_info(config: StudyConfig, encoder: Encoder) -> EncoderInfo:
    """What protocols may know about an encoder: its method and family (image–text or not) and checkpoint."""
    method = None
    checkpoint = encoder.checkpoint
    if encoder.job is not None:
        method = config.pretraining_run(encoder.job.run).method.name
        checkpoint = encoder.job.checkpoint(config.output_dir)
    elif encoder.checkpoint is not None and encoder.checkpoint.is_file():
        state = load_checkpoint(encoder.checkpoint)
        method = str(state.get("method_name") or (state.get("config") or {}).get("method", {}).get("name") or "")
        method = method or None
    family = method_class(method).family if method in METHODS else None
    return EncoderInfo(encoder.init, encoder.pretrain, method, family, checkpoint, encoder.label)


def prepare_study(config: StudyConfig, log: Log = print_log, *, load: StoreLoader = build_store,
                  draw: SubsetDrawer = label_fraction_subsets) -> StudyPlan:
    """Load the data and validate the whole grid; raises ConfigError/DataError naming the file and field.

    Nothing is trained here: stores are built, label-fraction subsets drawn, pretraining configs validated
    (including whether the data fill a batch), weights files opened and every protocol's own checks run.
    What is checked follows the protocols: class labels (AUC defined on every split, classes in every subset)
    for protocols scored against classes; masks for segmentation protocols. ``load`` and ``draw`` build the
    stores and draw the subsets (tests inject their own).
    """
    protocols = config.protocols.build()
    store = load(config.data)
    _check_protocols_fit(protocols, store)
    class_target = any(p.target == "class" for p in protocols.values())
    mask_target = any(p.target == "mask" for p in protocols.values())
    train_rows, val_rows, test_rows = _internal_splits(store, class_target, mask_target)
    train_y = store.labels[torch.from_numpy(train_rows)].numpy()
    test_sets: dict[str, tuple[ImageStore, np.ndarray]] = {INTERNAL_TEST_SET: (store, test_rows)}
    for index in range(len(config.external_test_sets)):
        external = _external_store(config, index, store, train_y, class_target, mask_target, load)
        test_sets[config.external_test_sets[index].name] = (external, np.arange(len(external)))

    strata = subset_strata(store, train_rows)
    subsets = _training_subsets(config, store, strata, train_rows, class_target, draw)
    val_subsets = _validation_subsets(config, store, val_rows, strata, class_target, draw)

    encoders, jobs = _encoders(config)
    if any(e.init == "random" for e in encoders):  # the random encoder's spec fits the data (2D vs 3D, channels)
        config.model.spec_for(store.channels, store.image_shape)
    pretrain_configs = {job: _checked_pretrain_config(config, job, store) for job in jobs}
    _check_weights(config, store, pretrain_configs, encoders)

    infos = {encoder: _encoder_info(config, encoder) for encoder in encoders}
    setup = dict(store=store, train_rows=train_rows, val_rows=val_rows, test_sets=test_sets, subsets=subsets,
                 encoders=tuple(infos.values()))
    skipped, notes = _check_protocols(config, protocols, setup, infos)
    notes = [f"data: {note}" for note in store.notes] + notes + _config_notes(config, jobs)
    for note in notes:
        log(f"radssl study: note: {note}")
    return StudyPlan(config, store, train_rows, val_rows, test_sets, subsets, jobs, encoders, pretrain_configs, notes,
                     val_subsets, protocols, infos, skipped)


def _internal_splits(store: ImageStore, class_target: bool, mask_target: bool
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) rows of the study data, each non-empty and scorable by the study's protocols."""
    where = _where(store)
    train_rows, val_rows, test_rows = (store.indices(s) for s in ("train", "val", "test"))
    for split, rows in (("train", train_rows), ("val", val_rows), ("test", test_rows)):
        if len(rows) == 0:
            raise DataError(where, f"the '{split}' split is empty (study field data)",
                            "a study needs train (label fractions), val (model selection) and test splits")
    if class_target:
        train_y = store.labels[torch.from_numpy(train_rows)].numpy()
        if (train_y < 0).any():
            raise DataError(where, f"{int((train_y < 0).sum())} training rows have no label",
                            "mark unlabelled images as split 'unlabelled' (they are still used for pretraining)")
        _check_split_labels(store, train_rows, {f"{where} [test split]": test_rows,
                                                f"{where} [validation split]": val_rows})
    if mask_target:
        _check_masks(store, where)
    return train_rows, val_rows, test_rows


def _training_subsets(config: StudyConfig, store: ImageStore, strata: np.ndarray, train_rows: np.ndarray,
                      class_target: bool, draw: SubsetDrawer) -> dict[int, dict[float, np.ndarray]]:
    """Per seed, the nested label-fraction subsets of the training rows; each keeps every training class."""
    where = _where(store)
    labels = store.labels.numpy()
    classes = set(np.unique(labels[train_rows]).tolist())
    subsets: dict[int, dict[float, np.ndarray]] = {}
    for seed in config.seeds:
        drawn = draw(strata, train_rows, config.label_fractions, seed, store.patient_id,
                     source=f"{where} [label_fractions, seed {seed}]")
        if class_target:
            for fraction, rows in drawn.items():
                missing = sorted(classes - set(np.unique(labels[rows]).tolist()))
                if missing:
                    raise DataError(f"{where} [label_fractions, seed {seed}]",
                                    f"label fraction {fraction:g} leaves class(es) {missing} with no example",
                                    "raise the smallest label fraction")
        subsets[seed] = drawn
    return subsets


def _checked_pretrain_config(config: StudyConfig, job: PretrainJob, store: ImageStore) -> PretrainConfig:
    """A job's pretraining config, checked against the data: its rows fill a batch; backbone × policy × method fit."""
    pretrain_config = _pretrain_config(config, job)
    index = [r.name for r in config.pretraining].index(job.run)
    rows = pretrain_rows(store, job.pretrain_fraction, pretrain_config.seed)
    plan_steps(pretrain_config, len(rows), 1, f"{_where(store)} [pretraining[{index}] '{job.run}', "
               f"pretrain_fraction {job.pretrain_fraction:g}]")
    check_pretraining(pretrain_config, store)  # before any compute
    return pretrain_config


def _check_protocols(config: StudyConfig, protocols: dict[str, Protocol], setup: dict[str, Any],
                     infos: dict[Encoder, EncoderInfo]) -> tuple[dict[tuple[Encoder, str], str], list[str]]:
    """Run every protocol's own checks; returns the (encoder, protocol) pairs it skips, with notes."""
    skipped: dict[tuple[Encoder, str], str] = {}
    notes: list[str] = []
    for name, protocol in protocols.items():
        protocol.check(StudySetup(**setup, field_name=f"protocols.{name}"))
        for encoder, info in infos.items():
            reason = protocol.applies_to(info)
            if reason is not None:
                skipped[(encoder, name)] = reason
                notes.append(f"protocol '{name}' skips {encoder.label}: {reason}")
        if not protocol.uses_labels:
            notes.append(f"protocol '{name}' uses no training labels: it runs once per encoder and test set "
                         f"(label fraction 0, seed {config.seed}) and is drawn as a horizontal reference line")
    return skipped, notes


def _config_notes(config: StudyConfig, jobs: list[PretrainJob]) -> list[str]:
    """Notes on what the config declares but the study will not run."""
    notes = []
    dropped = config.dropped_initialisations()
    if dropped:
        notes.append(f"initialisations {dropped} skipped: imagenet_weights is not set (require_imagenet: false)")
    used = {job.run for job in jobs}
    unused = [run.name for run in config.pretraining if run.name not in used]
    if unused:
        notes.append(f"pretraining runs {unused} are not used by any initialisation and will not run")
    return notes


def subset_strata(store: ImageStore, train_rows: np.ndarray) -> np.ndarray:
    """Per row, the stratum label-fraction subsets are drawn in: the class where the labels are one class per row and
    every training row has one (segmentation: finding / no finding), else one stratum for all rows."""
    labels = store.labels.numpy()
    train_y = labels[np.asarray(train_rows, dtype=np.int64)]
    return labels if labels.ndim == 1 and (train_y >= 0).all() else np.zeros(len(store), dtype=np.int64)


VALIDATION_MIN_PER_CLASS = int(StudyConfig.model_fields["validation_min_per_class"].default)
"""The study's default floor of validation images per class under ``validation: proportional``."""


def proportional_validation_rows(strata: np.ndarray, val_rows: np.ndarray, fractions: Sequence[float], seed: int,
                                 patient_id: np.ndarray | None = None,
                                 min_per_class: int = VALIDATION_MIN_PER_CLASS, *, source: str = "dataset",
                                 draw: SubsetDrawer = label_fraction_subsets) -> dict[float, np.ndarray]:
    """The study's proportional validation rows of one seed: per label fraction, a nested stratified patient-grouped
    subset of ``val_rows`` with at least ``min_per_class`` rows per class, drawn from the seed's second stream
    (``[seed, 1]``, independent of the training subsets drawn with ``seed``). The one definition of the rule: the
    study plan and ``benchmarks/bakeoff_lib.py`` (lightly's bars) both call it, so the two cannot drift."""
    return draw(strata, val_rows, fractions, [seed, 1], patient_id, source=source, min_rows_per_class=min_per_class)


def _validation_subsets(config: StudyConfig, store: ImageStore, val_rows: np.ndarray, strata: np.ndarray,
                        class_target: bool, draw: SubsetDrawer = label_fraction_subsets
                        ) -> dict[int, dict[float, np.ndarray]]:
    """Proportional validation: per seed, nested stratified patient-grouped subsets with a per-class floor.

    Drawn with :func:`radssl.data.splits.label_fraction_subsets` like the training subsets (same strata), from an
    independent stream of the same seed (``[seed, 1]``); with class-scored protocols each is checked to define an
    AUC before any compute (segmentation-only studies: the floor is a number of validation cases per stratum).
    """
    if config.validation != "proportional":
        return {}
    where = _where(store)
    labels = store.labels.numpy()
    out: dict[int, dict[float, np.ndarray]] = {}
    for seed in config.seeds:
        source = f"{where} [validation: proportional, seed {seed}]"
        drawn = proportional_validation_rows(strata, val_rows, config.label_fractions, seed, store.patient_id,
                                             config.validation_min_per_class, source=source, draw=draw)
        for fraction, rows in drawn.items():
            if not class_target:
                continue
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
                 "validation_min_per_class", "bn_stats")
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




# ------------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class PretrainTask:
    """Run one SSL pretraining job; its encoder's cell tasks depend on it (they read its ``final.pt``)."""

    job: PretrainJob
    kind: ClassVar[str] = "pretrain"
    cells: ClassVar[int] = 0
    depends_on: ClassVar[tuple[str, ...]] = ()

    @property
    def id(self) -> str:
        return f"pretrain:{self.job.run_name}"


@dataclass(frozen=True)
class FeaturesTask:
    """Extract one encoder's frozen features once (internal store and every test set) into the on-disk cache.

    The encoder's frozen-feature cells (linear probe, kNN, …) depend on it, so parallel workers read the features
    instead of each extracting them again.
    """

    encoder: Encoder
    depends_on: tuple[str, ...] = ()
    kind: ClassVar[str] = "features"
    cells: ClassVar[int] = 0

    @property
    def id(self) -> str:
        return f"features:{self.encoder.label}"


@dataclass(frozen=True)
class CellTask:
    """One protocol run of one encoder at one (seed, label fraction), scoring each of ``test_sets``.

    ``test_sets`` holds only the test sets whose cells the results store does not have yet.
    """

    encoder: Encoder
    protocol: str
    seed: int
    fraction: float
    test_sets: tuple[str, ...]
    depends_on: tuple[str, ...] = ()
    kind: ClassVar[str] = "cell"

    @property
    def id(self) -> str:
        return f"cell:{self.encoder.label}|{self.protocol}|lf={self.fraction!r}|seed={self.seed}"

    @property
    def cells(self) -> int:
        return len(self.test_sets)

    def keys(self) -> list[CellKey]:
        return [cell_key(self.encoder, self.protocol, self.fraction, self.seed, name) for name in self.test_sets]


Task = PretrainTask | FeaturesTask | CellTask


def plan_tasks(plan: StudyPlan, done_cells: set[str], finished_runs: set[str]) -> list[Task]:
    """Every task left to do, in an order that respects dependencies (and gives early results first).

    ``done_cells``: cell keys the results store holds; ``finished_runs``: pretraining run names it records whose
    checkpoint exists. Encoder by encoder as the plan orders them (cheap encoders first): the encoder's pretraining
    task (if not finished), its features task (when a frozen-feature protocol has cells to do), then its cell
    tasks, each depending on the task that makes its input (features, else pretraining).
    """
    tasks: list[Task] = []
    for encoder in plan.encoders:
        needs: tuple[str, ...] = ()
        if encoder.job is not None and encoder.job.run_name not in finished_runs:
            task = PretrainTask(encoder.job)
            if task.id not in {t.id for t in tasks}:
                tasks.append(task)
            needs = (task.id,)
        cells: list[CellTask] = []
        for protocol in plan.protocols:
            if (encoder, protocol) in plan.skipped:
                continue
            for seed, fraction in plan.cell_axes(protocol):
                missing = tuple(name for name in plan.test_sets
                                if cell_key(encoder, protocol, fraction, seed, name).key not in done_cells)
                if missing:
                    cells.append(CellTask(encoder, protocol, seed, fraction, missing, needs))
        if any(plan.protocols[c.protocol].frozen_features for c in cells):
            features = FeaturesTask(encoder, needs)
            tasks.append(features)
            cells = [replace(c, depends_on=(features.id,)) if plan.protocols[c.protocol].frozen_features else c
                     for c in cells]
        tasks += cells
    return tasks
