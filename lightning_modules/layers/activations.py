"""The activations a sized layer can apply before its per-unit scale, by name (for configs)."""

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "identity": nn.Identity}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name; a clear error for an unknown one."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()
