"""The scripts that regenerate the results pages (docs/results/make/): each runs its page's commands end to end on tiny
MNIST files (`--smoke`) and fills every generated block of a copy of its page; a page whose markers and script
disagree is refused in one line before anything runs."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = ROOT / "docs" / "results" / "make"
PAGES = {"dead-units": "dead_units", "depth": "depth", "kwinners": "kwinners", "network-size": "network_size",
         "compression": "compression", "plasticity": "plasticity", "curvature": "curvature"}  # fmt: skip
ONE_SEED = {"dead-units": ["--seeds", "0", "--short_seeds", "0"], "kwinners": ["--seeds", "0"],
            "plasticity": ["--seeds", "2"], "curvature": ["--seeds", "1"]}  # fmt: skip
FIGURE = re.compile(r"\]\(\.\./figures/([^)]+\.png)\)")


def script(page: str):
    """A page's script as a module (named apart: `compression` and `depth` are common names); its `regenerate`
    module is found beside it."""
    if str(MAKE) not in sys.path:
        sys.path.append(str(MAKE))
    name = f"results_make_{PAGES[page]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, MAKE / f"{PAGES[page]}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def page_file(page: str) -> Path:
    return ROOT / "docs" / "results" / f"{page}.md"


def blocks(path: Path) -> dict[str, str]:
    """Each generated block's content, by name."""
    from regenerate import blocks_of

    lines = path.read_text().splitlines()
    return {name: "\n".join(lines[first:end]).strip() for name, (first, end) in blocks_of("\n".join(lines), "").items()}


@pytest.mark.slow(23)
@pytest.mark.subprocess
@pytest.mark.parametrize("page", list(PAGES))
def test_each_script_fills_every_block_of_its_page_from_its_commands_run_on_tiny_data(page, tmp_path, capsys):
    make = script(page)
    argv = ["--smoke", "--runs", str(tmp_path), *ONE_SEED.get(page, [])]
    make.main(argv)
    written, before = blocks(tmp_path / f"{page}.md"), blocks(page_file(page))
    assert list(written) == list(make.BLOCKS)
    for name, content in written.items():
        assert content.startswith(("|", "- ")) and content != before[name], name
    copied = {p.name for p in (tmp_path / "figures").glob("*.png")}
    assert copied == set(FIGURE.findall(page_file(page).read_text()))  # the figures the page shows, and only those
    capsys.readouterr()

    first = next(iter(make.BLOCKS))
    make.main([*argv, "--only", first])  # the same scratch folder: every command is done there already
    again = blocks(tmp_path / f"{page}.md")
    assert again == {**before, first: written[first]}  # that block alone is written, from the same runs
    assert "done before" in capsys.readouterr().out and not list(tmp_path.glob("runs/**/version_1"))


def test_a_page_without_the_markers_of_a_block_its_script_makes_is_refused_before_anything_runs(tmp_path):
    page = tmp_path / "kwinners.md"
    text = page_file("kwinners").read_text()
    page.write_text(re.sub(r"<!-- generated: kwinners/seeds -->.*?<!-- end generated -->\n", "", text, flags=re.S))
    with pytest.raises(SystemExit) as refused:
        script("kwinners").main(["--smoke", "--page", str(page), "--runs", str(tmp_path / "runs")])
    assert "has no markers for block(s) kwinners/seeds" in str(refused.value)
    assert not (tmp_path / "runs" / "runs").exists()


def test_a_generated_block_that_no_script_makes_is_refused_rather_than_left_stale(tmp_path):
    page = tmp_path / "kwinners.md"
    page.write_text(
        page_file("kwinners").read_text() + "\n<!-- generated: kwinners/old -->\n| a |\n<!-- end generated -->\n"
    )
    with pytest.raises(SystemExit) as refused:
        script("kwinners").main(["--smoke", "--page", str(page), "--runs", str(tmp_path / "runs")])
    assert "kwinners/old that this script does not make" in str(refused.value)


def test_what_is_written_by_hand_while_a_block_runs_stays_in_the_page(tmp_path):
    """A block runs for minutes or hours: the page is read for its writing after it, not before."""
    script("kwinners")
    from regenerate import regenerate

    page, runs = tmp_path / "p.md", tmp_path / "runs"
    page.write_text("<!-- generated: p/a -->\n| old |\n<!-- end generated -->\nprose\n")

    def block(_) -> str:
        copy = runs / "p.md"  # the page a smoke run writes
        copy.write_text(copy.read_text().replace("prose", "prose edited meanwhile"))
        return "| new |"

    regenerate("p", {"p/a": block}, ["--smoke", "--page", str(page), "--runs", str(runs)])
    assert (
        runs / "p.md"
    ).read_text() == "<!-- generated: p/a -->\n\n| new |\n\n<!-- end generated -->\nprose edited meanwhile\n"


