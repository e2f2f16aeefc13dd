"""Reference models: small, but with the structures real architectures have.

* ``mlp``: Linear stack (hidden neurons).
* ``vgg``: plain conv stack with BatchNorm, max-pooling and flatten -> Linear.
* ``resnet``: basic blocks with residual adds and strided 1x1 downsample shortcuts.
* ``mobilenet``: MobileNetV2 inverted residuals (expand 1x1, depthwise 3x3, linear 1x1) with
  squeeze-and-excitation gating in the deeper blocks.
* ``densenet``: dense blocks (concatenation), a transition, and a split-transform-concat block.

All take N x C x H x W images (H, W divisible by 4) and return class logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


class MLP(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10, hidden=(128, 64)):
        super().__init__()
        dims = [in_channels * image_size * image_size, *hidden]
        self.flatten = nn.Flatten()
        self.hidden = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        return self.head(self.hidden(self.flatten(x)))


class VGG(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(in_channels, w), conv_bn(w, w), nn.MaxPool2d(2),
            conv_bn(w, 2 * w), conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(nn.Linear(2 * w * side * side, 128), nn.ReLU(), nn.Dropout(0.2),
                                        nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, act=False)
        self.downsample = conv_bn(cin, cout, 1, stride, act=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv2(self.conv1(x)) + identity)


class ResNet(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        self.stem = conv_bn(in_channels, widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, se: bool):
        super().__init__()
        hidden = cin * expand
        self.expand = conv_bn(cin, hidden, 1)
        self.depthwise = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.se = SqueezeExcite(hidden) if se else nn.Identity()
        self.project = conv_bn(hidden, cout, 1, act=False)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.use_residual else y


class MobileNet(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = conv_bn(in_channels, 16)
        cfg = [(16, 1, 2, False), (24, 2, 4, False), (24, 1, 4, False), (32, 2, 4, True), (32, 1, 4, True)]
        blocks, cin = [], 16
        for cout, stride, expand, se in cfg:
            blocks.append(InvertedResidual(cin, cout, stride, expand, se))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(cin, 128, 1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.norm(x)))], dim=1)


class SplitTransform(nn.Module):
    """Half the channels pass through, the other half is transformed, then both are concatenated."""

    def __init__(self, channels: int):
        super().__init__()
        self.branch = nn.Sequential(conv_bn(channels // 2, channels // 2, 1), conv_bn(channels // 2, channels // 2, 3))

    def forward(self, x):
        keep, work = torch.chunk(x, 2, dim=1)
        return torch.cat([keep, self.branch(work)], dim=1)


class DenseNet(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10, growth: int = 12):
        super().__init__()
        self.stem = conv_bn(in_channels, 24)
        c = 24
        layers: list[nn.Module] = []
        for _ in range(3):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*layers)
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 48, 1, bias=False), nn.AvgPool2d(2))
        layers, c = [], 48
        for _ in range(3):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.block2 = nn.Sequential(*layers)
        self.reduce = conv_bn(c, 64, 1)
        self.mix = SplitTransform(64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.mix(self.reduce(self.block2(self.transition(self.block1(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP, "vgg": VGG, "resnet": ResNet, "mobilenet": MobileNet, "densenet": DenseNet,
}
