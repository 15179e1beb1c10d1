"""The errors a user fixes by hand (a setting, the data, a checkpoint, a diverging run): every one derives from
UserError, which the command line prints as one `error:` line instead of a traceback. No Lightning import:
nets, layers and datamodules raise them too.
"""

from __future__ import annotations

import math


class UserError(Exception):
    """Something the user fixes by hand; `train.py` prints it as one line."""


class ConfigError(UserError, ValueError):
    """Settings that cannot work (alone or together)."""


class DivergenceError(UserError, RuntimeError):
    """Training diverged and was stopped; checkpoints written before it are kept."""


class NonFiniteLossError(DivergenceError):
    """The training loss became NaN or infinite."""


class LossExplodedError(DivergenceError):
    """The training loss stayed finite but grew past the divergence guard's limit."""


def require(kind: str, **values: float | None) -> None:
    """Refuse, in one ConfigError line, the first of `values` (named as the setting) that is not of `kind`:
    `positive` (> 0), `non_negative` (>= 0), `fraction` (in [0, 1]) or `probability` (in (0, 1]). None passes
    (an optional setting left unset)."""
    tests = {
        "positive": (lambda v: v > 0, "positive"),
        "non_negative": (lambda v: v >= 0, "0 or more"),
        "fraction": (lambda v: 0 <= v <= 1, "between 0 and 1"),
        "probability": (lambda v: 0 < v <= 1, "above 0 and at most 1"),
    }
    test, wanted = tests[kind]
    for name, value in values.items():
        if value is not None and (isinstance(value, float) and math.isnan(value) or not test(value)):
            raise ConfigError(f"{name} must be {wanted}, got {value}")
