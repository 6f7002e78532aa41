"""CIFAR-style residual networks in PyTorch, with batch norm and shortcuts as toggles.

The family of He et al., "Deep Residual Learning for Image Recognition" (2016), Sec. 4.2:
a 3x3 stem convolution, three stages of ``(depth - 2) / 6`` basic blocks with
``width``, ``2 width`` and ``4 width`` channels (the second and third stage halve the
resolution), global average pooling and a linear classifier. ``depth=20`` with
``width=16`` is ResNet-20. Turning ``batch_norm`` or ``residual`` off, for the whole
network or for one stage (a tuple of three flags, one per stage), gives the variants
compared in the PyHessian study (Yao et al., 2020, Tables II-III: "RM BN stage s",
"RM Res stage s"); :data:`VARIANTS` names them.

Modules are named for selection by prefix: ``stem``, ``stage1``, ``stage2``,
``stage3`` (each an ``nn.Sequential`` of blocks ``0``, ``1``, ...) and ``head``; e.g.
``specops.backends.torch.hessian(..., params="stage2")`` or ``H.restrict("stage3.*")``.

Example:
    >>> from specops.zoo.torch_resnet import resnet
    >>> model = resnet(20, batch_norm=False)
    >>> sum(p.numel() for p in model.parameters())
    271690
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from specops.zoo.variants import VARIANTS

def stage_flags(value, what: str) -> tuple:
    """A flag for the whole network, or one per stage, as a tuple of three bools.

    Raises:
        ValueError: a sequence that is not three flags.
    """
    if isinstance(value, Sequence) and not isinstance(value, str):
        flags = tuple(bool(v) for v in value)
        if len(flags) != 3:
            raise ValueError(f"{what} takes one flag or three (one per stage), got {len(flags)}: {value!r}")
        return flags
    return (bool(value),) * 3


class BasicBlock(nn.Module):
    """Two 3x3 convolutions, each followed by batch norm (optional) and ReLU, with a shortcut.

    Where the shape changes, the shortcut is a strided 1x1 convolution (with batch norm when
    ``batch_norm``), option B of He et al.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution (2 halves the resolution).
        batch_norm: use batch normalization after each convolution.
        residual: add the shortcut; ``False`` gives a plain two-layer block.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *, batch_norm: bool = True,
                 residual: bool = True):
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=not batch_norm)
        self.bn2 = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if residual and (stride != 1 or in_channels != out_channels):
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=not batch_norm),
                nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity(),
            )

    def forward(self, x):
        """The block's output for input ``x``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return self.relu(out)


class ResNet(nn.Module):
    """A CIFAR-style ResNet; see :func:`resnet` for the arguments."""

    def __init__(self, depth: int = 20, *, num_classes: int = 10, in_channels: int = 3, width: int = 16,
                 batch_norm: bool | Sequence[bool] = True, residual: bool | Sequence[bool] = True):
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6 n + 2 for n >= 1 (8, 14, 20, 32, 44, 56, ...), got {depth}")
        blocks = (depth - 2) // 6
        bn, res = stage_flags(batch_norm, "batch_norm"), stage_flags(residual, "residual")
        self.depth, self.batch_norm_stages, self.residual_stages = depth, bn, res
        self.batch_norm, self.residual = all(bn), all(res)
        stem_bn = any(bn)  # the stem loses batch norm only when every stage does
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=not stem_bn),
            nn.BatchNorm2d(width) if stem_bn else nn.Identity(),
            nn.ReLU(),
        )
        channels = width
        for s, out in enumerate((width, 2 * width, 4 * width), start=1):
            stage = nn.Sequential(*[
                BasicBlock(channels if b == 0 else out, out, 2 if (b == 0 and s > 1) else 1,
                           batch_norm=bn[s - 1], residual=res[s - 1])
                for b in range(blocks)
            ])
            self.add_module(f"stage{s}", stage)
            channels = out
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        """Logits for images ``x``."""
        x = self.stem(x)
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.head(self.pool(x).flatten(1))


def resnet(depth: int = 20, *, num_classes: int = 10, in_channels: int = 3, width: int = 16,
           batch_norm: bool | Sequence[bool] = True, residual: bool | Sequence[bool] = True,
           variant: str | None = None) -> ResNet:
    """A CIFAR-style ResNet (ResNet-20 by default), in float32 and training mode as PyTorch makes it.

    Args:
        depth: ``6 n + 2`` layers with ``n`` basic blocks per stage (20, 32, 44, 56, 110).
        num_classes: outputs of the linear head.
        in_channels: channels of the input images (3 for CIFAR, 1 for grey scale).
        width: channels of the first stage; the others have 2x and 4x.
        batch_norm: batch normalization after every convolution (convolutions then have no
            bias); or three flags, one per stage (the stem keeps batch norm unless every
            stage loses it).
        residual: identity/projection shortcuts; ``False`` gives a plain network of the same
            depth; or three flags, one per stage.
        variant: a name from :data:`VARIANTS` (``"no-bn-s3"``: batch norm removed from stage
            3), overriding ``batch_norm`` and ``residual``.

    Returns:
        The model. Call ``.eval()`` before taking a Hessian with batch norm's running statistics.

    Raises:
        ValueError: a depth that is not ``6 n + 2``, an unknown variant.
    """
    if variant is not None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        _, batch_norm, residual = VARIANTS[variant]
    return ResNet(depth, num_classes=num_classes, in_channels=in_channels, width=width,
                  batch_norm=batch_norm, residual=residual)
