"""Every registered 2D method trains through the engine: 20 steps on the synthetic data with a falling loss, and a
checkpoint whose backbone transfer rebuilds by spec with identical outputs.

The loss is watched on one fixed batch (the method's own views, ``support.on_one_fixed_batch``): on fresh images a
20-step trend at batch 32 is smaller than the step-to-step noise for SimCLR, MoCo v3 and Barlow Twins, and its sign
would depend on the CPU. MoCo v2 runs with a one-batch queue, its first step (random negatives) left out.

New methods are picked up from the registry automatically; a method's preset (views policy, optimiser) must make it
train out of the box, and a method that needs a particular backbone family says so in its requirements.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from support import SHORT_RUN_METHOD, SHORT_RUN_OPTIM, SHORT_RUN_TRANSIENT_STEPS
from radssl.config import PretrainConfig
from radssl.data.build import build_store
from radssl.engine.pretrain import pretrain
from radssl.methods.registry import METHODS, method_class
from radssl.transfer.initialisation import initialise_backbone

STEPS = 20


def _methods_2d() -> list[str]:
    names = []
    for name in sorted(METHODS):
        cls = method_class(name)
        requirements = cls.requirements(cls.Params())
        if 2 in requirements.spatial_dims and not requirements.text:
            names.append(name)
    return names


def test_the_one_fixed_batch_policy_leaves_the_registry_as_it_found_it(tmp_path: Path) -> None:
    from support import on_one_fixed_batch

    from radssl.views.policies import POLICIES

    before = dict(POLICIES)
    with on_one_fixed_batch(_config("simclr", tmp_path)) as config:
        assert config.views.policy in POLICIES and config.views.policy not in before
    assert POLICIES == before, "a test's own policy must not stay registered for the tests after it"


def _config(name: str, output_dir: Path) -> PretrainConfig:
    cls = method_class(name)
    families = cls.requirements(cls.Params()).backbone_families
    backbone = "small_cnn" if families is None or "small_cnn" in families else families[0]
    model = {"backbone": backbone}
    if backbone.startswith("vit"):
        model["options"] = {"depth": 2}
    return PretrainConfig.model_validate({
        "optim": SHORT_RUN_OPTIM.get(name, {}),
        "seed": 0,
        "output_dir": str(output_dir),
        "data": {"source": "synthetic", "n_patients": 64, "images_per_patient": 2, "image_size": 32},
        "model": model,
        "method": {"name": name, **SHORT_RUN_METHOD.get(name, {})},
        "train": {"steps": STEPS, "batch_size": 32, "log_every": 1, "checkpoint_every": 10, "progress_bar": False,
                  "accelerator": "cpu", "devices": 1},
        "eval": {"enabled": False},
    })


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("name", _methods_2d())
def test_method_trains_and_its_checkpoint_transfers(tmp_path: Path, name: str, one_fixed_batch) -> None:  # noqa: ANN001
    config = one_fixed_batch(_config(name, tmp_path / name))
    store = build_store(config.data)
    result = pretrain(config, store=store)
    rows = (tmp_path / name / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [float(r.split(",")[header.index("loss")]) for r in rows[1:]]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    skip = SHORT_RUN_TRANSIENT_STEPS.get(name, 0)
    first, last = sum(losses[skip : skip + 5]) / 5, sum(losses[-5:]) / 5
    assert last < first, f"{name}: loss did not fall ({first:.4f} → {last:.4f}; views {config.views.policy})"

    loaded = initialise_backbone(f"ssl:{result.checkpoint}").eval()
    exported = result.backbone.eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), exported(x))
