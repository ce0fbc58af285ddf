"""Backbone initialisation: random (seeded), imagenet:<pth> (RGB→grey by summing conv1), ssl:<checkpoint>."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18, resnet50

from radssl.errors import CheckpointError, ConfigError
from radssl.models.registry import build_backbone
from radssl.models.spec import BackboneSpec
from radssl.transfer.features import normalise_for_backbone
from radssl.transfer.initialisation import adapt_first_conv, initialise_backbone, parse_spec


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny tensors: one thread beats two on a shared 2-core machine (overrides conftest's setting)."""
    torch.set_num_threads(1)


def _grey_batch(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (2, 1, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_imagenet_grey_model_matches_rgb_model_on_replicated_grey(tmp_path):
    torch.manual_seed(0)
    reference = resnet18(weights=None)
    # Non-trivial BatchNorm statistics, so eval mode really uses the loaded running mean/var.
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)

    backbone = initialise_backbone(f"imagenet:{path}", "resnet18", in_channels=1, image_size=32)
    reference.fc = torch.nn.Identity()
    reference.eval()
    backbone.eval()
    x = normalise_for_backbone(_grey_batch())
    with torch.no_grad():
        grey = backbone(x)
        rgb = reference(x.repeat(1, 3, 1, 1))
    assert grey.shape == (2, 512)
    torch.testing.assert_close(grey, rgb, atol=1e-5, rtol=1e-5)
    # ImageNet init keeps the 7×7 ImageNet stem even though 32 px would pick the small stem otherwise.
    assert backbone.net.conv1.kernel_size == (7, 7) and backbone.small_input is False


def test_adapt_first_conv_spreads_sum_over_channels():
    weight = torch.randn(4, 3, 3, 3)
    two = adapt_first_conv(weight, 2)
    torch.testing.assert_close(two.sum(dim=1), weight.sum(dim=1))
    assert torch.equal(adapt_first_conv(weight, 3), weight)


def test_imagenet_accepts_wrapped_and_ddp_prefixed_state(tmp_path):
    reference = resnet18(weights=None)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    backbone = initialise_backbone(f"imagenet:{path}", "resnet18")
    torch.testing.assert_close(backbone.net.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_imagenet_wrong_architecture_names_keys(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(resnet50(weights=None).state_dict(), path)
    expected = r"resnet50\.pth.*(unexpected keys|shape mismatches).*resnet18 vs resnet50"
    with pytest.raises(CheckpointError, match=expected):
        initialise_backbone(f"imagenet:{path}", "resnet18")


def test_missing_imagenet_file_says_how_to_get_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"resnet18-f37072fd\.pth.*imagenet:/path/to"):
        initialise_backbone(f"imagenet:{tmp_path / 'absent.pth'}", "resnet18")


def test_imagenet_rejects_small_stem_and_small_cnn(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(ConfigError, match="small_input=True"):
        initialise_backbone(f"imagenet:{path}", "resnet18", small_input=True)
    with pytest.raises(ConfigError, match="small_cnn"):
        initialise_backbone(f"imagenet:{path}", "small_cnn")


def test_not_a_state_dict_is_a_clear_error(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pth: cannot read"):
        initialise_backbone(f"imagenet:{path}", "resnet18")


def test_ssl_checkpoint_rebuilds_the_recorded_spec_not_a_guess_from_keys(tmp_path):
    torch.manual_seed(1)
    trained = build_backbone("resnet18", in_channels=1, small_input=True)
    with torch.no_grad():
        trained.net.bn1.running_mean.uniform_(-0.2, 0.2)
    x = normalise_for_backbone(_grey_batch(size=16))
    trained.eval()
    with torch.no_grad():
        expected = trained(x)
    path = tmp_path / "ssl.pt"
    torch.save({"backbone": trained.state_dict(), "backbone_spec": trained.spec.to_dict()}, path)
    loaded = initialise_backbone(f"ssl:{path}").eval()
    assert loaded.spec == trained.spec and loaded.small_input is True
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)
    # Without a recorded spec nothing is guessed from the key names: a clear error instead.
    torch.save({"backbone": trained.state_dict()}, path)
    with pytest.raises(CheckpointError, match="no usable 'backbone_spec'.*re-run pretraining"):
        initialise_backbone(f"ssl:{path}")


def test_vit_checkpoint_round_trip_by_spec(tmp_path):
    torch.manual_seed(0)
    trained = build_backbone("vit_tiny", image_size=28, options={"depth": 2}).eval()
    assert trained.spec.patch_size == 4
    path = tmp_path / "vit.pt"
    torch.save({"backbone": trained.state_dict(), "backbone_spec": trained.spec.to_dict()}, path)
    loaded = initialise_backbone(f"ssl:{path}").eval()
    x = normalise_for_backbone(_grey_batch(size=28))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x))


def test_ssl_checkpoint_mismatches_are_errors(tmp_path):
    path = tmp_path / "ssl.pt"
    backbone = build_backbone("small_cnn")
    torch.save({"backbone": backbone.state_dict(), "backbone_spec": backbone.spec.to_dict()}, path)
    assert initialise_backbone(f"ssl:{path}").name == "small_cnn"
    with pytest.raises(CheckpointError, match="'small_cnn' backbone but 'resnet18' was requested"):
        initialise_backbone(f"ssl:{path}", "resnet18")
    with pytest.raises(CheckpointError, match="in_channels=1"):
        initialise_backbone(f"ssl:{path}", in_channels=3)
    wrong = BackboneSpec("small_cnn", options={"width": 8}).to_dict()
    torch.save({"backbone": backbone.state_dict(), "backbone_spec": wrong}, path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        initialise_backbone(f"ssl:{path}")
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="no 'backbone' state dict"):
        initialise_backbone(f"ssl:{path}")
    with pytest.raises(CheckpointError, match="radssl pretrain"):
        initialise_backbone(f"ssl:{tmp_path / 'absent.pt'}")


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = initialise_backbone("random", "small_cnn", seed=3)
    b = initialise_backbone("random", "small_cnn", seed=3)
    c = initialise_backbone("random", "small_cnn", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.stages[0][0].weight, b.stages[0][0].weight)
    assert not torch.equal(a.stages[0][0].weight, c.stages[0][0].weight)
    assert initialise_backbone("random", "resnet18", image_size=28).small_input is True


@pytest.mark.parametrize("spec", ["imagenet", "pretrained:x", "random:/x"])
def test_bad_specs(spec):
    with pytest.raises(ConfigError):
        parse_spec(spec)
