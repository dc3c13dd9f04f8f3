"""The multiscale deep equilibrium model (MDEQ) for image classification.

Reads top to bottom: the config, one residual block per scale, the multiscale fusion, the map
``f`` that the DEQ solves for, the stem that makes the input injection, the classification head,
and the model that ties them to :class:`deqlib.DEQ` and the training loop.

The equilibrium state is a list of feature maps, one per scale, highest resolution first:
``z[i]: (B, channels[i], H / 2**(downsample + i), W / 2**(downsample + i))``. One application of
``f`` runs a residual block on every scale (the input is injected only at the highest
resolution), then mixes the scales (each output scale sums every input scale, brought to its
resolution and width), then a ReLU, 1x1 convolution and GroupNorm per scale.

Weight normalization (block and post-fusion convolutions, as in the official code) and
variational dropout (one mask per sample and channel) must hold still for a whole solve, so every
forward pass runs inside :func:`deqlib.nn.once_per_step`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checks import check_bool, check_choice, check_int, check_int_list, check_real
from ..deq import DEQ, DEQStats, SolverSettings
from ..nn import VariationalDropout, group_norm, once_per_step, weight_norm
from ..step import StepOutput

__all__ = ["MDEQConfig", "ResidualBlock", "MultiscaleMap", "Stem", "MDEQ", "STEMS"]

# How the image becomes the injection (see Stem): "compact", this library's first stem, or the
# official code's "official".
STEMS = ("compact", "official")


@dataclass(frozen=True)
class MDEQConfig:
    """Shape of an MDEQ (Table 4's CIFAR column by default).

    Attributes:
        channels: width of each scale, highest resolution first; its length is the number of
            scales (each one halves the resolution).
        expansion: the block's inner width is ``expansion * channels[i]`` (5 in the official code).
        groups: GroupNorm groups; must divide every width.
        dropout: variational dropout in each block (Table 4: "recurrent dropout").
        downsample: stride-2 convolutions before the injection ("input injection downsamplings";
            0 for CIFAR, 2 for ImageNet).
        head_channels: width of the head at each scale; final_channels: width before pooling.
        image_size: input height and width; the lowest scale must keep at least 1 pixel.
        init_std: every convolution and linear weight starts from N(0, init_std^2) (the paper's
            protocol: 0.01); None keeps PyTorch's default (Kaiming-uniform) initialization. The
            weights feed GroupNorms, so their scale mostly sets how far one Adam step moves them
            relative to their size.
        stem: ``"compact"`` (the default, kept for the runs made with it): ``max(1, downsample)``
            conv3x3 + GN + ReLU, then conv1x1 + GN, so the injection takes both signs;
            ``"official"``: as the official code, two conv3x3 + norm + ReLU (the first
            ``downsample`` of stride 2), then conv1x1 + norm + ReLU (left out there, and here,
            when ``downsample == 0`` with at most 2 scales), so the injection is never negative.
        post_groups: GroupNorm groups after the fusion (None: ``groups``; the official code
            uses ``groups // 2``); must divide every width.
        pretrain_depth: layers of the weight-tied stack trained by the pretraining steps (None:
            the forward NFE threshold; the official code's ``NUM_LAYERS``, 8 for CIFAR-10).
    """

    channels: tuple[int, ...] = (28, 56, 112, 224)
    expansion: int = 5
    groups: int = 4
    dropout: float = 0.25
    downsample: int = 0
    head_channels: tuple[int, ...] = (56, 112, 224, 448)
    final_channels: int = 1680
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    weight_norm: bool = True
    init_std: float | None = 0.01
    stem: str = "compact"
    post_groups: int | None = None
    pretrain_depth: int | None = None

    def __post_init__(self) -> None:
        for name in ("channels", "head_channels"):
            check_int_list(name, getattr(self, name), 1)
        for name, minimum in (("expansion", 1), ("groups", 1), ("downsample", 0), ("final_channels", 1),
                              ("num_classes", 2), ("in_channels", 1), ("image_size", 1)):
            check_int(name, getattr(self, name), minimum)
        check_real("dropout", self.dropout, minimum=0, maximum=1, max_open=True)
        check_bool("weight_norm", self.weight_norm)
        check_real("init_std", self.init_std, minimum=0, min_open=True, optional=True)  # null: PyTorch's default
        check_choice("stem", self.stem, STEMS)
        check_int("post_groups", self.post_groups, 1, optional=True)
        check_int("pretrain_depth", self.pretrain_depth, 1, optional=True)
        if len(self.head_channels) != len(self.channels):
            raise ValueError(f"head_channels={list(self.head_channels)} needs one width per scale "
                             f"of channels={list(self.channels)}")
        widths = [*self.channels, *self.head_channels, self.final_channels]
        bad = [w for w in widths if w % self.groups]
        if bad:
            raise ValueError(f"groups={self.groups} does not divide the widths {bad}")
        bad = [w for w in self.channels if w % self.fusion_groups]
        if bad:
            raise ValueError(f"post_groups={self.post_groups} does not divide the widths {bad}")
        halvings = self.downsample + len(self.channels) - 1
        if self.image_size >> halvings < 1:
            raise ValueError(f"image_size={self.image_size} is too small for downsample={self.downsample} "
                             f"and {len(self.channels)} scales")
        if self.image_size % (1 << halvings):
            # A stride-2 conv rounds an odd side up, so the scales would stop matching in the fusion.
            raise ValueError(f"image_size={self.image_size} must be divisible by 2**{halvings} "
                             f"(downsample={self.downsample} and {len(self.channels)} scales)")

    @property
    def fusion_groups(self) -> int:
        """GroupNorm groups after the fusion: ``post_groups``, else ``groups``."""
        return self.groups if self.post_groups is None else self.post_groups

    @property
    def sizes(self) -> list[int]:
        """Side length of each scale's feature map."""
        return [self.image_size >> (self.downsample + i) for i in range(len(self.channels))]


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class ResidualBlock(nn.Module):
    """One scale's block: ``z -> GN(ReLU(z + GN(drop(conv2(ReLU(GN(conv1 z)))) + inj)))``.

    Shapes: ``z, injection: (B, C, s, s)`` -> ``(B, C, s, s)``.
    """

    def __init__(self, channels: int, cfg: MDEQConfig):
        super().__init__()
        inner = cfg.expansion * channels
        self.conv1 = _conv(channels, inner, 3)
        self.gn1 = group_norm(inner, cfg.groups)
        self.conv2 = _conv(inner, channels, 3)
        self.drop = VariationalDropout(cfg.dropout)
        self.gn2 = group_norm(channels, cfg.groups)
        self.gn3 = group_norm(channels, cfg.groups)

    def forward(self, z: Tensor, injection: Tensor | None = None) -> Tensor:
        h = torch.relu(self.gn1(self.conv1(z)))
        h = self.drop(self.conv2(h))
        if injection is not None:
            h = h + injection
        return self.gn3(torch.relu(self.gn2(h) + z))


def _fuse(cfg: MDEQConfig, j: int, i: int) -> nn.Module:
    """Brings scale ``j`` to scale ``i``'s resolution and width."""
    cin, cout = cfg.channels[j], cfg.channels[i]
    if j == i:
        return nn.Identity()
    if j > i:  # up: 1x1 conv to the new width, then nearest-neighbour upsampling
        return nn.Sequential(_conv(cin, cout, 1), group_norm(cout, cfg.groups),
                             nn.Upsample(scale_factor=2 ** (j - i), mode="nearest"))
    layers: list[nn.Module] = []  # down: one stride-2 conv per halving, ReLU between them
    for step in range(i - j):
        last = step == i - j - 1
        width = cout if last else cin
        layers += [_conv(cin, width, 3, stride=2), group_norm(width, cfg.groups)]
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MultiscaleMap(nn.Module):
    """``f(z, x)``: blocks per scale, multiscale fusion, then ReLU + 1x1 conv + GN per scale.

    ``z``: list of ``(B, channels[i], sizes[i], sizes[i])``; ``x``: the injection, shaped like
    ``z[0]``. Returns a list shaped like ``z``.
    """

    def __init__(self, cfg: MDEQConfig):
        super().__init__()
        n = len(cfg.channels)
        self.blocks = nn.ModuleList(ResidualBlock(c, cfg) for c in cfg.channels)
        self.fuse = nn.ModuleList(nn.ModuleList(_fuse(cfg, j, i) for j in range(n)) for i in range(n))
        # The official code's post-fusion GroupNorm has no affine parameters.
        self.post = nn.ModuleList(
            nn.Sequential(nn.ReLU(), _conv(c, c, 1), group_norm(c, cfg.fusion_groups, affine=False))
            for c in cfg.channels)
        if cfg.weight_norm:
            for block in self.blocks:
                weight_norm(block.conv1)
                weight_norm(block.conv2)
            for post in self.post:
                weight_norm(post[1])

    def forward(self, z: list[Tensor], x: Tensor) -> list[Tensor]:
        b = [block(zi, x if i == 0 else None) for i, (block, zi) in enumerate(zip(self.blocks, z))]
        out = []
        for i, fuse_into_i in enumerate(self.fuse):
            y = b[i]
            for j, fuse in enumerate(fuse_into_i):
                if j != i:
                    y = y + fuse(b[j])
            out.append(self.post[i](y))
        return out


class Stem(nn.Module):
    """Image ``(B, in_channels, S, S)`` -> injection ``(B, channels[0], sizes[0], sizes[0])``.

    ``"compact"``: ``max(1, downsample)`` conv3x3 + GN + ReLU layers (the first ``downsample``
    of stride 2), then a 1x1 conv + GN: the injection takes both signs. ``"official"``: the
    official code's ``downsample`` and ``stage0`` modules, ``max(2, downsample)`` conv3x3 + GN +
    ReLU (the first ``downsample`` of stride 2), then a 1x1 conv + GN + ReLU, which the official
    code leaves out when ``downsample == 0`` with at most 2 scales: the injection ends in a ReLU,
    so it is never negative. GroupNorm where the official stem has BatchNorm, as everywhere in
    this model.
    """

    def __init__(self, cfg: MDEQConfig):
        super().__init__()
        c = cfg.channels[0]
        official = cfg.stem == "official"
        layers: list[nn.Module] = []
        cin = cfg.in_channels
        for k in range(max(2 if official else 1, cfg.downsample)):
            layers += [_conv(cin, c, 3, stride=2 if k < cfg.downsample else 1), group_norm(c, cfg.groups),
                       nn.ReLU()]
            cin = c
        if not official:
            layers += [_conv(c, c, 1), group_norm(c, cfg.groups)]
        elif cfg.downsample > 0 or len(cfg.channels) > 2:
            layers += [_conv(c, c, 1), group_norm(c, cfg.groups), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Head(nn.Module):
    """Equilibrium state -> logits ``(B, num_classes)``.

    Each scale is widened (1x1 conv + GN + ReLU); going from the highest resolution down, the
    running sum is halved by a stride-2 conv and added to the next scale; then a 1x1 conv to
    ``final_channels``, global average pooling and a linear layer.

    Not the official head exactly: there each scale is widened by a bottleneck residual block
    (HRNet's, BatchNorm, inner width ``head_channels / 4``). Here one 1x1 conv to the same
    width, with GroupNorm as everywhere else in the model (4 groups do not divide the paper's
    inner widths 14 and 28).
    """

    def __init__(self, cfg: MDEQConfig):
        super().__init__()
        g, hc = cfg.groups, cfg.head_channels
        self.widen = nn.ModuleList(
            nn.Sequential(_conv(c, h, 1), group_norm(h, g), nn.ReLU()) for c, h in zip(cfg.channels, hc))
        self.down = nn.ModuleList(
            nn.Sequential(_conv(a, b, 3, stride=2), group_norm(b, g), nn.ReLU()) for a, b in zip(hc, hc[1:]))
        self.final = nn.Sequential(_conv(hc[-1], cfg.final_channels, 1), group_norm(cfg.final_channels, g),
                                   nn.ReLU())
        self.classifier = nn.Linear(cfg.final_channels, cfg.num_classes)

    def forward(self, z: list[Tensor]) -> Tensor:
        y = self.widen[0](z[0])
        for i in range(1, len(z)):
            y = self.widen[i](z[i]) + self.down[i - 1](y)
        return self.classifier(self.final(y).mean(dim=(2, 3)))


class MDEQ(nn.Module):
    """MDEQ classifier: stem -> equilibrium of :class:`MultiscaleMap` -> head.

    ``model(batch, pretrain=False)`` with ``batch = (images (B, C, S, S), labels (B,))`` returns the
    training loop's :class:`~deqlib.train.StepOutput` (cross-entropy, the solve's statistics and
    the batch accuracy). With ``pretrain=True`` the map is instead unrolled as an explicit
    weight-tied stack of ``pretrain_depth`` layers (default: ``forward.max_iter``; the official
    code's pretraining steps).
    """

    def __init__(self, cfg: MDEQConfig, forward: SolverSettings, backward: SolverSettings):
        super().__init__()
        self.cfg = cfg
        self.stem = Stem(cfg)
        self.f = MultiscaleMap(cfg)
        self.deq = DEQ(self.f, forward_solver=forward, backward_solver=backward)
        self.head = Head(cfg)
        if cfg.init_std is not None:
            self._init_weights(cfg.init_std)

    @torch.no_grad()
    def _init_weights(self, std: float) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if hasattr(m, "weight_v"):  # weight-normed: the direction from N(0, std^2), g = its norm
                    m.weight_v.normal_(0.0, std)
                    m.weight_g.copy_(torch.norm_except_dim(m.weight_v, 2, 0))
                else:
                    m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()

    @property
    def pretrain_depth(self) -> int:
        """Layers of the weight-tied stack that pretraining trains."""
        depth = self.cfg.pretrain_depth
        return self.deq.forward_solver.max_iter if depth is None else depth

    def initial_state(self, injection: Tensor) -> list[Tensor]:
        """``z0 = 0`` at every scale, on the injection's device and dtype."""
        B = injection.shape[0]
        return [injection.new_zeros(B, c, s, s) for c, s in zip(self.cfg.channels, self.cfg.sizes)]

    def predict(self, x: Tensor, forward_solver: SolverSettings | None = None) -> tuple[Tensor, DEQStats]:
        """Logits ``(B, num_classes)`` and the solve's statistics. ``forward_solver`` overrides
        the training settings for this call, e.g. a hard NFE cap at evaluation."""
        with once_per_step(self):
            injection = self.stem(x)
            z, stats = self.deq(injection, self.initial_state(injection), forward_solver=forward_solver)
            return self.head(z), stats

    def unrolled(self, x: Tensor, depth: int) -> Tensor:
        """Logits of the explicit weight-tied stack ``f(...f(f(0, x), x)..., x)`` of ``depth``."""
        with once_per_step(self):
            injection = self.stem(x)
            z = self.initial_state(injection)
            for _ in range(depth):
                z = self.f(z, injection)
            return self.head(z)

    def forward(self, batch: tuple[Tensor, Tensor], pretrain: bool = False) -> StepOutput:
        x, y = batch
        if pretrain:
            logits, stats = self.unrolled(x, self.pretrain_depth), None
        else:
            logits, stats = self.predict(x)
        loss = nn.functional.cross_entropy(logits, y)
        acc = float((logits.detach().argmax(dim=1) == y).float().mean())
        return StepOutput(loss=loss, stats=stats, metrics={"train_acc": acc})
