"""Pretraining engine: checkpoint round trip, exact resume after a crash, provenance, bad-input refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from radssl.config import load_config
from radssl.data.store import ImageStore, TaskInfo
from radssl.engine.checkpoint import load_checkpoint, save_checkpoint
from radssl.engine.pretrain import SimulatedCrash, pretrain, view_context
from radssl.errors import CheckpointError, ConfigError, DataError
from radssl.models.registry import build_backbone, build_from_spec
from radssl.models.spec import BackboneSpec
from radssl.views.policies import TwoViewPolicy


def _config(tmp_path: Path, name: str, *extra: str):
    return load_config(
        None,
        [
            f"output_dir={tmp_path / name}",
            "model.backbone=small_cnn",
            "train.accelerator=cpu",
            "train.devices=1",
            "train.steps=6",
            "train.batch_size=16",
            "train.checkpoint_every=3",
            "train.log_every=1",
            "train.progress_bar=false",
            "eval.enabled=false",
            "optim.optimizer=sgd",
            "optim.lr=0.05",
            *extra,
        ],
    )


class CountingPolicy(TwoViewPolicy):
    """The built-in two-view policy, counting the steps it serves (passed to pretrain(policy=...))."""

    name = "counting_two_view"

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.calls = 0

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        self.calls += 1
        return super().__call__(*args, **kwargs)


def _counting_policy(config, store: ImageStore) -> CountingPolicy:  # noqa: ANN001
    return CountingPolicy(config.views.settings(), view_context(config, store, channels_last=False))


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_resume_after_crash_matches_uninterrupted_run(tmp_path: Path, tiny_store: ImageStore, method: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    uninterrupted = pretrain(_config(tmp_path, "full", f"method.name={method}"), store=tiny_store)

    crashed_config = _config(tmp_path, "crashed", f"method.name={method}")
    with pytest.raises(SimulatedCrash):
        pretrain(crashed_config, store=tiny_store, halt_after_step=4)  # dies between checkpoints (3 and 6)
    last = load_checkpoint(tmp_path / "crashed" / "checkpoints" / "last.pt")
    assert last["step"] == 3 and not last["finished"]
    capsys.readouterr()
    counting = _counting_policy(crashed_config, tiny_store)
    resumed = pretrain(crashed_config, store=tiny_store, policy=counting)
    # It really resumed: it said so, started at the checkpoint's step and ran only the 3 missing steps.
    assert "radssl: resuming from step 3" in capsys.readouterr().out
    assert resumed.run_record["resumed_from_step"] == 3
    assert counting.calls == 3, "steps before the checkpoint must not be recomputed"

    a = load_checkpoint(uninterrupted.checkpoint)["method"]
    b = load_checkpoint(resumed.checkpoint)["method"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs after resume")
    # The metrics log holds each step once, with the same losses as the uninterrupted run.
    full_rows = (tmp_path / "full" / "metrics.csv").read_text().splitlines()
    resumed_rows = (tmp_path / "crashed" / "metrics.csv").read_text().splitlines()
    steps = [row.split(",")[0] for row in resumed_rows[1:]]
    assert steps == ["1", "2", "3", "4", "5", "6"]
    full_loss = [float(r.split(",")[2]) for r in full_rows[1:]]
    resumed_loss = [float(r.split(",")[2]) for r in resumed_rows[1:]]
    assert resumed_loss == pytest.approx(full_loss, rel=1e-6)


def test_a_registered_policy_is_chosen_from_the_config(tmp_path: Path, tiny_store: ImageStore) -> None:
    from radssl.views.batch import ViewBatch
    from radssl.views.policies import POLICIES, register_policy

    class FlippedPair(TwoViewPolicy):
        name = "flipped_pair_for_test"
        served = 0

        def __call__(self, rows, images, columns, generator) -> ViewBatch:  # noqa: ANN001
            batch = super().__call__(rows, images, columns, generator)
            type(self).served += 1
            return ViewBatch(views=[batch.views[0], batch.views[0].flip(-1)], rows=batch.rows)

    register_policy(FlippedPair)
    try:
        pretrain(_config(tmp_path, "custom", "views.policy=flipped_pair_for_test"), store=tiny_store)
    finally:
        POLICIES.pop("flipped_pair_for_test")
    assert FlippedPair.served == 6


def test_initial_backbone_is_the_starting_point_of_online_and_target_networks(tmp_path: Path,
                                                                               tiny_store: ImageStore) -> None:
    torch.manual_seed(123)
    start = build_backbone("small_cnn", image_size=16)
    # A learning rate of ~0 keeps the weights where they started, so what we read back is the starting point.
    config = _config(tmp_path, "init", "method.name=byol", "optim.lr=1e-12", "train.steps=1")
    result = pretrain(config, store=tiny_store, initial_backbone=start, initial_backbone_source="test weights")
    trained = result.method
    for key, value in start.state_dict().items():
        if value.is_floating_point() and "running" not in key:
            torch.testing.assert_close(trained.backbone.state_dict()[key], value, rtol=0, atol=1e-6)
            torch.testing.assert_close(trained.target_backbone.state_dict()[key], value, rtol=0, atol=1e-6)
    assert load_checkpoint(result.checkpoint)["initial_backbone"] == "test weights"
    default = pretrain(_config(tmp_path, "default", "method.name=byol", "optim.lr=1e-12", "train.steps=1"),
                       store=tiny_store).method
    assert not torch.equal(default.backbone.stages[0][0].weight, trained.backbone.stages[0][0].weight)


def test_volumes_with_a_2d_backbone_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    images = torch.randint(0, 255, (32, 1, 8, 16, 16), dtype=torch.uint8)
    store = ImageStore("vol", images, torch.zeros(32, dtype=torch.long), np.array(["train"] * 32),
                       np.array([""] * 32), TaskInfo("binary", 2), origin="volumes.npz")
    with pytest.raises(ConfigError, match="backbone 'small_cnn' takes 2D inputs, but the data are 3D"):
        pretrain(_config(tmp_path, "vol"), store=store)
    assert not (tmp_path / "vol").exists()


def test_different_seeds_give_different_weights(tmp_path: Path, tiny_store: ImageStore) -> None:
    a = pretrain(_config(tmp_path, "s0", "seed=0"), store=tiny_store)
    b = pretrain(_config(tmp_path, "s1", "seed=1"), store=tiny_store)
    wa = load_checkpoint(a.checkpoint)["backbone"]
    wb = load_checkpoint(b.checkpoint)["backbone"]
    assert any(not torch.equal(wa[k], wb[k]) for k in wa if wa[k].is_floating_point())


def test_checkpoint_is_self_describing_and_weights_only(tmp_path: Path, tiny_store: ImageStore) -> None:
    result = pretrain(_config(tmp_path, "run"), store=tiny_store)
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert state["step"] == 6 and state["finished"] is True
    assert state["data_fingerprint"] == tiny_store.fingerprint()
    assert state["config"]["model"]["backbone"] == "small_cnn"
    assert state["versions"]["torch"] and state["wall_time_s"] > 0 and state["seed"] == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["data_fingerprint"] == tiny_store.fingerprint() and run["steps"] == 6
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert list((tmp_path / "run" / "tensorboard").iterdir()), "TensorBoard events are written"
    # Round trip: the recorded spec rebuilds the backbone, which takes the saved weights strictly.
    spec = BackboneSpec.from_dict(state["backbone_spec"])
    assert spec.family == "small_cnn" and spec.in_channels == 1 and spec.image_size == (16, 16)
    fresh = build_from_spec(spec)
    fresh.load_state_dict(state["backbone"], strict=True)
    copy_path = tmp_path / "copy.pt"
    save_checkpoint(copy_path, state)
    again = load_checkpoint(copy_path)
    for key, value in state["backbone"].items():
        assert torch.equal(value, again["backbone"][key])


def test_config_change_in_same_folder_is_refused(tmp_path: Path, tiny_store: ImageStore) -> None:
    config = _config(tmp_path, "run")
    with pytest.raises(SimulatedCrash):
        pretrain(config, store=tiny_store, halt_after_step=3)
    changed = _config(tmp_path, "run", "optim.lr=0.1")
    with pytest.raises(CheckpointError, match="different config"):
        pretrain(changed, store=tiny_store)


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_too_few_images_for_a_batch_is_refused_before_training(tmp_path: Path, tiny_store: ImageStore) -> None:
    config = _config(tmp_path, "run", "train.batch_size=512")
    with pytest.raises(DataError, match="cannot fill one global batch"):
        pretrain(config, store=tiny_store)
    assert not (tmp_path / "run" / "checkpoints").exists(), "no partial checkpoint is left behind"


def test_nan_pixels_are_refused_with_the_sample_named() -> None:
    images = torch.zeros(4, 1, 8, 8, dtype=torch.float16)
    images[2, 0, 3, 3] = float("nan")
    with pytest.raises(DataError, match="NaN or inf pixels \\(first at sample index 2\\)"):
        ImageStore("nan-set", images, torch.zeros(4, dtype=torch.long), np.array(["train"] * 4),
                   np.array([""] * 4), TaskInfo("binary", 2), origin="scan.npz")


def test_shape_count_and_emptiness_errors_name_the_file() -> None:
    labels = torch.zeros(3, dtype=torch.long)
    split, pid, task = np.array(["train"] * 3), np.array([""] * 3), TaskInfo("binary", 2)
    with pytest.raises(DataError, match="bad.npz: images have shape \\(3, 8, 8\\)"):
        ImageStore("x", torch.zeros(3, 8, 8, dtype=torch.uint8), labels, split, pid, task, origin="bad.npz")
    with pytest.raises(DataError, match="image/label count mismatch: 3 images but 2 labels"):
        ImageStore("x", torch.zeros(3, 1, 8, 8, dtype=torch.uint8), labels[:2], split, pid, task, origin="bad.npz")
    with pytest.raises(DataError, match="holds no images"):
        ImageStore("x", torch.zeros(0, 1, 8, 8, dtype=torch.uint8), labels[:0], split[:0], pid[:0], task, origin="e.npz")
    with pytest.raises(DataError, match="label 5 is outside the declared 2 classes"):
        ImageStore("x", torch.zeros(3, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 5]), split, pid, task)


def test_volumes_train_channels_last_3d_and_reload_to_the_same_outputs(tmp_path: Path) -> None:
    from radssl.transfer.initialisation import initialise_backbone

    images = torch.randint(0, 255, (32, 1, 12, 12, 12), dtype=torch.uint8)
    store = ImageStore("vol", images, torch.zeros(32, dtype=torch.long), np.array(["train"] * 32),
                       np.array([""] * 32), TaskInfo("binary", 2), origin="volumes.npz")
    config = _config(tmp_path, "vol3d", "model.backbone=small_cnn_3d", "model.options={width: 4}",
                     "train.steps=2", "train.channels_last=true")
    result = pretrain(config, store=store)
    weight = next(p for p in result.backbone.parameters() if p.ndim == 5)
    assert weight.is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 1, 12, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(initialise_backbone(f"ssl:{result.checkpoint}").eval()(x),
                                   result.backbone.eval()(x), rtol=1e-4, atol=1e-4)
