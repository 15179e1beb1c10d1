"""What every results page's script does: run the page's commands into a scratch folder, read what the runs wrote,
and replace the page's generated blocks in place, between `<!-- generated: NAME -->` and `<!-- end generated -->`.

A page's script names its blocks, each a function that runs the `train.py` commands it needs (`page.train`, each
command once per scratch folder) and returns the block's Markdown; `regenerate` does the rest: the options, the
checks (every block has its markers, every marked block is made), the tiny `--smoke` data, the timing, the page.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DATA = Path("..") / "shared" / "datasets" / "mnist-10k"  # from the repository root, as the pages write it
BEGIN = re.compile(r"<!-- generated: (\S+) -->")
END = "<!-- end generated -->"
sys.path.insert(0, str(ROOT))  # the project, also where it is not installed
PROGRESS_SECONDS = 30
QUIET = ["--wandb", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SMOKE = {  # tiny settings per subcommand, after the page's own (the last value wins)
    "fit": ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.num_sanity_val_steps", "0",
            "--data.batch_size", "8"],
    "search": ["--trainer.max_steps", "2", "--epochs", "1", "--seeds", "1", "--data.batch_size", "8"],
    "sweep": ["--epochs", "2", "--seeds", "2"],
    "propagate": ["--pairs", "4", "--seeds", "1"],
}  # fmt: skip


class RegenerationError(Exception):
    """What the user fixes by hand (no data, a page without a block's markers, a command that failed): one line."""


class Page:
    """One regeneration of a page: its data, its scratch folder and the commands it ran there."""

    def __init__(self, options: argparse.Namespace):
        self.options = options
        self.smoke: bool = options.smoke
        self.runs: Path = options.runs
        self.figures = self.runs / "figures" if self.smoke else ROOT / "docs" / "figures"
        self.data = self._data()
        self._processes = multiprocessing.get_context("forkserver")
        self._processes.set_forkserver_preload(["lightning_modules.run.cli"])

    def pick(self, full, smoke):
        """The page's value, or the tiny one in a smoke run."""
        return smoke if self.smoke else full

    def train(self, subcommand: str, key: str, *args: str, progress: Callable[[Path], None] | None = None) -> Path:
        """`python train.py SUBCOMMAND ARGS --name KEY` in the scratch folder (W&B off) unless that exact command
        finished there before; returns its run folder (runs/KEY/version_N). `progress(folder)` is called with the
        run folder every PROGRESS_SECONDS while the command runs (a long search keeps its trials as they finish)."""
        argv = [subcommand, *map(str, args), *QUIET, "--name", key, *(SMOKE.get(subcommand, []) if self.smoke else [])]
        log, done = self.runs / "logs" / f"{key}.log", self.runs / "logs" / f"{key}.done"
        if done.is_file() and json.loads(done.read_text()) == argv:
            print(f"  {subcommand} {key}: done before in {self.runs}")
            return self.folder(key)
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        process = self._processes.Process(target=run_train_py, args=(argv, str(self.runs), str(log)))
        try:
            process.start()
            while True:
                process.join(PROGRESS_SECONDS if progress is not None else None)
                if progress is not None and any((self.runs / "runs" / key).glob("version_*")):
                    progress(self.folder(key))  # once more when it has ended, so a failed command keeps what it did
                if process.exitcode is not None:
                    break
        finally:  # this script stopped (Ctrl-C, SIGTERM): so does its command, as a killed study would (it continues)
            if process.pid is not None and process.exitcode is None:
                process.kill()
                process.join()
        if process.exitcode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-12:] if log.is_file() else []
            print("\n".join(tail), file=sys.stderr)
            raise RegenerationError(f"train.py {subcommand} {key} failed (exit {process.exitcode}); its log: {log}")
        (self.runs / "logs" / f"{key}.seconds").write_text(f"{time.perf_counter() - start:.0f}\n")
        done.write_text(json.dumps(argv))
        print(f"  {subcommand} {key}: {elapsed(start)}", flush=True)
        return self.folder(key)

    def seconds(self, key: str) -> float | None:
        """How long a command of this scratch folder took, when it was timed."""
        path = self.runs / "logs" / f"{key}.seconds"
        return float(path.read_text()) if path.is_file() else None

    def folder(self, key: str) -> Path:
        """The newest run folder of a command's key."""
        versions = sorted((self.runs / "runs" / key).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
        if not versions:
            raise RegenerationError(f"no run folder under {self.runs / 'runs' / key}")
        return versions[-1]

    def config(self, path: str) -> str:
        """A config of the repository (`dead_units/mnist_vgg_adam.yaml`), found from the scratch folder."""
        return str(ROOT / "configs" / path)

    @property
    def kept(self) -> Path:
        """Where results files are kept beside the page (a smoke run keeps them in its scratch folder)."""
        return self.runs / "kept" if self.smoke else ROOT / "docs" / "results" / "searches"

    def keep(self, source: Path, name: str) -> None:
        """Copy a run's results file beside the page (docs/results/searches/NAME), so it is committed with the table;
        a path to the data in it is written as the page writes it (DATA), and one into the scratch folder as its
        commands saw it (from the scratch folder), not as this machine has them."""
        self.kept.mkdir(parents=True, exist_ok=True)
        text = source.read_text()
        if not self.smoke:
            text = text.replace(str(self.options.data.resolve()), str(DATA))
            text = text.replace(f"{self.runs.resolve()}{os.sep}", "")
        (self.kept / name).write_text(text)
        print(f"  kept {name} from {source.relative_to(self.runs)}")

    def figure(self, source: Path, name: str) -> None:
        """Copy a run's plot to the page's figures (docs/figures/NAME)."""
        self.figures.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, self.figures / name)
        print(f"  figure {name} from {source.relative_to(self.runs)}")

    def _data(self) -> list[str]:
        """The arguments that point a command at the data: the 10k split, or in a smoke run tiny files in its format."""
        if self.smoke:
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import make_mnist, small_splits  # the tests' tiny MNIST in the real IDX format

            # 72 training images: a prediction's probe draws 32 pairs
            return [*small_splits(make_mnist(self.runs / "data", n_test=96)), "--data.test_size", "8"]
        data = self.options.data
        if not any(data.glob("t10k-images-idx3-ubyte*")) and not any(data.glob("MNIST/raw/t10k-images-idx3-ubyte*")):
            raise RegenerationError(f"--data {data}: no MNIST test file (t10k-images-idx3-ubyte.gz) there")
        return ["--data.data_dir", str(data.resolve())]


