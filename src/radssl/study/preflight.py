"""One validation path: what ``radssl data inspect`` passes is what ``radssl pretrain`` / ``radssl study`` run.

``data inspect`` used to validate a config's keys and load its data, while the commands themselves ran further
checks (protocols against the data, zero-shot prompts against the classes, label needs, views against the method,
whether the data fill a batch) only once they started. Here inspect calls the very functions the commands call
before their first step: :func:`radssl.study.plan.prepare_study` for a study (every data, protocol, weights and
pretraining check; nothing trained or written) and :func:`check_pretrain_config` — the engine's own
``pretrain_rows`` / ``plan_steps`` / ``check_pretraining`` — for a pretraining config.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from radssl.config import PretrainConfig, load_config, read_yaml_mapping
from radssl.data.build import build_store
from radssl.data.store import ImageStore
from radssl.engine.pretrain import check_pretraining, plan_steps, pretrain_rows
from radssl.study.bakeoff import load_bakeoff_config, select_methods, steps_for_images, study_configs
from radssl.study.config import INTERNAL_TEST_SET, StudyConfig, load_study_config
from radssl.study.plan import prepare_study

ConfigKind = Literal["bakeoff", "study", "pretrain", "data"]

DATA_ONLY_KEYS = {"data", "model", "seed", "output_dir"}
"""A config with only these keys describes data (valid as both kinds); it is inspected without pretraining checks."""


def config_kind(raw: dict[str, Any]) -> ConfigKind:
    """``bakeoff``, ``study``, ``pretrain`` or ``data``: which config a YAML mapping is, by the top-level keys only
    one has (a bake-off is the config with a ``budget``)."""
    if "budget" in raw:
        return "bakeoff"
    study_only = set(StudyConfig.model_fields) - set(PretrainConfig.model_fields)
    if study_only & set(raw):
        return "study"
    return "data" if set(raw) <= DATA_ONLY_KEYS else "pretrain"


def check_pretrain_config(config: PretrainConfig, store: ImageStore, world_size: int = 1) -> None:
    """Everything ``radssl pretrain`` checks before its first step: enough images for one global batch, backbone ×
    view policy × method × pairing metadata (the engine's own checks; nothing is written)."""
    rows = pretrain_rows(store, config.train.pretrain_fraction, config.seed)
    plan_steps(config, len(rows), world_size, store.origin or store.name)
    check_pretraining(config, store)


def preflight(path: Path, overrides: list[str], log: Callable[[str], None] = print
              ) -> tuple[ConfigKind, list[tuple[str, ImageStore]]]:
    """Validate a config file exactly as the command that runs it would, before compute; its stores by section.

    Raises ConfigError/DataError naming the file and field. A study's notes (skipped protocols, data notes) go to
    ``log`` as ``radssl study`` prints them.
    """
    kind = config_kind(read_yaml_mapping(path))
    if kind == "bakeoff":
        return kind, check_bakeoff_config(path, overrides, log)
    if kind == "study":
        plan = prepare_study(load_study_config(path, overrides), log=log)
        stores = [("data", plan.store)] + [(f"external_test_sets.{name}", store)
                                           for name, (store, _) in plan.test_sets.items() if name != INTERNAL_TEST_SET]
        return kind, stores

    config = load_config(path, overrides)
    store = build_store(config.data)
    if kind == "pretrain":
        check_pretrain_config(config, store)
    return kind, [("data", store)]


def check_bakeoff_config(path: Path, overrides: list[str], log: Callable[[str], None] = print
                         ) -> list[tuple[str, ImageStore]]:
    """What ``radssl bakeoff`` checks before compute: the methods that fit the data (and why the others do not), then
    every backbone group's study through :func:`radssl.study.plan.prepare_study`. Under a wall-clock budget the
    steps are not calibrated here (that is compute): one step per arm stands in, so the checks still run."""
    config = load_bakeoff_config(path, overrides)
    store = build_store(config.data)
    arms, excluded = select_methods(config, store, log)
    for method, reason in excluded.items():
        log(f"radssl bakeoff: {method} left out: {reason}")
    images = config.budget.images_seen
    for arm in arms.values():
        arm.steps = steps_for_images(images, arm.batch_size) if images is not None else 1
        arm.entry["train"]["steps"] = arm.steps
    if images is None:
        log("radssl data inspect: wall-clock budget — steps are set by calibration when the bake-off runs")
    stores = [("data", store)]
    for group, study in study_configs(config, arms).items():
        plan = prepare_study(study, log=log)
        stores += [(f"{group}: external_test_sets.{name}", test_store)
                   for name, (test_store, _) in plan.test_sets.items() if name != INTERNAL_TEST_SET]
    return stores
