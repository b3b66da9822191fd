"""DVBPR (Kang et al. 2017): a CNN Φ trained end to end with the recommender, ŷ_ui = θ_uᵀ Φ(x_i).

Φ is one of two CNNs (``recommender.dvbpr.cnn``):

* ``backbone`` (default): the configured ImageNet backbone (EfficientNet-Lite0 by default)
  followed by a linear projection to K, fine-tuned jointly with θ at the data's image size.
  Only the last ``recommender.dvbpr.train_blocks`` blocks (and EfficientNet's 1x1 head conv) train; the
  stem and the earlier blocks keep their ImageNet weights, and every BatchNorm keeps its
  ImageNet statistics (a step sees a few hundred items, and eval-mode BN makes Φ the same
  function in training, at encode time and under attack). Because the frozen prefix is a
  fixed function of the clean image, ``fit`` runs it once per item and trains on its cached
  output, so a step costs only the trainable suffix (on Lite0 at 64 px the last blocks run on
  a 2 x 2 map; cost per block count in docs/results/dvbpr.md). The pretrained weights train at
  ``recommender.dvbpr.backbone_lr_mult`` x the lr of θ and of the projection, so that the ImageNet
  features are adapted rather than overwritten: with one lr of 1e-2 for θ and the block, the
  pairwise loss stayed at ln 2 for two epochs (docs/results/dvbpr.md).
* ``small``: four stride-2 conv blocks of width w, 2w, 4w, 4w + global pooling + a linear
  map to K, trained from scratch (Kang et al.'s CNN-F is ~40 M parameters; this one trains
  in a minute on a CPU but reaches only BPR-level accuracy on the default data).

Per step, Φ runs once on the *distinct* items of the batch's triples. After training,
``item_visual`` caches Φ of the clean catalogue, and ``encode`` is the differentiable image →
Φ path that the attacks use: they attack DVBPR through its own (whole) CNN.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from vars_fast.backbones import build_backbone
from vars_fast.config import BackboneConfig
from vars_fast.distributed import ddp
from vars_fast.recommenders.base import Recommender, sq, train_bpr
from vars_fast.registry import RECOMMENDERS

# Above this many bytes the frozen prefix's output is recomputed per batch instead of cached.
_PREFIX_CACHE_BYTES = 2 << 30


class _Scaled(nn.Module):
    """``w = s * w_stored``. Adam's step does not depend on the gradient's scale, so a weight
    stored as ``w / s`` moves ``s`` times as fast as the others under the same optimizer: a
    per-parameter learning-rate multiplier for a training loop that has a single lr."""

    def __init__(self, s: float):
        super().__init__()
        self.s = float(s)

    def forward(self, w: Tensor) -> Tensor:
        return w * self.s

    def right_inverse(self, w: Tensor) -> Tensor:
        return w / self.s


@contextlib.contextmanager
def lr_multiplier(modules: list[nn.Module], mult: float):
    """Within the block, the trainable parameters of ``modules`` train at ``mult`` x the lr
    (see ``_Scaled``); afterwards they are plain parameters again, holding the trained values."""
    if mult == 1.0:
        yield
        return
    done: list[tuple[nn.Module, str]] = []
    try:
        # listed first: registering adds modules (the parametrizations) to the tree
        targets = [(m, name) for root in modules for m in root.modules()
                   for name, p in m.named_parameters(recurse=False) if p.requires_grad]
        for m, name in targets:
            parametrize.register_parametrization(m, name, _Scaled(mult))
            done.append((m, name))
        yield
    finally:
        for m, name in done:
            parametrize.remove_parametrizations(m, name, leave_parametrized=True)


class SmallCNN(nn.Module):
    """[B,3,S,S] in [0,1] -> [B, k]; normalises its own input like the backbones do."""

    def __init__(self, width: int = 32, k: int = 64, input_size: int = 0):
        super().__init__()
        self.input_size = int(input_size)
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], k)

    def prefix(self, x: Tensor) -> Tensor:
        """The parameter-free part: area downsampling (differentiable, alias-free for integer
        factors) and normalisation."""
        if self.input_size and x.shape[-1] > self.input_size:
            x = F.adaptive_avg_pool2d(x, self.input_size)
        return (x - 0.5) / 0.25

    def suffix(self, h: Tensor) -> Tensor:
        return self.head(self.body(h).mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.suffix(self.prefix(x))

    def trainable_parameters(self):
        return list(self.parameters())

    def backbone_modules(self) -> list[nn.Module]:
        return []

    def dense_parameters(self):
        return list(self.parameters())


class BackboneCNN(nn.Module):
    """A pretrained ``Backbone`` trunk + ``Linear(feature_dim, k)``: [B,3,S,S] in [0,1] -> [B, k].

    The trunk is split into a frozen prefix (input normalisation, stem, all blocks but the last
    ``train_blocks``) and a trainable suffix (those blocks, EfficientNet's head conv, the
    global pool, the projection). The trunk stays in eval mode (``Backbone.frozen``), so its
    BatchNorm statistics are ImageNet's while the suffix's weights train.
    """

    def __init__(self, trunk: nn.Module, k: int, train_blocks: int):
        super().__init__()
        self.trunk = trunk
        self.proj = nn.Linear(int(trunk.feature_dim), int(k))
        blocks = self._blocks()
        self.split = max(0, len(blocks) - int(train_blocks))
        trunk.frozen = True  # Backbone.train() then keeps eval mode
        trunk.eval().requires_grad_(False)
        for p in self._suffix_trunk_parameters():
            p.requires_grad_(True)

    def _blocks(self) -> list[nn.Module]:
        n = self.trunk.net
        if self.trunk.is_resnet:
            return [b for layer in (n.layer1, n.layer2, n.layer3, n.layer4) for b in layer]
        return list(n._blocks)

    def backbone_modules(self) -> list[nn.Module]:
        """The pretrained modules that train: the last blocks and EfficientNet's head conv + BN."""
        mods = self._blocks()[self.split:]
        if not self.trunk.is_resnet:
            mods += [self.trunk.net._conv_head, self.trunk.net._bn1]
        return mods

    def _suffix_trunk_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.backbone_modules() for p in m.parameters()]

    def prefix(self, x: Tensor) -> Tensor:
        t, n = self.trunk, self.trunk.net
        x = t._prep(x)
        x = n.maxpool(n.relu(n.bn1(n.conv1(x)))) if t.is_resnet else n._swish(n._bn0(n._conv_stem(x)))
        for b in self._blocks()[:self.split]:
            x = b(x)
        return x

    def suffix(self, h: Tensor) -> Tensor:
        n = self.trunk.net
        for b in self._blocks()[self.split:]:
            h = b(h)
        if not self.trunk.is_resnet:
            h = n._swish(n._bn1(n._conv_head(h)))
        return self.proj(h.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.suffix(self.prefix(x))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self._suffix_trunk_parameters() + list(self.proj.parameters())

    def dense_parameters(self) -> list[nn.Parameter]:
        # L2 on the projection only: the pretrained blocks' prior is their ImageNet weights, not 0
        return list(self.proj.parameters())


@RECOMMENDERS.register()
class DVBPR(Recommender):
    name = "DVBPR"
    uses_images = True
    train_order = 4

    @classmethod
    def from_config(cls, n_users, n_items, rc, backbone=None, feature_dim=None):
        """``recommender.dvbpr.cnn=backbone`` fine-tunes ``backbone``, which must be given."""
        if rc.dvbpr.cnn == "backbone" and backbone is None:
            raise ValueError("DVBPR with recommender.dvbpr.cnn=backbone needs the backbone to fine-tune")
        return cls(n_users, n_items, k=rc.k, width=rc.dvbpr.cnn_width, reg=rc.weight_decay, init_std=rc.init_std,
                   input_size=rc.dvbpr.input_size, cnn=rc.dvbpr.cnn, train_blocks=rc.dvbpr.train_blocks,
                   backbone=backbone)

    def __init__(self, n_users: int, n_items: int, k: int = 64, width: int = 32, reg: float = 1e-4,
                 init_std: float = 0.01, input_size: int = 0, cnn: str = "small",
                 backbone_name: str = "efficientnet_lite0", train_blocks: int = 5,
                 backbone: Optional[nn.Module] = None):
        """``cnn="backbone"``: Φ starts from ``backbone`` (a ``Backbone``, deep-copied); without
        one (loading a checkpoint) the ``backbone_name`` architecture is built with random
        weights for the state dict to fill."""
        if cnn not in ("backbone", "small"):
            raise ValueError(f"recommender.dvbpr.cnn: expected backbone or small, got {cnn!r}")
        kw = dict(k=int(k), width=int(width), reg=float(reg), init_std=float(init_std), input_size=int(input_size),
                  cnn=cnn)
        if cnn == "backbone":
            backbone_name = str(getattr(backbone, "name", backbone_name))
            kw.update(backbone_name=backbone_name, train_blocks=int(train_blocks))
        super().__init__(n_users, n_items, **kw)
        self.reg_lambda = float(reg)
        self.theta = nn.Parameter(torch.randn(n_users, k) * init_std)
        if cnn == "small":
            self.cnn = SmallCNN(width, k, input_size)
            return
        if backbone is None:
            trunk = build_backbone(BackboneConfig(name=backbone_name, weights="none"))
        else:
            if not hasattr(backbone, "trainable_copy"):
                raise ValueError("DVBPR with recommender.dvbpr.cnn=backbone needs a vars_fast.backbones.Backbone")
            trunk = backbone.trainable_copy()
        trunk.input_size = int(input_size)  # 0: the data's image size
        self.cnn = BackboneCNN(trunk, k, train_blocks)

    def encode(self, images: Tensor) -> Tensor:
        """Images [B,3,S,S] in [0,1] -> Φ(x) [B, K] (differentiable in images)."""
        return self.cnn(images)

    def _score(self, users: Tensor, items: Tensor, visual: Tensor) -> Tensor:
        return (self.theta[users] * visual).sum(-1)

    def score_catalogue(self, users: Tensor, items: Tensor, visual_all: Optional[Tensor] = None) -> Tensor:
        if items.dim() == 2:
            users = users[:, None].expand_as(items)
        return self._score(users, items, (self.item_visual if visual_all is None else visual_all)[items])

    def reg(self, triples: Tensor) -> Tensor:
        dense = sum(p.pow(2).sum() for p in self.cnn.dense_parameters())
        return self.reg_lambda * (sq(self.theta[triples[:, 0]]).mean() + dense / ddp.global_batch_size(triples.shape[0]))

    @torch.no_grad()
    def _prefix_all(self, images_uint8: Tensor, batch: int) -> Optional[Tensor]:
        """The frozen prefix of every catalogue image (None when it would not fit the cache)."""
        probe = self.cnn.prefix(images_uint8[:1].to(self.device).float().div_(255))
        if probe.numel() * probe.element_size() * images_uint8.shape[0] > _PREFIX_CACHE_BYTES:
            return None
        return torch.cat([self.cnn.prefix(images_uint8[s:s + batch].to(self.device).float().div_(255))
                          for s in range(0, images_uint8.shape[0], batch)])

    def fit(self, cat, cfg, generator: torch.Generator, show_progress: bool = True, log=None,
            image_batch: int = 128) -> list[float]:
        """End-to-end training on the catalogue images, then cache Φ(clean catalogue)."""
        device = self.device
        self.eval()  # the prefix runs once, outside the loop; BN stays in eval mode either way
        cache = self._prefix_all(cat.images, image_batch)

        def prefix(items: Tensor) -> Tensor:
            if cache is not None:
                return cache[items]
            with torch.no_grad():
                return self.cnn.prefix(cat.item_batch(items.cpu(), device))

        def loss(triples: Tensor) -> Tensor:
            items, inv = torch.unique(triples[:, 1:], return_inverse=True)
            phi = self.cnn.suffix(prefix(items))  # [M, K]
            u = triples[:, 0]
            s_i = self._score(u, triples[:, 1], phi[inv[:, 0]])
            s_j = self._score(u, triples[:, 2], phi[inv[:, 1]])
            return F.softplus(s_j - s_i).mean() + self.reg(triples)

        with lr_multiplier(self.cnn.backbone_modules(), cfg.dvbpr.backbone_lr_mult):
            hist = train_bpr(self, cat, loss, epochs=cfg.dvbpr.epochs, lr=cfg.dvbpr.lr, lr_low=cfg.dvbpr.lr * 0.1,
                             lr_drop_frac=cfg.lr_drop_frac, batch_size=cfg.dvbpr.batch_size, generator=generator,
                             params=[self.theta, *self.cnn.trainable_parameters()], desc=self.name,
                             show_progress=show_progress, log=log, threads=cfg.threads)
        self.eval()
        with torch.no_grad():
            n = cat.n_items
            self.set_item_visual(torch.cat([self.cnn.suffix(prefix(torch.arange(s, min(s + image_batch, n),
                                                                                   device=device)))
                                            for s in range(0, n, image_batch)]))
        return hist
