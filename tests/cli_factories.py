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