@pytest.mark.parametrize(
    "text, problem",
    [
        ("<!-- generated: a -->\n| x |\n", "block a is not closed"),
        ("<!-- generated: a -->\n<!-- generated: b -->\n<!-- end generated -->\n", "block a is not closed"),
        (
            "<!-- generated: a -->\n<!-- end generated -->\n<!-- generated: a -->\n<!-- end generated -->\n",
            "marked twice",
        ),
        ("| x |\n<!-- end generated -->\n", "closes no block"),
    ],
)
def test_markers_that_do_not_pair_up_are_refused(text, problem):
    script("kwinners")
    from regenerate import RegenerationError, blocks_of

    with pytest.raises(RegenerationError, match=problem):
        blocks_of(text, "page.md")


def test_without_the_data_folder_a_regeneration_says_so_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as refused:
        script("network-size").main(["--data", str(tmp_path / "nowhere"), "--runs", str(tmp_path / "runs"),
                                     "--page", str(shutil.copy(page_file("network-size"), tmp_path))])  # fmt: skip
    assert str(refused.value).startswith("error: --data ") and "no MNIST test file" in str(refused.value)
    assert "\n" not in str(refused.value)


def smoke_page(make, runs: Path):
    """A smoke Page of the depth script in its own scratch folder (its own tiny MNIST files), as `--smoke` makes it."""
    from regenerate import Page

    options = argparse.Namespace(smoke=True, runs=runs.resolve(), data=runs / "unused", rows=["resnet"], seeds=1,
                                 searched=[], page=page_file("depth"), only=None)  # fmt: skip
    runs.mkdir(parents=True)
    return Page(options)


@pytest.mark.slow(8)
def test_a_row_search_keeps_its_trials_as_they_train_and_another_checkout_continues_from_them(tmp_path, monkeypatch):
    """The ResNet row's search is hours long: its trials are kept beside the page as each one trains (no summary
    until it ends), and the same block in another scratch folder, given those files, trains only what they lack and
    ends with the same trials."""
    make = script("depth")
    import regenerate

    monkeypatch.setattr(regenerate, "PROGRESS_SECONDS", 0.05)
    seen = []  # the trials kept each time the running search was looked at

    def watched(page, variant, folder):
        make_keep(page, variant, folder)
        kept = page.kept / f"depth_{variant}.csv"
        seen.append(len(regenerate.read_csv(kept)) if kept.is_file() else 0)
        assert not (page.kept / f"depth_{variant}.md").is_file()  # no summary while it runs

    make_keep = make.keep_progress
    monkeypatch.setattr(make, "keep_progress", watched)
    first = smoke_page(make, tmp_path / "a")
    _, trials, _ = make.row_search(first, "resnet")
    partial = [n for n in seen if 0 < n < len(trials)]
    assert len(trials) >= 2 and partial and seen == sorted(seen) and seen[-1] == len(trials)  # one by one, then all
    assert (first.kept / "depth_resnet.md").is_file()

    second = smoke_page(make, tmp_path / "b")  # another checkout: the kept files of a search stopped after 1 trial
    second.kept.mkdir()
    rows = (first.kept / "depth_resnet.csv").read_text().splitlines()
    (second.kept / "depth_resnet.csv").write_text("\n".join(rows[:2]) + "\n")
    config = (first.kept / "depth_resnet.yaml").read_text()
    (second.kept / "depth_resnet.yaml").write_text(config.replace(str(first.runs), str(second.runs)))
    _, again, key = make.row_search(second, "resnet")
    assert "1 trial(s) taken from" in (second.runs / "logs" / f"{key}.log").read_text()
    assert [(t["depth"], t["seed"], t["val_err"]) for t in again] == [
        (t["depth"], t["seed"], t["val_err"]) for t in trials
    ]
    assert again[0]["seconds"] == trials[0]["seconds"]  # its time is the kept trial's, not trained again
    assert make.search_time(second, key, again) == pytest.approx(sum(float(t["seconds"]) for t in again))


@pytest.mark.subprocess
def test_a_script_stopped_with_sigterm_stops_the_command_it_runs(tmp_path):
    """`kill` of a results script (a long search in the background) stops the `train.py` command it runs too, which
    otherwise went on alone (a killed search continues when run again, tests/test_resume.py)."""
    script("depth")
    from regenerate import regenerate, stopped

    started = []

    def kill_when_it_runs(folder: Path) -> None:
        while not folder.is_dir():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    def block(page) -> str:
        processes = page._processes

        class Recorded:  # the command's process, to see it end
            def Process(self, **kwargs):
                started.append(processes.Process(**kwargs))
                threading.Thread(target=kill_when_it_runs, args=(page.runs / "runs" / "long",), daemon=True).start()
                return started[-1]

        page._processes = Recorded()
        page.train("search", "long", "--config", page.config("depth/elu.yaml"), *page.data, "--upper", "60")
        return "| unreachable |"

    page = tmp_path / "p.md"
    page.write_text("<!-- generated: p/a -->\n| old |\n<!-- end generated -->\n")
    with pytest.raises(SystemExit) as exited:
        regenerate("p", {"p/a": block}, ["--smoke", "--page", str(page), "--runs", str(tmp_path / "runs")])
    assert exited.value.code == 128 + signal.SIGTERM
    assert started and started[0].exitcode == -signal.SIGKILL  # killed with the script, not left running
    assert signal.getsignal(signal.SIGTERM) is not stopped  # this process's own handler is back
