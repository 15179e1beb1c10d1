"""Datamodules: datasets held in memory as tensors, batches cut by index."""

from datamodules.digits import Digits
from datamodules.mnist import MNIST, FashionMNIST
from datamodules.tensor_data import CorruptDataError, DataNotFoundError, TensorDataModule

__all__ = ["MNIST", "CorruptDataError", "DataNotFoundError", "Digits", "FashionMNIST", "TensorDataModule"]
