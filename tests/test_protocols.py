"""Transfer protocols as plugins: the registry, each protocol's per-case outputs, and a custom protocol in a study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from radssl.errors import ConfigError
from radssl.models.registry import build_backbone
from radssl.study.config import StudyConfig, load_study_config
from radssl.study.plan import prepare_study
from radssl.study.results_store import ResultsStore
from radssl.study.runner import run_study
from radssl.transfer.features import extract_features
from radssl.transfer.protocols import (
    PROTOCOLS,
    CaseOutputs,
    EncoderInfo,
    Protocol,
    ProtocolContext,
    ProtocolOutcome,
    ProtocolParams,
    build_protocol,
    protocol_class,
    register_protocol,
)

from support import make_tiny_store

QUIET = {"log": lambda _: None}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("protocols={linaer: {}}", "unknown key 'protocols.linaer': unknown protocol 'linaer' — did you mean 'linear'?"),
        ("protocols={knn: {kk: 3}}", "unknown key 'protocols.knn.kk' — did you mean 'k'?"),
        ("protocols={finetune: {epochz: 3}}", "unknown key 'protocols.finetune.epochz' — did you mean 'epochs'?"),
        ("protocols={zero_shot: {}}", "protocols.zero_shot.prompts"),
        ("protocols={zero_shot: {prompts: {normal: x}}}", "at least 2 classes"),
        ("protocols={segmentation_finetune: {encoder_lr_scale: [0.1, 0.1]}}", "must not repeat"),
        ("protocols={linear: false}", "enable at least one protocol"),
    ],
)
def test_unknown_protocols_and_keys_are_errors_naming_them(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_study_config(None, [override])
    assert expected in str(error.value)


def test_shorthand_null_and_false_and_an_exact_round_trip() -> None:
    config = load_study_config(None, ["protocols={linear: null, knn: {k: 3}, finetune: false}"])
    assert list(config.protocols.enabled()) == ["linear", "knn"]
    assert config.protocols.finetune is None and config.protocols.zero_shot is None and config.protocols.knn.k == 3
    again = StudyConfig.model_validate(config.to_dict())
    assert again.to_dict()["protocols"] == config.to_dict()["protocols"] == {
        "linear": config.protocols.linear.model_dump(), "knn": {"k": 3, "temperature": 0.07}}
    # Frozen-feature protocols first (they share one feature extraction), then registry order.
    listed = StudyConfig.model_validate({"protocols": ["finetune", "knn", "linear"]})
    assert list(listed.protocols.enabled()) == ["linear", "knn", "finetune"]
    with pytest.raises(AttributeError):
        _ = config.protocols.not_a_protocol


def test_every_registered_protocol_declares_the_interface() -> None:
    for name in PROTOCOLS:
        cls = protocol_class(name)
        assert cls.name == name and issubclass(cls.Params, ProtocolParams)
        assert cls.metric in ("auc", "dice") and cls.case_metric in ("scores", "values")
        assert cls.task_kinds and cls.spatial_dims
        build_protocol(name, {"prompts": {"a": ["x"], "b": ["y"]}} if name == "zero_shot" else {})
    with pytest.raises(KeyError, match="did you mean 'knn'"):
        protocol_class("knm")


# --------------------------------------------------------------------------------------- per-case outputs
def _context(store, backbone, rows=None, tests=None) -> ProtocolContext:  # noqa: ANN001
    train = store.indices("train") if rows is None else rows
    cache: dict[int, torch.Tensor] = {}

    def features(s):  # noqa: ANN001, ANN202
        return cache.setdefault(id(s), extract_features(backbone, s.images))

    return ProtocolContext(backbone=backbone, encoder=EncoderInfo("random", "none"), store=store, train_rows=train,
                           val_rows=store.indices("val"), test_sets=tests or {"test": (store, store.indices("test"))},
                           full_train_rows=len(store.indices("train")), label_fraction=1.0, seed=0, run_seed=7,
                           device=torch.device("cpu"), features=features)


def test_frozen_feature_protocols_return_one_score_per_test_case_in_order() -> None:
    from radssl.transfer.knn import knn_classify

    store = make_tiny_store(n=80, size=16)
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", in_channels=1, image_size=16, options={"width": 8})
    test_rows = store.indices("test")[::-1].copy()  # a non-sorted order must be kept
    context = _context(store, backbone, tests={"test": (store, test_rows)})
    features = extract_features(backbone, store.images)
    y = store.labels[torch.from_numpy(test_rows)].numpy()
    for name in ("linear", "knn"):
        outcome = build_protocol(name, {"Cs": [1.0]} if name == "linear" else {"k": 5}).run(context)
        out = outcome.outputs["test"]
        np.testing.assert_array_equal(out.y_true, y)
        assert out.y_score.shape == (len(test_rows),) and 0.0 <= out.metrics["balanced_accuracy"] <= 1.0
    knn = build_protocol("knn", {"k": 5}).run(context).outputs["test"]
    train = torch.from_numpy(store.indices("train"))
    expected = knn_classify(features[train], store.labels[train], features[torch.from_numpy(test_rows)],
                            store.task, k=5)
    np.testing.assert_allclose(knn.y_score, expected, rtol=0, atol=0)
    linear = build_protocol("linear", {"Cs": [1.0]}).run(context)
    assert linear.records["selected_C"] == 1.0 and linear.records["val_images"] == len(store.indices("val"))
    assert roc_auc_score(y, linear.outputs["test"].y_score) > 0.9, "the bright square is linearly separable"


def test_linear_protocol_standardises_with_every_training_split_row(monkeypatch) -> None:
    """A 10-row label subset is probed with the whole training split's (label-free) feature statistics."""
    import radssl.transfer.protocols.linear as probe_module  # patched where the protocol looks it up

    store = make_tiny_store(n=80, size=16)
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", in_channels=1, image_size=16, options={"width": 8})
    train = store.indices("train")
    context = _context(store, backbone, rows=train[:10].copy())
    seen = {}
    real = probe_module.linear_probe

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_module, "linear_probe", recording)
    build_protocol("linear", {"Cs": [1.0]}).run(context)
    expected = extract_features(backbone, store.images)[torch.from_numpy(train)]
    np.testing.assert_array_equal(np.asarray(seen["standardisation_feats"]), expected.numpy())