def run_train_py(argv: list[str], cwd: str, log: str) -> None:
    """`python train.py ARGV` in `cwd`, its output into `log`: a process forked from one that has imported the
    project already, so each command starts in a moment instead of importing torch and Lightning again."""
    os.chdir(cwd)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    sys.argv = ["train.py", *argv]
    from lightning_modules.run.cli import main

    main()


def blocks_of(text: str, page: str) -> dict[str, tuple[int, int]]:
    """Each generated block's content as a range of lines [first, end), between its markers."""
    blocks: dict[str, tuple[int, int]] = {}
    name, first = None, 0
    for i, line in enumerate(text.splitlines()):
        begin = BEGIN.fullmatch(line.strip())
        if begin and name is None and begin[1] not in blocks:
            name, first = begin[1], i + 1
        elif begin:
            problem = f"block {name} is not closed by {END}" if name else f"block {begin[1]} is marked twice"
            raise RegenerationError(f"{page}:{i + 1}: {problem}")
        elif line.strip() == END:
            if name is None:
                raise RegenerationError(f"{page}:{i + 1}: {END} closes no block")
            blocks[name], name = (first, i), None
    if name is not None:
        raise RegenerationError(f"{page}: block {name} is not closed by {END}")
    return blocks


def fill(text: str, name: str, content: str, page: str) -> str:
    """The page with block `name`'s content replaced (a blank line either side, so Markdown sees a table)."""
    first, end = blocks_of(text, page)[name]
    lines = text.splitlines()
    return "\n".join([*lines[:first], "", content.strip("\n"), "", *lines[end:]]) + "\n"


