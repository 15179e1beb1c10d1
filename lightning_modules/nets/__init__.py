"""Plain networks: nn.Modules with no Lightning import, usable from a notebook."""

from lightning_modules.nets.depth_cnn import DepthBlock, DepthCNN
from lightning_modules.nets.mlp import MLP
from lightning_modules.nets.sparse_cnn import SparseCNN
from lightning_modules.nets.vgg import VGG
from lightning_modules.nets.wide_resnet import WideBlock, WideResNet
from lightning_modules.nets.wide_resnet_imagenet import WideResNetImageNet

__all__ = ["MLP", "VGG", "SparseCNN", "DepthBlock", "DepthCNN", "WideBlock", "WideResNet", "WideResNetImageNet"]