def test_finetune_protocol_scores_every_case_and_keeps_the_best_backbone_lr_on_validation(monkeypatch) -> None:
    import radssl.transfer.protocols.finetune as finetune_module  # patched where the protocol looks it up

    store = make_tiny_store(n=64, size=16)
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", in_channels=1, image_size=16, options={"width": 8})
    calls: list[float] = []
    real = finetune_module.finetune

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = real(*args, **kwargs)
        result.val_metric = {0.5: 0.6, 1.0: 0.9}[kwargs["backbone_lr_scale"]]  # make candidate 1.0 win
        calls.append(kwargs["backbone_lr_scale"])
        return result

    monkeypatch.setattr(finetune_module, "finetune", recording)
    protocol = build_protocol("finetune", {"epochs": 2, "min_epochs": 1, "batch_size": 16,
                                           "backbone_lr_scale": [0.5, 1.0]})
    outcome = protocol.run(_context(store, backbone))
    assert calls == [0.5, 1.0] and outcome.records["backbone_lr_scale"] == 1.0 and outcome.records["val_auc"] == 0.9
    out = outcome.outputs["test"]
    assert out.y_score.shape == (len(store.indices("test")),)
    # Budget rule "full": every epoch = one pass over the whole training split, whatever the subset size.
    assert outcome.records["steps_per_epoch"] == len(store.indices("train")) // 16


# ------------------------------------------------------------------------------------- a custom protocol
class MeanIntensityParams(ProtocolParams):
    scale: float = 1.0


class MeanIntensityProtocol(Protocol):
    """Scores each case by its mean pixel value: no training, so its AUC is known from the images alone."""

    name = "mean_intensity"
    title = "mean intensity"
    Params = MeanIntensityParams
    runs: list[int] = []

    def run(self, context: ProtocolContext) -> ProtocolOutcome:
        MeanIntensityProtocol.runs.append(len(context.train_rows))
        outputs = {}
        for name, (store, rows) in context.test_sets.items():
            images = store.images[torch.from_numpy(rows)].float()
            outputs[name] = CaseOutputs(y_true=store.labels[torch.from_numpy(rows)].numpy(),
                                        y_score=self.params.scale * images.mean(dim=(1, 2, 3)).numpy() / 255.0)
        return ProtocolOutcome(outputs, {"scale": self.params.scale})


def test_a_custom_protocol_registered_in_a_test_runs_in_a_study(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PROTOCOLS, "mean_intensity", PROTOCOLS.get("mean_intensity", "unused"))
    register_protocol(MeanIntensityProtocol)  # the public way; monkeypatch restores the registry afterwards
    MeanIntensityProtocol.runs.clear()
    config = StudyConfig.model_validate({
        "name": "custom", "output_dir": str(tmp_path / "study"),
        "data": {"source": "synthetic", "n_patients": 30, "images_per_patient": 2, "image_size": 24},
        "model": {"backbone": "small_cnn", "options": {"width": 8}},
        "label_fractions": [0.5, 1.0], "seeds": [0], "bootstrap_samples": 100,
        "protocols": {"mean_intensity": {"scale": 0.5}},
    })
    with pytest.raises(ConfigError, match="unknown key 'protocols.mean_intensity.scael'"):
        load_study_config(None, ["protocols={mean_intensity: {scael: 1}}"])
    plan = prepare_study(config, **QUIET)
    output = run_study(config, **QUIET)
    with ResultsStore(output / "results.sqlite") as results:
        rows = [r for r in results.cells("custom") if r["metric"] == "auc"]
        assert len(rows) == 2 and {r["protocol"] for r in rows} == {"mean_intensity"}
        assert all(r["primary_metric"] == "auc" for r in rows)
        test_rows = plan.test_sets["test"][1]
        images = plan.store.images[torch.from_numpy(test_rows)].float().mean(dim=(1, 2, 3)).numpy()
        expected = roc_auc_score(plan.store.labels[torch.from_numpy(test_rows)].numpy(), images)
        for row in rows:
            assert row["value"] == pytest.approx(expected, abs=1e-9)
        scale = [r for r in results.cells("custom") if r["metric"] == "scale"]
        assert {r["value"] for r in scale} == {0.5}
    assert sorted(MeanIntensityProtocol.runs) == sorted(len(plan.subsets[0][f]) for f in (0.5, 1.0))
    page = (output / "report" / "report.html").read_text()
    assert "mean intensity" in page, "the report names a registered protocol by its title"


