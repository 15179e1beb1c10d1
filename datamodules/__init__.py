"""Datamodules: small datasets held in memory as tensors, batches cut by index (Speech Commands as decoded
clips, featurised per batch on the device); ImageNet-size ones streamed."""

from datamodules.augment import BatchAugment
from datamodules.cifar10 import CIFAR10
from datamodules.digits import Digits
from datamodules.image_folder import ImageFolderData
from datamodules.mnist import MNIST, FashionMNIST
from datamodules.speech_commands import SpeechCommands
from datamodules.task_stream import TaskStream
from datamodules.tensor_data import (
    CorruptDataError,
    DataError,
    DataNotFoundError,
    NoTestSplitError,
    SplitSizeError,
    TensorDataModule,
)

__all__ = [
    "CIFAR10",
    "MNIST",
    "BatchAugment",
    "CorruptDataError",
    "DataError",
    "DataNotFoundError",
    "Digits",
    "FashionMNIST",
    "ImageFolderData",
    "NoTestSplitError",
    "SpeechCommands",
    "SplitSizeError",
    "TaskStream",
    "TensorDataModule",
]
