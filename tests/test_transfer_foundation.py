"""Foundation weights as initialisations: tiny random timm / HF / torchvision / MONAI models saved in each library's
own format, loaded offline, compared with the library model itself, used for segmentation and continued SSL."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from radssl.config import ModelSection, load_config
from radssl.data.store import normalise_for_backbone
from radssl.errors import CheckpointError, ConfigError
from radssl.models.decoders import UNetDecoder
from radssl.models.foundation_weights import foundation_spec
from radssl.study.config import StudyConfig
from radssl.transfer.initialisation import initialise_backbone
from support import make_tiny_store

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _tiny_timm_vit(folder: Path) -> torch.nn.Module:
    import timm
    from timm.models._hub import save_for_hf

    args = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(MEAN), "std": tuple(STD)}
    save_for_hf(model, folder, model_args=args)
    return model.eval()


def _tiny_timm_resnet(folder: Path) -> torch.nn.Module:
    import timm
    from timm.models._hub import save_for_hf

    args = dict(layers=[1, 1, 1, 1], channels=[8, 16, 32, 64])
    model = timm.create_model("resnet18", pretrained=False, num_classes=5, **args)  # a head, dropped on load
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "mean": tuple(MEAN), "std": tuple(STD)}
    save_for_hf(model, folder, model_args=args)
    model.reset_classifier(0)
    return model.eval()


def _tiny_hf(folder: Path, kind: str) -> torch.nn.Module:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
                  image_size=32)
    model = Dinov2Model(Dinov2Config(**common)) if kind == "dinov2" else ViTModel(ViTConfig(**common),
                                                                                   add_pooling_layer=False)
    model.save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                      image_mean=MEAN, image_std=STD).save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, torch.nn.Module, Path]]:
    """init string → (init string, the library model as saved (eval), weights file)."""
    import torchvision
    from monai.networks.nets import resnet10

    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    entries: dict[str, tuple[str, torch.nn.Module, Path]] = {}
    entries["timm_vit"] = (f"timm:{root / 'vit'}", _tiny_timm_vit(root / "vit"), root / "vit" / "pytorch_model.bin")
    entries["timm_resnet"] = (f"timm:{root / 'rn'}", _tiny_timm_resnet(root / "rn"), root / "rn" / "pytorch_model.bin")
    for kind in ("dinov2", "vit"):
        folder = root / f"hf_{kind}"
        entries[f"hf_{kind}"] = (f"hf:{folder}", _tiny_hf(folder, kind), folder / "model.safetensors")
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), root / "resnet18.pth")
    tv.fc = torch.nn.Identity()
    entries["torchvision"] = (f"torchvision:resnet18:{root / 'resnet18.pth'}", tv.eval(), root / "resnet18.pth")
    net = resnet10(spatial_dims=3, n_input_channels=1, widen_factor=0.25, feed_forward=False, shortcut_type="A")
    torch.save(net.state_dict(), root / "med.pt")
    (root / "med.pt.json").write_text(json.dumps({"model_kwargs": {"widen_factor": 0.25, "shortcut_type": "A"}}))
    entries["monai"] = (f"monai:resnet10:{root / 'med.pt'}", net.eval(), root / "med.pt")
    return entries


def _library_input(pixels: torch.Tensor, size: int, mean: list[float] | None, std: list[float] | None) -> torch.Tensor:
    """What the library model is fed for grey [0, 1] pixels: resized, replicated to RGB, its own normalisation."""
    x = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False) if pixels.shape[-1] != size \
        else pixels
    x = x.expand(-1, 3, -1, -1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


CASES_2D = {"timm_vit": (32, MEAN, STD), "timm_resnet": (32, MEAN, STD), "hf_dinov2": (32, MEAN, STD),
            "hf_vit": (32, MEAN, STD),
            "torchvision": (224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}


@pytest.mark.parametrize("name", sorted(CASES_2D))
def test_grey_images_give_the_library_models_features_on_its_own_input(zoo, name: str) -> None:  # noqa: ANN001
    text, library_model, weights = zoo[name]
    size, mean, std = CASES_2D[name]
    backbone = initialise_backbone(text, in_channels=1, image_size=(28, 28)).eval()
    pixels = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        ours = backbone(normalise_for_backbone(pixels))
        out = library_model(_library_input(pixels, size, mean, std)) if not name.startswith("hf") else None
        if out is None:  # transformers: the normed class token
            out = library_model(pixel_values=_library_input(pixels, size, mean, std)).last_hidden_state[:, 0]
    assert ours.shape == (3, backbone.feature_dim)
    torch.testing.assert_close(ours, out, atol=1e-5, rtol=1e-4)
    record = backbone.provenance
    assert record["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["input_size"] == [size, size] and record["mean"] == pytest.approx(mean)
    if name == "torchvision":
        assert record["dropped_keys"] == ["fc.* (2 keys)"]  # the ImageNet classifier, listed


def test_monai_3d_weights_load_and_keep_radssl_normalisation(zoo) -> None:  # noqa: ANN001
    text, library_model, _ = zoo["monai"]
    backbone = initialise_backbone(text, in_channels=1, image_size=(12, 16, 16)).eval()
    volumes = torch.randn(2, 1, 12, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(backbone(volumes), library_model(volumes))
    maps = backbone.forward_features(volumes)
    assert [m.shape[1] for m in maps] == list(backbone.feature_channels)


@pytest.mark.parametrize("name", ["timm_vit", "timm_resnet", "hf_dinov2", "torchvision"])
def test_multi_scale_features_feed_the_unet_decoder(zoo, name: str) -> None:  # noqa: ANN001
    backbone = initialise_backbone(zoo[name][0], in_channels=1, image_size=(28, 28)).eval()
    images = torch.randn(2, 1, 28, 28)
    maps = backbone.forward_features(images)
    assert [m.shape[1] for m in maps] == list(backbone.feature_channels)
    decoder = UNetDecoder(backbone.feature_channels, backbone.feature_strides, out_channels=3)
    assert decoder(maps, (28, 28)).shape == (2, 3, 28, 28)


def test_torchvision_vit_says_segmentation_is_not_supported(tmp_path: Path) -> None:
    import torchvision

    small = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                                 hidden_dim=32, mlp_dim=32)
    torch.save(small.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="shape mismatches: .*class_token"):  # not a ViT-B/16 file
        initialise_backbone(f"torchvision:vit_b_16:{tmp_path / 'vit.pth'}", in_channels=1, image_size=(32, 32))
    from radssl.models.registry import build_from_spec

    spec = foundation_spec(f"torchvision:vit_b_16:{tmp_path / 'vit.pth'}", 1, (32, 32))
    backbone = build_from_spec(spec)
    with pytest.raises(ValueError, match="not supported for torchvision ViTs"):
        backbone.forward_features(torch.randn(1, 1, 32, 32))


def test_key_and_shape_mismatches_are_listed_and_nothing_loads(zoo, tmp_path: Path) -> None:  # noqa: ANN001
    import timm

    state = torch.load(zoo["timm_vit"][2], weights_only=True)
    state["blocks.0.attn.qkv.renamed"] = state.pop("blocks.0.attn.qkv.weight")
    folder = tmp_path / "broken"
    shutil.copytree(zoo["timm_vit"][2].parent, folder)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as error:
        initialise_backbone(f"timm:{folder}", in_channels=1, image_size=(32, 32))
    assert "missing keys: blocks.0.attn.qkv.weight" in str(error.value)
    assert "unexpected keys: blocks.0.attn.qkv.renamed" in str(error.value)

    torch.save(timm.create_model("resnet34", num_classes=0).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CheckpointError, match="unexpected keys: layer1.2"):
        initialise_backbone(f"torchvision:resnet18:{tmp_path / 'r34.pth'}", in_channels=1, image_size=(32, 32))

    hf = tmp_path / "hf"
    shutil.copytree(zoo["hf_dinov2"][2].parent, hf)
    config = json.loads((hf / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the file holds 2 layers
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing keys: .*2"):
        initialise_backbone(f"hf:{hf}", in_channels=1, image_size=(32, 32))


def test_missing_files_say_what_to_place_where(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"place the model folder at .*rad-dino.*save_pretrained"):
        initialise_backbone(f"hf:{tmp_path / 'rad-dino'}", in_channels=1, image_size=(32, 32))
    with pytest.raises(CheckpointError, match=r"place the weights file at .*r50\.pth"):
        initialise_backbone(f"torchvision:resnet50:{tmp_path / 'r50.pth'}", in_channels=1, image_size=(32, 32))
    with pytest.raises(ConfigError, match="does not say its architecture"):
        initialise_backbone(f"torchvision:{tmp_path / 'r50.pth'}", in_channels=1, image_size=(32, 32))


def test_patch_size_and_channel_constraints_are_checked(zoo) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="not a multiple of the patch size 8"):
        foundation_spec(zoo["hf_dinov2"][0], 1, (32, 32), input_size=[30, 30])
    with pytest.raises(ConfigError, match="only 1-channel data are adapted"):
        foundation_spec(zoo["timm_vit"][0], 2, (32, 32))


def test_configs_accept_foundation_weights_and_refuse_contradictions(zoo) -> None:  # noqa: ANN001
    text = zoo["hf_dinov2"][0]
    assert ModelSection(weights=text).backbone == "hf"
    with pytest.raises(ValueError, match="conflicts with weights"):
        ModelSection(backbone="resnet50", weights=text)
    with pytest.raises(ValueError, match="only input_size"):
        ModelSection(weights=text, options={"depth": 2})
    study = StudyConfig(initialisations=["random", text, zoo["torchvision"][0]], protocols=["linear"])
    assert [s.kind for s in study.init_specs()] == ["random", "hf", "torchvision"]
    with pytest.raises(ValueError, match="does not say its architecture"):
        StudyConfig(initialisations=["torchvision:/models/r50.pth"])
    with pytest.raises(ValueError, match=r"clashing cell names \['hf\(model\)'\]"):
        StudyConfig(initialisations=["hf:/a/model", "hf:/b/model"])


def test_continued_ssl_starts_from_the_foundation_weights_and_rebuilds_without_them(zoo, tmp_path: Path) -> None:  # noqa: ANN001
    from radssl.engine.pretrain import pretrain

    folder = tmp_path / "vit-copy"
    shutil.copytree(Path(zoo["timm_vit"][0][len("timm:"):]), folder)
    config = load_config(None, [
        f"output_dir={tmp_path / 'run'}", f"model.weights=timm:{folder}", "method.name=simclr",
        "train.accelerator=cpu", "train.devices=1", "train.steps=2", "train.batch_size=8", "train.log_every=1",
        "train.progress_bar=false", "eval.enabled=false", "optim.optimizer=sgd", "optim.lr=1e-12",
        "optim.weight_decay=0.0"])
    store = make_tiny_store(n=32, size=16)
    result = pretrain(config, store=store)
    state = torch.load(result.checkpoint, weights_only=False)
    assert state["initial_backbone"].startswith(f"timm:{folder} (sha256 ")
    assert state["backbone_spec"]["family"] == "timm"
    loaded = initialise_backbone(f"timm:{folder}", in_channels=1, image_size=(16, 16))
    for key, value in loaded.state_dict().items():  # lr ≈ 0: the run started from (and kept) the foundation weights
        torch.testing.assert_close(state["backbone"][key], value)
    shutil.rmtree(folder)  # the checkpoint's spec rebuilds the network without the original folder
    rebuilt = initialise_backbone(f"ssl:{result.checkpoint}").eval()
    images = normalise_for_backbone(store.images[:4])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), loaded.eval()(images))


def test_bring_your_own_model_example_config_validates() -> None:
    from radssl.study.config import load_study_config

    config = load_study_config(Path(__file__).parents[1] / "configs" / "bring_your_own_model.yaml")
    assert [s.kind for s in config.init_specs()] == ["random", "hf", "torchvision", "ssl"]
    run = config.pretraining_run("rad-dino-dino")
    assert run.model is not None and run.model.backbone == "hf" and run.model.weights == "hf:models/rad-dino"


def test_clip_style_folder_gives_its_vision_tower_and_lists_the_text_tower_as_dropped(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(3)
    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
                 image_size=32)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    model = CLIPModel(CLIPConfig(vision_config=tower, text_config=text, projection_dim=16)).eval()
    model.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN,
                       image_std=STD).save_pretrained(tmp_path / "clip")
    backbone = initialise_backbone(f"hf:{tmp_path / 'clip'}", in_channels=1, image_size=(32, 32)).eval()
    pixels = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = model.vision_model(pixel_values=_library_input(pixels, 32, MEAN, STD)).pooler_output
        torch.testing.assert_close(backbone(normalise_for_backbone(pixels)), expected, atol=1e-5, rtol=1e-4)
    assert any(k.startswith("text_model.") for k in backbone.provenance["dropped_keys"])
    assert "zero-shot" in backbone.provenance["text_tower"]
    assert [m.shape[-1] for m in backbone.forward_features(torch.randn(1, 1, 32, 32))] == [4, 4]


def test_a_study_reads_out_a_foundation_init_beside_random(zoo, tmp_path: Path) -> None:  # noqa: ANN001
    """A foundation init in a study is an encoder of its own (no pretraining job), checked before compute, read out
    like any other, and its cells carry the foundation's run name."""
    from radssl.study.config import StudyConfig
    from radssl.study.plan import prepare_study
    from radssl.study.results_store import ResultsStore
    from radssl.study.runner import run_study

    init = zoo["hf_dinov2"][0]
    raw = {"name": "fm", "output_dir": str(tmp_path / "study"),
           "data": {"source": "synthetic", "n_patients": 30, "images_per_patient": 2, "image_size": 24},
           "model": {"backbone": "small_cnn"}, "initialisations": ["random", init], "label_fractions": [1.0],
           "seeds": [0], "protocols": {"linear": {"Cs": [1.0]}}, "bootstrap_samples": 100}
    plan = prepare_study(StudyConfig.model_validate(raw), log=lambda _: None)
    assert [e.init for e in plan.encoders] == ["random", "hf"] and not plan.jobs
    output = run_study(StudyConfig.model_validate(raw), log=lambda _: None)
    with ResultsStore(output / "results.sqlite") as store:
        rows = [r for r in store.cells("fm") if r["metric"] == "auc"]
    assert {r["init"] for r in rows} == {"random", "hf"}
    assert all(0.0 <= r["value"] <= 1.0 for r in rows if r["init"] == "hf") and len(rows) == 2
    broken = dict(raw, initialisations=["random", f"hf:{tmp_path / 'missing'}"])
    with pytest.raises(Exception, match="missing"):  # refused before compute, naming the folder
        prepare_study(StudyConfig.model_validate(broken), log=lambda _: None)
