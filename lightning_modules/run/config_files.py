"""Config files as the studies and the CLI read them outside the parser: a run's name from its path, a net from
a config's `model.net`."""

from __future__ import annotations

from pathlib import Path

import yaml
from jsonargparse import ArgumentParser
from torch import nn


def net_from_config(path: str | Path) -> nn.Module:
    """Build the `model.net` of a training config (class_path/init_args YAML), ignoring the rest of it.

    `path` may also be a net file (class_path/init_args at the top), and `model.net` a path to one,
    relative to the config, as jsonargparse reads it.
    """
    path = Path(path)
    config = yaml.safe_load(path.read_text()) or {}
    if "class_path" in config:
        net = config
    else:
        model = config.get("model", {})
        net = model.get("init_args", model).get("net")
        if net is None:
            raise ValueError(f"{path}: no model.net in this config")
        if isinstance(net, str):
            return net_from_config(path.parent / net)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=nn.Module)
    return parser.instantiate_classes(parser.parse_object({"net": net})).net


def config_name(path: str | Path) -> str:
    """A run's name from its config path: the part after `configs/`, without suffix (depth/resnet)."""
    parts = Path(path).with_suffix("").parts
    if "configs" not in parts[:-1]:
        return parts[-1]
    last = len(parts) - 1 - parts[::-1].index("configs")
    return "/".join(parts[last + 1 :])