def regenerate(
    name: str,
    blocks: dict[str, Callable[[Page], str]],
    argv: list[str] | None = None,
    add_options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """The script of docs/results/NAME.md: parse its options, then make its blocks (or `--only` one) and write them
    into the page, each part timed. Any problem ends in one `error:` line."""
    parser = argparse.ArgumentParser(description=f"Regenerate the tables and figures of docs/results/{name}.md.")
    parser.add_argument("--data", type=Path, default=ROOT / DATA, help=f"the MNIST 10k folder (default {DATA})")
    parser.add_argument("--runs", type=Path, help=f"the scratch folder for the runs (default runs/results/{name})")
    parser.add_argument("--only", choices=list(blocks), help="make this block alone")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "results" / f"{name}.md", help="the page")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the same pipeline on tiny data with tiny settings, into a copy of the page",
    )
    if add_options:
        add_options(parser)
    options = parser.parse_args(argv)
    options.runs = (options.runs or ROOT / "runs" / ("results-smoke" if options.smoke else "results") / name).resolve()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stopped) if main else None  # `kill` stops the command running too
    try:
        make_page(options, blocks)
    except RegenerationError as e:
        sys.exit(f"error: {e}")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def stopped(signum: int, frame) -> None:
    """SIGTERM as an exit, so that the command running is stopped on the way out (`Page.train`)."""
    raise SystemExit(128 + signum)


def make_page(options: argparse.Namespace, blocks: dict[str, Callable[[Page], str]]) -> None:
    start = time.perf_counter()
    source = options.page
    if not source.is_file():
        raise RegenerationError(f"--page {source}: no such file")
    options.runs.mkdir(parents=True, exist_ok=True)
    target = options.runs / source.name if options.smoke else source
    if options.smoke:
        shutil.copyfile(source, target)
    text = target.read_text()
    marked = blocks_of(text, str(target))
    missing = [b for b in blocks if b not in marked]
    unknown = [b for b in marked if b not in blocks]
    if missing:
        raise RegenerationError(f"{target} has no markers for block(s) {', '.join(missing)}: put the block between "
                                f"<!-- generated: {missing[0]} --> and {END}")  # fmt: skip
    if unknown:
        raise RegenerationError(f"{target} has generated block(s) {', '.join(unknown)} that this script does not "
                                "make: remove their markers, or make them here")  # fmt: skip
    page = Page(options)
    for name, make in blocks.items():
        if options.only not in (None, name):
            continue
        print(f"block {name}: running in {options.runs}", flush=True)
        began = time.perf_counter()
        content = make(page)  # minutes to hours: the page is read after, so edits made meanwhile are kept
        target.write_text(fill(target.read_text(), name, content, str(target)))
        print(f"block {name}: written into {target} ({elapsed(began)})", flush=True)
    print(f"{target}: done in {elapsed(start)}")


def elapsed(start: float) -> str:
    seconds = time.perf_counter() - start
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# reading what the runs wrote


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def last(rows: list[dict[str, str]], key: str) -> float:
    """The last logged value of a metric (metrics.csv has a row per logging call, most cells empty)."""
    values = [row[key] for row in rows if row.get(key) not in (None, "")]
    if not values:
        raise RegenerationError(f"no {key} in the run's metrics.csv")
    return float(values[-1])


def markdown_rows(path: Path, first_column: str) -> list[dict[str, str]]:
    """The rows of the Markdown table in `path` whose header starts with `first_column`, by column name."""
    lines = path.read_text().splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    start = next((i for i, row in enumerate(cells) if row[0] == first_column), None)
    if start is None:
        raise RegenerationError(f"{path}: no table with a column {first_column!r}")
    rows = []
    for line, row in zip(lines[start + 2 :], cells[start + 2 :], strict=True):
        if not line.startswith("|"):
            break
        rows.append(dict(zip(cells[start], row, strict=True)))
    return rows


# writing Markdown


def table(header: list[str], rows: Iterable[list], align: str = "") -> str:
    """A Markdown table; `align` gives l or r per column (default: the first left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    return "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in [header, rule, *rows])


def percent(fraction: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(fraction) else f"{100 * fraction:.{digits}f}%"


def spread(values: list[float], digits: int = 1) -> str:
    """`43.3 (spread 4.9)`-style: the mean and the standard deviation over seeds."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({statistics.stdev(values):.{digits}f})"
