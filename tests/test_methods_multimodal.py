"""ConVIRT and CLIP-style pretraining: the loss against a hand-written reference, matched vs shuffled pairs, reports
missing or shared, the image_text policy, training through the engine, and checkpoints that re-embed text exactly.
Gathering across two processes: tests/test_methods_multimodal_ddp.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from radssl.config import PretrainConfig, load_config
from radssl.data.synthetic import SyntheticSpec, make_synthetic_store
from radssl.engine.pretrain import check_pretraining, pretrain
from radssl.errors import ConfigError, DataError
from radssl.methods.image_text import image_text_loss
from radssl.methods.registry import build_method
from radssl.models.registry import build_from_spec, make_spec
from radssl.transfer.zero_shot import load_image_text_method
from radssl.views.augment import AugmentationParams
from radssl.views.columns import PairingColumns
from radssl.views.image_text import TOKENIZER_KEY, tokenizer_from_tensor
from radssl.views.policies import PolicyContext, ViewSettings, build_policy


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------- the loss
def reference_loss(image: torch.Tensor, text: torch.Tensor, scale: float, weight: float,
                   has_text: list[bool] | None = None, ids: list[int] | None = None) -> float:
    """ConVIRT's loss written out with loops: −log of the pair's share of exp(scale·cos) over the allowed columns."""
    n = image.shape[0]
    has_text = has_text or [True] * n
    ids = ids if ids is not None else list(range(n))
    u = [image[i] / image[i].norm() for i in range(n)]
    v = [text[i] / text[i].norm() for i in range(n)]
    pairs = [i for i in range(n) if has_text[i]]
    total_it = total_ti = 0.0
    for i in pairs:
        allowed = [j for j in pairs if j == i or ids[j] != ids[i]]
        it = sum(math.exp(scale * float(u[i] @ v[j])) for j in allowed)
        ti = sum(math.exp(scale * float(v[i] @ u[j])) for j in allowed)
        total_it += -math.log(math.exp(scale * float(u[i] @ v[i])) / it)
        total_ti += -math.log(math.exp(scale * float(v[i] @ u[i])) / ti)
    return weight * total_it / len(pairs) + (1 - weight) * total_ti / len(pairs)


def _embeddings(n: int = 6, dim: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator), torch.randn(n, dim, generator=generator)


@pytest.mark.parametrize("scale, weight", [(10.0, 0.75), (1 / 0.07, 0.5), (2.0, 0.0), (3.0, 1.0)])
def test_loss_equals_a_hand_written_reference(scale: float, weight: float) -> None:
    image, text = _embeddings()
    loss, _, _ = image_text_loss(image, text, scale, weight)
    assert float(loss) == pytest.approx(reference_loss(image, text, scale, weight), rel=1e-5)


def test_loss_skips_rows_without_text_and_keeps_identical_reports_out_of_the_negatives() -> None:
    image, text = _embeddings(8)
    has_text = [True, True, False, True, True, True, False, True]
    ids = [0, 1, 2, 0, 3, 1, 4, 5]  # rows 0/3 and 1/5 carry identical reports
    loss, it, ti = image_text_loss(image, text, 10.0, 0.75, torch.tensor(has_text), torch.tensor(ids))
    assert float(loss) == pytest.approx(reference_loss(image, text, 10.0, 0.75, has_text, ids), rel=1e-5)
    assert float(loss) == pytest.approx(0.75 * float(it) + 0.25 * float(ti), rel=1e-6)
    # A row without text is neither anchor nor negative: changing its embeddings changes nothing.
    moved_image, moved_text = image.clone(), text.clone()
    moved_image[2] += 5.0
    moved_text[6] -= 3.0
    again, _, _ = image_text_loss(moved_image, moved_text, 10.0, 0.75, torch.tensor(has_text), torch.tensor(ids))
    assert float(again) == pytest.approx(float(loss), rel=1e-6)
    none, _, _ = image_text_loss(image, text, 10.0, 0.75, torch.zeros(8, dtype=torch.bool))
    assert float(none) == 0.0 and torch.isfinite(none)


def test_matched_pairs_give_a_lower_loss_than_shuffled_ones() -> None:
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(16, 32, generator=generator)
    text = image + 0.3 * torch.randn(16, 32, generator=generator)  # report i describes image i
    shuffled = text[torch.randperm(16, generator=generator)]
    for weight in (0.75, 0.5):
        matched, _, _ = image_text_loss(image, text, 10.0, weight)
        wrong, _, _ = image_text_loss(image, shuffled, 10.0, weight)
        assert float(matched) < float(wrong) - 1.0


# --------------------------------------------------------------------------------------------- policy
def _reports_store(n_patients: int = 24, size: int = 24, **spec) -> object:
    return make_synthetic_store(SyntheticSpec(n_patients=n_patients, images_per_patient=2, image_size=size,
                                              reports=True, **spec))


def _policy(store, rows: np.ndarray | None = None, **params):  # noqa: ANN001, ANN202
    settings = ViewSettings(policy="image_text", augment=AugmentationParams(hflip_p=0.0), params=params)
    policy = build_policy(settings, PolicyContext(store.image_shape, store.image_shape))
    columns = PairingColumns.from_store(store, np.arange(len(store)) if rows is None else rows)
    return policy, columns, policy.prepare(columns)


def test_image_text_policy_tokenises_once_and_hands_over_the_tokenizer() -> None:
    store = _reports_store()
    policy, columns, scalars = _policy(store, image_views=2, max_length=16)
    assert scalars["report_coverage"] == 1.0 and scalars["reports_missing"] == 0.0
    assert scalars["reports_truncated"] > 0, "synthetic reports are longer than 16 tokens"
    rows = torch.tensor([0, 1, 2, 7])
    batch = policy(rows, store.images, columns, torch.Generator().manual_seed(0))
    assert len(batch.views) == 2 and batch.views[0].shape == (4, 1, 24, 24)
    assert batch.text["input_ids"].shape[1] <= 16 and batch.has_text.all()
    reports = [str(r).strip() for r in store.meta["report"][rows.numpy()]]
    expected = policy.tokenizer.encode(reports)
    width = batch.text["input_ids"].shape[1]
    assert torch.equal(batch.text["input_ids"], expected.input_ids[:, :width])
    assert (batch.text["report_id"][0] == batch.text["report_id"][1]) == (reports[0] == reports[1])
    assert tokenizer_from_tensor(batch.extras[TOKENIZER_KEY]).fingerprint == policy.tokenizer.fingerprint
    again = policy(rows, store.images, columns, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batch.views, again.views)), "same seed, same views"


def _with_missing_reports(store, missing: np.ndarray):  # noqa: ANN001, ANN202
    reports = np.asarray(store.meta["report"]).copy()
    reports[missing] = ""
    store.meta["report"] = reports
    return store


def test_missing_reports_are_dropped_or_used_for_the_image_term_only() -> None:
    missing = np.array([1, 3, 4])
    store = _with_missing_reports(_reports_store(), missing)
    rows = torch.tensor([0, 1, 2, 3, 4, 5])
    policy, columns, scalars = _policy(store, missing_report="drop")
    assert scalars["reports_missing"] == 3.0 and scalars["report_coverage"] == pytest.approx(1 - 3 / 48)
    batch = policy(rows, store.images, columns, torch.Generator().manual_seed(0))
    assert batch.has_text.all() and not set(batch.rows.tolist()) & set(missing.tolist()), "dropped: replaced"
    assert batch.rows[[0, 2, 5]].tolist() == [0, 2, 5]
    policy, columns, _ = _policy(store, missing_report="image_only", image_views=2)
    batch = policy(rows, store.images, columns, torch.Generator().manual_seed(0))
    assert torch.equal(batch.rows, rows) and batch.has_text.tolist() == [True, False, True, False, False, True]


def test_data_without_reports_is_an_error_before_compute() -> None:
    store = make_synthetic_store(SyntheticSpec(n_patients=8, images_per_patient=2, image_size=24))
    with pytest.raises(DataError, match="carry no reports.*data.reports: true"):
        _policy(store)
    empty = _with_missing_reports(_reports_store(8), np.arange(16))
    with pytest.raises(DataError, match="none of the 16 pretraining images has a report"):
        _policy(empty)


# --------------------------------------------------------------------------------------------- through the engine
def _config(tmp_path: Path, method: dict, views: dict | None = None, steps: int = 12, **data) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "data": {"source": "synthetic", "n_patients": 32, "images_per_patient": 2, "image_size": 24,
                 "reports": True, **data},
        "model": {"backbone": "small_cnn", "options": {"width": 8}},
        "method": method,
        "views": views or {},
        "optim": {"lr": 0.003},
        "train": {"steps": steps, "batch_size": 32, "log_every": 1, "checkpoint_every": 6, "progress_bar": False,
                  "accelerator": "cpu", "devices": 1},
        "eval": {"enabled": False},
    })


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.csv").read_text().splitlines()
    column = lines[0].split(",").index("loss")
    return [float(line.split(",")[column]) for line in lines[1:]]


@pytest.mark.parametrize("method", [{"name": "convirt", "text_width": 32, "text_depth": 1},
                                    {"name": "clip", "text_width": 32, "text_depth": 1, "image_loss": "simclr",
                                     "image_loss_weight": 0.5}])
def test_methods_train_and_their_checkpoint_re_embeds_text_exactly(tmp_path: Path, method: dict) -> None:
    views = {"image_views": 2} if method.get("image_loss") else {}
    config = _config(tmp_path, method, views)
    assert config.views.policy == "image_text" and config.views.hflip_p == 0.0, "the method's preset applies"
    store = make_synthetic_store(SyntheticSpec(n_patients=32, images_per_patient=2, image_size=24, reports=True))
    result = pretrain(config, store=store)
    losses = _losses(tmp_path / "run")
    assert all(math.isfinite(x) for x in losses) and np.mean(losses[-4:]) < np.mean(losses[:4])
    state = torch.load(result.checkpoint, weights_only=True)
    saved = state["method"]["text_encoder._extra_state"]["tokenizer"]
    policy, _, _ = _policy(store, store.pretrain_indices())
    assert saved == policy.tokenizer.to_json(), "the checkpoint carries the tokenizer the views used (train split)"
    reloaded = load_image_text_method(result.checkpoint)
    texts = ["Left upper zone nodule, small.", "The lungs are clear.", "a word never seen: pneumomediastinum"]
    torch.testing.assert_close(reloaded.embed_texts(texts), result.method.embed_texts(texts), rtol=0, atol=0)
    images = store.images[:4]
    from radssl.transfer.zero_shot import embed_images

    # Not bit-exact: the trained model is in channels-last memory format (engine default), the reloaded one is not,
    # and the two layouts run different convolution kernels.
    torch.testing.assert_close(embed_images(reloaded, images), embed_images(result.method, images), rtol=1e-5,
                               atol=1e-6)
    # Every other transfer protocol (and a study's ``ssl:<checkpoint>`` initialisation) gets the image encoder.
    from radssl.transfer.initialisation import initialise_backbone

    encoder = initialise_backbone(f"ssl:{result.checkpoint}").eval()
    x = torch.randn(3, 1, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), result.backbone.eval()(x), rtol=1e-5, atol=1e-6)


def test_clip_logit_scale_keeps_its_gradient_above_the_bound_and_is_clamped_after_the_step() -> None:
    """The bound sits on the parameter after the step (OpenCLIP), not in forward, where it would cut the gradient."""
    store = _reports_store()
    policy, columns, _ = _policy(store)
    backbone = build_from_spec(make_spec("small_cnn", 1, (24, 24), None, None, spatial_dims=2, options={"width": 8}))
    method = build_method("clip", backbone, {"text_width": 16, "text_depth": 1})
    batch = policy(torch.arange(8), store.images, columns, torch.Generator().manual_seed(0))
    with torch.no_grad():
        method.log_logit_scale.fill_(math.log(200.0))  # past the bound, e.g. after a large step
    assert float(method.logit_scale().detach()) == pytest.approx(200.0), "forward uses the parameter as it is"
    method(batch)["loss"].backward()
    assert method.log_logit_scale.grad is not None and float(method.log_logit_scale.grad.abs()) > 0, \
        "the scale must keep a gradient above the bound, or it could never come back down"
    method.after_optimizer_step()
    assert float(method.log_logit_scale) == pytest.approx(math.log(100.0))
    with torch.no_grad():
        method.log_logit_scale.fill_(-1.0)
    method.after_optimizer_step()
    assert float(method.log_logit_scale) == 0.0, "OpenCLIP's lower bound: scale >= 1"


def test_the_engine_applies_the_methods_post_step_constraint(tmp_path: Path) -> None:
    # Initial scale 1/0.07 ≈ 14.3, bound 1.5: one engine step must leave the parameter at the bound.
    config = _config(tmp_path, {"name": "clip", "text_width": 16, "text_depth": 1, "max_logit_scale": 1.5}, steps=1)
    store = make_synthetic_store(SyntheticSpec(n_patients=32, images_per_patient=2, image_size=24, reports=True))
    result = pretrain(config, store=store)
    assert float(result.method.log_logit_scale) == pytest.approx(math.log(1.5))


def test_resume_refuses_other_reports_and_views_that_tokenise_differently(tmp_path: Path) -> None:
    from dataclasses import replace

    from radssl.engine.pretrain import SimulatedCrash
    from radssl.errors import CheckpointError

    method = {"name": "convirt", "text_width": 32, "text_depth": 1}
    config = _config(tmp_path, method, steps=8)
    store = make_synthetic_store(SyntheticSpec(n_patients=32, images_per_patient=2, image_size=24, reports=True))
    with pytest.raises(SimulatedCrash):
        pretrain(config, store=store, halt_after_step=6)
    edited = dict(store.meta, report=np.char.add(store.meta["report"], " Pneumothorax remains unchanged."))
    with pytest.raises(CheckpointError, match="different data"):  # the reports are part of the data fingerprint
        pretrain(config, store=replace(store, meta=edited, _fingerprint=None))
    # A method whose text encoder learnt one vocabulary refuses batches tokenised with another.
    trained = load_image_text_method(tmp_path / "run" / "checkpoints" / "last.pt")
    other = replace(store, meta=edited, _fingerprint=None)
    policy, columns, _ = _policy(other, other.pretrain_indices())
    batch = policy(torch.arange(4), other.images[torch.from_numpy(other.pretrain_indices())], columns,
                   torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="different vocabulary"):
        trained(batch)


def test_image_only_term_needs_two_views_and_the_error_names_both(tmp_path: Path) -> None:
    config = _config(tmp_path, {"name": "convirt", "image_loss": "simclr"})
    store = _reports_store(32)
    with pytest.raises(ConfigError, match="method 'convirt' does not fit view policy 'image_text'.*needs 2 views"):
        check_pretraining(config, store)
    with pytest.raises(ConfigError, match="needs report text"):
        check_pretraining(_config(tmp_path, {"name": "convirt"}, {"policy": "two_view"}), store)


def test_config_keys_are_validated() -> None:
    with pytest.raises(ConfigError, match="missing_report"):
        load_config(None, ["method.name=convirt", "views.missing_report=ignore"])
    with pytest.raises(ConfigError, match="temperature"):
        load_config(None, ["method.name=convirt", "method.temperature=0"])
    config = load_config(None, ["method.name=clip", "views.max_length=32", "data.source=synthetic",
                                "data.reports=true"])
    assert config.views.policy_params()["max_length"] == 32 and config.data.reports is True


def test_scratch_encoder_refuses_a_tokenizer_larger_than_its_embedding() -> None:
    store = _reports_store()
    policy, columns, _ = _policy(store, min_frequency=1)
    backbone = build_from_spec(make_spec("small_cnn", 1, (24, 24), None, None, spatial_dims=2, options={"width": 8}))
    method = build_method("convirt", backbone, {"text_vocab_size": 20, "text_width": 16, "text_depth": 1})
    batch = policy(torch.arange(4), store.images, columns, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=r"embeds only 20 — set method.text_vocab_size >= \d+"):
        method(batch)
