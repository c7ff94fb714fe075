"""Tiny custom architectures for tests, loaded with --arch tests.tiny_models:tiny_cnn."""

from torch import nn


class TinyBlock(nn.Module):
    """A residual block: the skip path carries its input around the convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.relu(x + self.conv2(self.relu(self.conv1(x))))


class TinyCNN(nn.Module):
    """conv stem -> two residual blocks -> pool -> linear head."""

    def __init__(self, num_classes: int = 10, channels: int = 3, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU())
        self.stage = nn.Sequential(TinyBlock(width), TinyBlock(width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stage(self.stem(x))).flatten(1))


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    """Factory for --arch tests.tiny_models:tiny_cnn."""
    return TinyCNN(num_classes)


def wide_cnn(num_classes: int = 10) -> nn.Module:
    """Factory for --arch tests.tiny_models:wide_cnn (16 channels: enough to learn Fashion-MNIST cleanly)."""
    return TinyCNN(num_classes, width=16)