# ------------------------------------------------------------------------------------------------ zero-shot
PROMPTS = {"normal": ["The lungs are clear.", "No pulmonary nodule."],
           "finding": ["Pulmonary nodule.", "Nodular opacity in the lung."]}


def _zero_shot_study(output_dir: Path, **changes) -> StudyConfig:
    raw = {
        "name": "zs", "seed": 3, "output_dir": str(output_dir),
        "data": {"source": "synthetic", "n_patients": 32, "images_per_patient": 2, "image_size": 24, "reports": True},
        "model": {"backbone": "small_cnn", "options": {"width": 8}},
        "pretraining": [{"name": "convirt", "method": {"name": "convirt", "text_width": 32, "text_depth": 1},
                         "optim": {"lr": 0.003},
                         "train": {"steps": 12, "batch_size": 32, "accelerator": "cpu", "devices": 1,
                                   "progress_bar": False, "checkpoint_every": 6, "log_every": 4}}],
        "initialisations": ["random", "ssl:convirt"],
        "label_fractions": [0.5, 1.0], "seeds": [0, 1], "bootstrap_samples": 100,
        "protocols": {"linear": {"Cs": [1.0]}, "zero_shot": {"prompts": PROMPTS}},
    }
    raw.update(changes)
    return StudyConfig.model_validate(raw)


def test_zero_shot_is_one_label_free_row_for_image_text_encoders_only(tmp_path: Path) -> None:
    from radssl.transfer.zero_shot import ZeroShotPrompts, load_image_text_method, zero_shot_classify

    config = _zero_shot_study(tmp_path / "study")
    notes: list[str] = []
    plan = prepare_study(config, log=notes.append)
    assert any("zero_shot' skips random" in n and "not an image–text model" in n for n in notes)
    keys = plan.cell_keys()
    zero = [k for k in keys if k.protocol == "zero_shot"]
    assert [(k.init, k.label_fraction, k.seed, k.test_set) for k in zero] == [("ssl", 0.0, 3, "test")], \
        "once per image–text encoder and test set, label fraction 0, the study's seed"
    assert len(keys) == 1 + 2 * 2 * 2  # zero-shot + encoders × seeds × fractions of the linear probe
    output = run_study(config, **QUIET)
    with ResultsStore(output / "results.sqlite") as results:
        cells = {r["cell_key"]: r for r in results.cells("zs") if r["metric"] == "auc"}
        assert set(cells) == {k.key for k in keys}
        zero_cell = cells[zero[0].key]
        assert zero_cell["primary_metric"] == "auc" and zero_cell["has_predictions"]
        stored = results.predictions("zs", zero[0].key)
        assert any("uses no training labels" in n for n in results.study_notes("zs"))
    method = load_image_text_method(tmp_path / "study" / "pretraining" / "convirt" / "checkpoints" / "final.pt")
    test_rows = plan.test_sets["test"][1]
    direct = zero_shot_classify(method, plan.store, test_rows, ZeroShotPrompts(prompts=PROMPTS))
    np.testing.assert_allclose(stored.y_score, direct.scores, rtol=1e-5, atol=1e-6)
    assert zero_cell["value"] == pytest.approx(direct.metrics["auc"], abs=1e-6)
    page = (output / "report" / "report.html").read_text()
    assert "Zero-shot without any training label" in page and "no labels" in page


def test_zero_shot_without_an_image_text_encoder_or_with_wrong_classes_is_refused_before_compute(
        tmp_path: Path) -> None:
    only_random = _zero_shot_study(tmp_path / "a", initialisations=["random"], pretraining=[])
    with pytest.raises(ConfigError, match="protocols.zero_shot: zero-shot needs an image–text encoder.*random"):
        prepare_study(only_random, **QUIET)
    wrong = _zero_shot_study(tmp_path / "b", protocols={"zero_shot": {"prompts": {"healthy": ["x"], "sick": ["y"]}}})
    with pytest.raises(ConfigError, match=r"protocols.zero_shot.prompts: .*missing: \['normal', 'finding'\]"):
        prepare_study(wrong, **QUIET)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists(), "nothing written"
