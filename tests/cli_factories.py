"""Model factories for the CLI tests (imported as ``cli_factories:NAME``)."""
import torch.nn as nn


def tiny():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))


def untraceable():
    class M(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    return M()


def not_a_model():
    return 42


def gated():
    """A digit classifier whose forward branches on the data (fx cannot trace it) around a traceable trunk."""
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            h = self.features(x)
            return self.head(h) if float(h.abs().sum()) > 0 else self.head(h) * 0

    return Gated()
