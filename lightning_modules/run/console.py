"""The console of a run: the project's own lines and the progress bar. What only a library says (Lightning's
banners and tips, W&B's status lines, known deprecation warnings) is filtered unless `--verbose true`."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from pytorch_lightning.utilities import rank_zero_only

LIBRARY_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")
LIBRARY_WARNINGS = (  # said by a library about itself, with nothing for the user to do
    r".*isinstance\(treespec, LeafSpec\)",
    r".*does not have many workers",
    r".*Experiment logs directory .* exists and is not empty",
    r".*Checkpoint directory .* exists and is not empty",  # a run resumed in place
    r".*is smaller than the logging interval",  # a search trial's short epochs (a run's own interval is shortened)
    r".*The dirpath has changed from",  # validate/test/fit from a checkpoint of another run folder: as intended
    r".*is not supported by the model summary",  # bf16-mixed: the summary counts parameters all the same
    r".*AMP with fp16 is not supported on CPU",  # the CLI says the swap to bf16-mixed in its own line
)


@rank_zero_only
def say(text: str) -> None:
    """A line of this project's own, printed once (by rank 0) whatever the verbosity; on a line of its own where the
    output is not a terminal and a progress bar there left its last line open (no newline after a bar's update)."""
    print(("\n" if bar_line_open() else "") + text, flush=True)


def bar_line_open() -> bool:
    """Whether an open progress bar may have left stdout mid-line: a file or pipe, where no cursor moves back."""
    from tqdm import tqdm

    return not sys.stdout.isatty() and bool(tqdm._instances)  # private: see lightning_modules/library_internals.py


def end_progress_bars() -> None:
    """Close the progress bars a stopped run left open (their last line gets its newline), so that an error printed
    next starts on a line of its own instead of at the end of the bar."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):  # private: see lightning_modules/library_internals.py
        bar.close()


def quiet_libraries(verbose: bool = False) -> None:
    """Keep the libraries' own info lines and known warnings off the console (all of it stays with --verbose)."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        return
    for pattern in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("WANDB_SILENT", "true")  # inherited by DDP worker processes
