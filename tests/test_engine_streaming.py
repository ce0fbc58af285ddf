"""Streamed vs resident pretraining images and the prefetcher: the data path never changes a result.

Also ``train.clip_grad`` (DINO's preset clips at 3.0, as the reference): the clip really bounds the update.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from radssl.config import load_config
from radssl.data.store import ImageStore, StoreRows
from radssl.engine.checkpoint import load_checkpoint
from radssl.engine.feed import StepViews, choose_device_cache, pretraining_images
from radssl.engine.prefetch import Prefetcher, tensors_in
from radssl.engine.pretrain import SimulatedCrash, pretrain, pretrain_rows, view_context
from radssl.views.columns import PairingColumns
from radssl.views.policies import build_policy


def _config(tmp_path: Path, name: str, *extra: str):
    return load_config(None, [
        f"output_dir={tmp_path / name}", "model.backbone=small_cnn", "train.accelerator=cpu", "train.devices=1",
        "train.steps=7", "train.batch_size=16", "train.checkpoint_every=3", "train.log_every=1",
        "train.progress_bar=false", "eval.enabled=false", "optim.optimizer=sgd", "optim.lr=0.05",
        "views.pairing.kind=patient",  # partner rows drawn from the generator: the draws must line up too
        *extra,
    ])


@pytest.fixture()
def memmap_store(tmp_path: Path, tiny_store: ImageStore) -> ImageStore:
    """The tiny store with its images in a memory-mapped ``.npy``, as the file cache serves them."""
    path = tmp_path / "images.npy"
    np.save(path, tiny_store.images.numpy())
    return replace(tiny_store, images=torch.from_numpy(np.lib.format.open_memmap(path, mode="c")))


def _weights(result) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return load_checkpoint(result.checkpoint)["method"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs: {what}"


@pytest.mark.parametrize("prefetch", [False, True])
def test_streamed_and_resident_pretraining_give_identical_weights(tmp_path: Path, memmap_store: ImageStore,
                                                                  prefetch: bool) -> None:
    # 7 steps of 16 over 72 pretraining images: crosses an epoch boundary (4 steps per epoch).
    flag = str(prefetch).lower()
    resident = pretrain(_config(tmp_path, "resident", "train.device_cache=always", "train.prefetch=false"),
                        store=memmap_store)
    streamed = pretrain(_config(tmp_path, "streamed", "train.device_cache=never", f"train.prefetch={flag}"),
                        store=memmap_store)
    _assert_same_weights(_weights(resident), _weights(streamed), f"streamed (prefetch {prefetch}) vs resident")
    record = json.loads((tmp_path / "streamed" / "run.json").read_text())
    assert record["device_cache"]["mode"] == "streamed" and record["prefetch"] is prefetch
    assert json.loads((tmp_path / "resident" / "run.json").read_text())["device_cache"]["mode"] == "resident"


def test_prefetched_resident_run_matches_the_direct_one(tmp_path: Path, tiny_store: ImageStore) -> None:
    direct = pretrain(_config(tmp_path, "direct", "train.prefetch=false"), store=tiny_store)
    prefetched = pretrain(_config(tmp_path, "prefetched", "train.prefetch=true"), store=tiny_store)
    _assert_same_weights(_weights(direct), _weights(prefetched), "prefetch on vs off")


def test_a_run_resumes_bit_for_bit_under_another_data_mode(tmp_path: Path, memmap_store: ImageStore) -> None:
    """device_cache/prefetch never change a result, so a resident run may be resumed streamed."""
    full = pretrain(_config(tmp_path, "full"), store=memmap_store)
    with pytest.raises(SimulatedCrash):
        pretrain(_config(tmp_path, "crashed", "train.device_cache=always", "train.prefetch=false"),
                 store=memmap_store, halt_after_step=4)
    resumed = pretrain(_config(tmp_path, "crashed", "train.device_cache=never", "train.prefetch=true"),
                       store=memmap_store)
    assert resumed.run_record["resumed_from_step"] == 3
    _assert_same_weights(_weights(full), _weights(resumed), "resumed streamed after a resident crash")


def _step_views(config, store: ImageStore, mode: str) -> StepViews:  # noqa: ANN001
    policy = build_policy(config.views.settings(), view_context(config, store, channels_last=True))
    rows = pretrain_rows(store, 1.0, config.seed)
    columns = PairingColumns.from_store(store, rows)
    policy.prepare(columns)
    device = torch.device("cpu")
    return StepViews(policy=policy, images=pretraining_images(store.images, rows, device, mode), columns=columns,
                     seed=config.seed, rank=0, local_batch=16, global_batch=16, steps_per_epoch=len(rows) // 16,
                     n_rows=len(rows), device=device)


@pytest.mark.parametrize("policy", ["two_view", "multi_crop"])
def test_the_prefetcher_yields_exactly_the_direct_batches(tmp_path: Path, memmap_store: ImageStore,
                                                          policy: str) -> None:
    torch.set_num_threads(2)  # the model's thread count differs from the prefetch thread's (1): same bytes anyway
    config = _config(tmp_path, "unused", f"views.policy={policy}", "method.name=dino" if policy == "multi_crop"
                     else "method.name=simclr")
    direct_views = _step_views(config, memmap_store, "resident")
    direct = [direct_views(step) for step in range(2, 11)]  # from a resume point, across two epoch boundaries
    with Prefetcher(_step_views(config, memmap_store, "streamed"), range(2, 11), torch.device("cpu")) as batches:
        prefetched = list(batches)
    assert [step for step, _ in prefetched] == list(range(2, 11))
    for expected, (step, batch) in zip(direct, prefetched):
        expected_tensors, got_tensors = list(tensors_in(expected)), list(tensors_in(batch))
        assert len(expected_tensors) == len(got_tensors) > 1
        for a, b in zip(expected_tensors, got_tensors):
            assert torch.equal(a, b), f"step {step}: a prefetched tensor differs from the direct path's"


def test_a_failure_in_the_prefetch_thread_reaches_the_loop() -> None:
    def make(step: int) -> int:
        if step == 3:
            raise ValueError("bad step 3")
        return step

    seen = []
    with pytest.raises(ValueError, match="bad step 3"):
        with Prefetcher(make, range(0, 6), torch.device("cpu")) as batches:
            for step, value in batches:
                seen.append(value)
    assert seen == [0, 1, 2]


def test_auto_streams_when_the_budget_is_tiny_and_keeps_resident_when_it_fits(tmp_path: Path,
                                                                              memmap_store: ImageStore) -> None:
    cpu = torch.device("cpu")
    assert choose_device_cache("auto", 10**6, cpu, budget_gb=1e-3).mode == "resident"  # 1 MB within 1 MB
    tiny = choose_device_cache("auto", 10**6, cpu, budget_gb=1e-9)
    assert tiny.mode == "streamed" and "over the budget" in tiny.reason
    assert choose_device_cache("auto", 10**6, cpu).mode == "resident"  # 1 MB fits half of any machine's free RAM
    result = pretrain(_config(tmp_path, "auto", "train.steps=2", "train.device_cache_budget_gb=1e-9"),
                      store=memmap_store)
    assert result.run_record["device_cache"]["mode"] == "streamed"
    assert result.run_record["device_cache"]["budget_bytes"] == 1


def test_streamed_images_read_the_store_rows_of_the_pretraining_positions(tiny_store: ImageStore) -> None:
    rows = np.array([5, 9, 2, 40])
    streamed = pretraining_images(tiny_store.images, rows, torch.device("cpu"), "streamed")
    assert isinstance(streamed, StoreRows)
    assert streamed.shape == (4, *tiny_store.images.shape[1:]) and len(streamed) == 4
    got = streamed.index_select(0, torch.tensor([3, 0, 3]))
    assert torch.equal(got, tiny_store.images[[40, 5, 40]])


def test_clip_grad_bounds_the_first_update_and_is_dinos_preset(tmp_path: Path, tiny_store: ImageStore) -> None:
    assert load_config(None, ["method.name=dino"]).train.clip_grad == 3.0  # main_dino.py --clip_grad 3.0
    assert load_config(None, ["method.name=dino", "train.clip_grad=null"]).train.clip_grad is None
    assert load_config(None, ["method.name=simclr"]).train.clip_grad is None
    clip, lr = 1e-3, 0.05

    def first_update(name: str, *extra: str) -> float:
        # SGD without momentum or weight decay: the first update is exactly -lr × gradient.
        config = _config(tmp_path, name, "train.steps=1", "optim.momentum=0", "optim.weight_decay=0",
                         "optim.warmup_fraction=0", "optim.lr_scaling=none", f"optim.lr={lr}", *extra)
        torch.manual_seed(config.seed)
        from radssl.engine.pretrain import build_pretraining_method

        before = dict(build_pretraining_method(config, tiny_store).named_parameters())
        after = _weights(pretrain(config, store=tiny_store))
        return float(torch.linalg.vector_norm(torch.stack([
            torch.linalg.vector_norm(after[key] - value.detach()) for key, value in before.items()])))

    clipped = first_update("clipped", f"train.clip_grad={clip}")
    free = first_update("free")
    assert clipped == pytest.approx(lr * clip, rel=1e-3)
    assert free > 10 * lr * clip
    header = (tmp_path / "clipped" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "grad_norm" in header


def test_bad_data_mode_keys_are_refused_naming_the_key() -> None:
    from radssl.errors import ConfigError

    with pytest.raises(ConfigError, match="train.device_cache"):
        load_config(None, ["train.device_cache=sometimes"])
    with pytest.raises(ConfigError, match="train.device_cache_budget_gb"):
        load_config(None, ["train.device_cache_budget_gb=0"])
    with pytest.raises(ConfigError, match="train.clip_grad"):
        load_config(None, ["train.clip_grad=-1"])


def test_a_checkpoint_from_before_the_new_train_keys_still_resumes(tmp_path: Path, tiny_store: ImageStore) -> None:
    from radssl.engine.checkpoint import save_checkpoint

    config = _config(tmp_path, "old", "train.steps=4", "train.checkpoint_every=2")
    with pytest.raises(SimulatedCrash):
        pretrain(config, store=tiny_store, halt_after_step=2)
    path = tmp_path / "old" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    for key in ("clip_grad", "device_cache", "device_cache_budget_gb", "prefetch", "prefetch_threads"):
        del state["config"]["train"][key]  # as written by radssl before these keys existed
    save_checkpoint(path, state)
    assert pretrain(config, store=tiny_store).run_record["resumed_from_step"] == 2
