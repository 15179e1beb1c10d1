"""`train.py sweep` as a user runs it: grids, stacked seeds, tables, plots, W&B offline, and bad input."""

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules.nets import MLP
from lightning_modules.studies.launchers import written_out
from lightning_modules.studies.sweep import expand_grids, stack_groups
from lightning_modules.studies.sweep_plots import plot_frontier
from tests.conftest import CONFIGS, QUIET, cli, cli_error, make_mnist


def test_grids_expand_to_their_products_and_group_by_shape():
    points = expand_grids(
        [
            {"layer": ["flexible"], "width": [64], "start_size": [8, 32], "penalty": [0.1, 1.0]},
            {"layer": ["static"], "width": [8, 16]},
        ]
    )
    assert len(points) == 6 and points[0] == {"layer": "flexible", "width": 64, "start_size": 8, "penalty": 0.1}
    groups = stack_groups(points)
    assert [len(g) for g in groups] == [4, 1, 1]  # start sizes and penalties share a stack; widths do not
    with pytest.raises(ValueError, match="empty grid"):
        expand_grids([{}])


def sweep(root: Path, *extra: str):
    return cli(
        "sweep",
        "--config",
        CONFIGS / "network_size" / "flexible.yaml",
        "--data.data_dir",
        root,
        "--data.download",
        "false",
        "--data.val_size",
        "24",
        "--data.batch_size",
        "16",
        *QUIET,
        *extra,
    ).trainer


@pytest.mark.parametrize("grid_config", sorted((CONFIGS / "network_size").glob("sweep_*.yaml")), ids=lambda p: p.stem)
def test_every_sweep_config_runs_and_writes_its_tables_and_plots(in_tmp, grid_config):
    """Every point of the config's grids builds (on the meta device: shapes only); the config then runs with the
    first two values of each list (sweep_widths.yaml's widths go up to 2,896: two small ones show the same)."""
    grids = yaml.safe_load(grid_config.read_text())["grids"]
    with torch.device("meta"):
        for point in expand_grids(grids):
            MLP(**{k: v for k, v in point.items() if k != "penalty"})
    cut = [{key: values[:2] for key, values in grid.items()} for grid in grids]
    root = make_mnist(in_tmp / "data", n_train=120)
    trainer = sweep(
        root, "--config", grid_config, "--grids", yaml.safe_dump(cut, default_flow_style=True).strip(),
        "--seeds", "2", "--epochs", "2", "--seed_everything", "5",
    )  # fmt: skip
    folder = Path(trainer.log_dir)
    rows = list(csv.DictReader(open(folder / "runs.csv")))
    history = list(csv.DictReader(open(folder / "history.csv")))
    assert len(rows) == 2 * len(expand_grids(cut)) and len(history) == 2 * len(rows)
    assert {r["seed"] for r in rows} == {"5", "6"}
    for row in rows:  # the table's accuracy is the run's last epoch in the history
        (last,) = [
            h
            for h in history
            if h["epoch"] == "1" and all(h[k] == row[k] for k in ("layer", "width", "start_size", "penalty", "seed"))
        ]
        assert row["val_acc"] == last["val_acc"] and int(row["dead"]) <= int(row["width"])
        assert "pca_k90" in row and "shapiro_w" in row
        if row["layer"] == "static":
            assert float(row["size"]) == int(row["width"]) and float(row["penalty"]) == 0
    plots = {p.name for p in folder.glob("*.png")}
    if "widths" in grid_config.stem:
        assert {"variance_by_width.png", "width_metrics.png"} <= plots
    else:
        assert {"size_vs_epoch.png", "frontier.png", "width_metrics.png"} <= plots
        flexible = [r for r in rows if r["layer"] == "flexible"]
        assert sorted({float(r["start_size"]) for r in flexible}) == [32.0, 128.0]
    assert "| layer | width |" in (folder / "runs.md").read_text()


@pytest.mark.slow
def test_sweep_defaults_to_the_config_net_and_logs_to_wandb_offline(in_tmp, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = make_mnist(in_tmp / "data", n_train=120)
    args = ["--seeds", "2", "--epochs", "1", "--model.init_args.net.init_args.width", "160"]
    trainer = sweep(root, *args, "--wandb", "true")
    rows = list(csv.DictReader(open(Path(trainer.log_dir) / "runs.csv")))
    assert [r["layer"] for r in rows] == ["flexible", "flexible"] and float(rows[0]["start_size"]) == 128
    media = {p.relative_to(in_tmp).as_posix() for p in in_tmp.glob("wandb/offline-run-*/files/media/**/*")}
    for key in ("table/sweep/runs", "table/sweep/history", "images/sweep/size_vs_epoch", "images/sweep/frontier"):
        assert any(f"/media/{key}_" in m for m in media), (key, sorted(media))
    study = (Path(trainer.log_dir) / "wandb_run_id").read_text().strip()
    trainer.loggers[-1].experiment.finish()
    written_out()  # as at the end of the process: W&B writes a finished run's file when it closes it, later
    runs = {p.stem.split("-", 1)[1]: p.read_bytes() for p in in_tmp.glob("wandb/offline-run-*/*.wandb")}
    assert len(runs) == 1 + len(rows) and study in runs  # the study's run, and one per (point, seed)
    assert all(f"{trainer.run.name}-{study}".encode() in data for data in runs.values())  # in the study's group
    assert sum(b"the config net seed=1" in data for data in runs.values()) == 1


def test_a_stack_that_failed_is_in_the_tables_and_the_plots_leave_it_out(tmp_path):
    from lightning_modules.nets import MLP
    from lightning_modules.studies.sweep import failed_rows, markdown_summary
    from lightning_modules.studies.sweep_plots import write_plots

    net = MLP(layer="flexible", width=64, start_size=32)
    rows = failed_rows(net, [{"penalty": 0.5}, {"layer": "static"}], [0, 1], 3, 0.1, "RuntimeError: CUDA error")
    assert [(r["layer"], r["penalty"], r["seed"]) for r in rows] == [
        ("flexible", 0.5, 0), ("flexible", 0.5, 1), ("static", 0.0, 0), ("static", 0.0, 1)
    ]  # fmt: skip
    table = markdown_summary(rows)
    assert table.count("2 FAILED: RuntimeError: CUDA error") == 2
    assert write_plots(rows, [], [torch.empty(0)] * len(rows), tmp_path) == []


def test_sweep_errors_are_one_line(in_tmp, capsys):
    make_mnist(in_tmp / "data", n_train=120)
    grid = in_tmp / "grid.yaml"
    grid.write_text("grids:\n  - {layer: [static], depth: [3]}\n")
    error = cli_error(
        "sweep", "--config", CONFIGS / "network_size" / "static.yaml", "--config", grid, "--data.data_dir", "data",
        "--data.download", "false", "--wandb", "false", capsys=capsys,
    )  # fmt: skip
    assert error == "error: sweep grid point layer=static depth=3: MLP has no argument(s) ['depth']: one of " + str(
        sorted(MLP().args)
    )


def test_a_killed_sweep_restarted_with_the_same_command_trains_only_the_stacks_it_lacks(in_tmp, capsys):
    root = make_mnist(in_tmp / "data", n_train=120)
    args = [
        "--config",
        CONFIGS / "network_size" / "sweep_widths.yaml",
        "--grids",
        "[{layer: [static], width: [16, 32]}]",
    ]
    args += ["--seeds", "2", "--epochs", "1"]
    folder = Path(sweep(root, *args).log_dir)
    whole = (folder / "runs.csv").read_text()
    progress = torch.load(folder / "sweep_progress.pt", weights_only=True)
    assert len(progress) >= 2, "needs a sweep of two stacks or more"
    # as if killed while training the last stack: its results and the final tables are not there yet
    torch.save({n: done for n, done in progress.items() if n < len(progress)}, folder / "sweep_progress.pt")
    for name in ("runs.csv", "runs.md", "history.csv"):
        (folder / name).unlink()
    capsys.readouterr()
    again = sweep(root, *args)
    out = capsys.readouterr().out
    assert Path(again.log_dir) == folder and "sweep: continuing" in out  # the same folder, continued
    assert out.count("already in") == len(progress) - 1 and f"sweep [{len(progress)}/{len(progress)}] 1" in out
    assert (folder / "runs.csv").read_text() == whole  # the same table as the uninterrupted sweep


def test_the_frontier_colours_learned_sizes_by_penalty_with_a_colour_bar(tmp_path):
    static = [{"layer": "static", "width": w, "val_acc": a} for w, a in ((32, 0.9), (64, 0.93))]
    sized = [
        {"layer": "flexible", "size": 40.0, "val_acc": 0.92, "penalty": 0.003},
        {"layer": "sparsifier", "size": 150.0, "val_acc": 0.95, "penalty": 0.01},
        {"layer": "sparsifier", "size": 450.0, "val_acc": 0.96, "penalty": 0.0},
    ]
    fig = plot_frontier(static, sized, tmp_path / "frontier.png")
    plot, bar = fig.axes
    assert bar.get_ylabel() == "log10 penalty" and bar.get_ylim() == pytest.approx((math.log10(0.003), -2))


def test_runs_md_prints_a_spread_to_the_digits_of_its_mean():
    from lightning_modules.studies.sweep import markdown_summary

    point = {"layer": "flexible", "width": 64, "start_size": 32, "penalty": 0.1}
    rows = [
        {**point, "seed": s, "size": size, "val_acc": acc} for s, (size, acc) in enumerate([(40, 0.91), (43, 0.94)])
    ]
    cells = [c.strip() for c in markdown_summary(rows).splitlines()[-1].strip("|").split("|")]
    size, acc = cells[5], cells[6]  # after layer, width, start size, penalty and seeds
    assert size == f"41.5 ({torch.tensor([40.0, 43.0]).std().item():.1f})"  # not 41.5 (2.1213)
    assert acc == f"0.9250 ({torch.tensor([0.91, 0.94], dtype=torch.float64).std().item():.4f})"


def labelled_ticks(ax) -> list[str]:
    """The x tick labels a reader sees: major and minor ticks inside the axis' range that have a label."""
    low, high = ax.get_xlim()
    labels = []
    for ticks, formatter in ((ax.xaxis.get_majorticklocs(), ax.xaxis.get_major_formatter()),
                             (ax.xaxis.get_minorticklocs(), ax.xaxis.get_minor_formatter())):  # fmt: skip
        inside = [x for x in ticks if low <= x <= high]
        labels += [(x, label) for x, label in zip(inside, formatter.format_ticks(inside), strict=True) if label]
    return [label for _, label in sorted(labels)]


def test_the_log_width_axes_label_every_power_of_two_across_the_widths(tmp_path):
    """Widths 16 to 512 on a log axis: labelled 16, 32, ..., 512, not one tick at 100."""
    from lightning_modules.studies.sweep_plots import plot_width_metrics

    static = [
        {"layer": "static", "width": w, "seed": s, "val_acc": 0.9, "var_sum": w / 4, "dead": 1, "shapiro_w": 0.9}
        for w in (16, 32, 64, 128, 256, 512)
        for s in (0, 1)
    ]
    widths = ["16", "32", "64", "128", "256", "512"]
    assert labelled_ticks(plot_frontier(static, [], tmp_path / "frontier.png").axes[0]) == widths
    for ax in plot_width_metrics(static, tmp_path / "width_metrics.png").axes:
        assert labelled_ticks(ax) == widths, ax.get_title()
