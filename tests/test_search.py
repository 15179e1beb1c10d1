"""The depth search: the boundary a stub trainability function puts there, its reports, and its trials."""

import copy
import csv
import math
import re
import warnings

import pytest
import pytorch_lightning as pl
import torch
import yaml

from datamodules import Digits
from lightning_modules import Classifier
from lightning_modules.nets import DepthCNN
from lightning_modules.run.cli import main
from lightning_modules.studies.depth_search import TrialLog, describe, is_trainable, search_depth
from lightning_modules.studies.search import DepthTrial, plot_errors, write_results
from lightning_modules.studies.trials import bare_trainer
from tests.conftest import CONFIGS, QUIET, cli, make_mnist, small_splits


def stub(boundary: int, calls: list | None = None):
    """Trainable (error 5%) up to `boundary`, untrainable (error 90%) above it."""

    def train(depth: int, seed: int):
        if calls is not None:
            calls.append((depth, seed))
        return (0.05, 0.05) if depth <= boundary else (0.9, 0.9)

    return train


@pytest.mark.parametrize(
    "upper,boundary", [(450, 447), (450, 450), (24, 3), (24, 0), (120, 84), (150, 93), (300, 156), (30, 12)]
)
def test_finds_the_stub_boundary(upper, boundary):
    calls = []
    result = search_depth(stub(boundary, calls), upper=upper)
    assert result.deepest == boundary and result.confirmed
    assert len(calls) <= math.ceil(math.log2(upper // 3 + 1)) + 2  # a binary search, plus two confirmations


def test_confirmation_trains_both_depths_around_the_boundary_with_fresh_seeds():
    result = search_depth(stub(84), upper=120, seeds=3, first_seed=10)
    confirm = [t for t in result.trials if t.phase == "confirm"]
    assert sorted({t.depth for t in confirm}) == [84, 87]
    assert {t.seed for t in confirm} == {13, 14, 15}
    assert {t.seed for t in result.trials if t.phase == "search"} == {10, 11, 12}


def test_the_confirmation_can_train_more_seeds_than_the_search():
    result = search_depth(stub(84), upper=120, seeds=1, first_seed=10, confirm_seeds=3)
    assert {t.seed for t in result.trials if t.phase == "search"} == {10}
    confirm = sorted((t.depth, t.seed) for t in result.trials if t.phase == "confirm")
    assert confirm == [(84, 11), (84, 12), (84, 13), (87, 11), (87, 12), (87, 13)] and result.confirmed


def test_noisy_boundary_is_reported_unconfirmed():
    def flaky(depth, seed):  # k=12 trains with the search's seed, fails with others
        ok = depth < 12 or (depth == 12 and seed == 0)
        return (0.05, 0.05) if ok else (0.9, 0.9)

    result = search_depth(flaky, upper=30)
    assert result.deepest == 12 and not result.confirmed


def test_trainable_is_the_mean_over_seeds_and_nan_is_not():
    assert is_trainable([0.1, 0.25], 0.2)  # mean 0.175
    assert not is_trainable([0.1, 0.35], 0.2)
    assert not is_trainable([0.05, float("nan")], 0.2)


def test_upper_below_one_step_is_refused():
    with pytest.raises(ValueError):
        search_depth(stub(3), upper=2)


def test_reports_have_every_trial(tmp_path):
    results = [search_depth(stub(9), upper=24, seeds=2, variant="a"), search_depth(stub(3), upper=12, variant="b")]
    paths = write_results(results, 0.2, tmp_path)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == sum(len(r.trials) for r in results)
    assert {r["variant"] for r in rows} == {"a", "b"}
    text = paths["md"].read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    summary = {cells[0]: cells for cells in rows if len(cells) == 10}  # the per-variant table (trials: 8 columns)
    # variant, bound, predicted (none: a binary search), deepest, original (none for these names), confirmed,
    # trials taken, a binary search's, (none) from a prediction, and the trials' wall times added up
    a_trials, b_trials = (str(len(r.trials)) for r in results)
    assert summary["a"][:-1] == ["a", "24", "", "9", "", "yes", a_trials, a_trials, ""]
    assert summary["b"][:-1] == ["b", "12", "", "3", "", "yes", b_trials, b_trials, ""]
    assert summary["a"][-1] == f"{sum(t.seconds for t in results[0].trials) / 60:.1f} min"
    assert all(0 <= t.seconds < 60 for r in results for t in r.trials)  # each stub trial timed, from submit to result
    assert [float(r["seconds"]) for r in csv.DictReader(paths["csv"].open())] == [
        t.seconds for r in results for t in r.trials
    ]
    assert paths["plot"].stat().st_size > 1000


def test_a_restarted_search_trains_only_the_trials_its_log_lacks(tmp_path):
    path = tmp_path / "results.csv"
    first_calls, whole = [], search_depth(stub(84), upper=120, seeds=2)
    log = TrialLog(path)
    search_depth(stub(84, first_calls), upper=120, seeds=2, log=log)
    trials = list(csv.DictReader(path.open()))
    assert len(trials) == len(first_calls) == len(whole.trials)  # each trial recorded as it was trained
    kept = trials[:5]  # as if killed after five trials
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(kept[0]))
        writer.writeheader()
        writer.writerows(kept)
    calls = []
    resumed = search_depth(stub(84, calls), upper=120, seeds=2, log=TrialLog(path))
    assert len(calls) == len(whole.trials) - 5 and not {(int(t["depth"]), int(t["seed"])) for t in kept} & set(calls)
    assert [(t.depth, t.seed, t.trainable, t.phase) for t in resumed.trials] == [
        (t.depth, t.seed, t.trainable, t.phase) for t in whole.trials
    ]
    assert resumed.deepest == whole.deepest == 84


def test_describe_says_when_no_depth_trains():
    none = search_depth(stub(0), upper=24, seeds=2)
    assert describe(none, 0.2) == "no depth trainable: k = 3 has val err 0.90 (trainable: below 0.20)"
    assert describe(search_depth(stub(12), upper=24), 0.2) == "deepest trainable k = 12 (confirmed)"


def test_a_trial_that_crashes_twice_is_reported_failed_and_retried_by_a_restart(tmp_path, capsys):
    crashes = []

    def crashing_at_6(depth, seed):
        if depth == 6 and len(crashes) < 2:
            crashes.append(seed)
            raise RuntimeError("out of memory")
        return stub(9)(depth, seed)

    log = TrialLog(tmp_path / "results.csv")
    result = search_depth(crashing_at_6, upper=12, log=log)
    failed = [t for t in result.trials if t.error]
    assert [(t.depth, t.error) for t in failed] == [(6, "RuntimeError: out of memory")] and len(crashes) == 2
    assert result.deepest == 3  # counted as untrainable, the other trials kept
    assert "1 trial(s) FAILED" in describe(result, 0.2)
    assert "failed: RuntimeError: out of memory" in write_results([result], 0.2, tmp_path)["md"].read_text()
    assert "crashed (attempt 2 of 2): RuntimeError: out of memory" in capsys.readouterr().out

    calls = []
    again = search_depth(stub(9, calls), upper=12, log=TrialLog(tmp_path / "results.csv"))
    assert calls[0] == (6, 0) and (3, 0) not in calls  # the failed trial trains again, the others do not
    assert again.deepest == 9 and not any(t.error for t in again.trials)


def test_a_trials_train_error_is_the_trained_nets_on_the_whole_training_split():
    """Not the running mean over the last epoch's batches (which mixes the weights of every step of the epoch)."""
    data = Digits(batch_size=64)
    template = Classifier(DepthCNN(depth=3), optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    train_err, val_err = DepthTrial({"net": template.net}, template, data, epochs=2)("net", 3, 0)

    pl.seed_everything(0, verbose=False)  # the same trial by hand
    model = copy.deepcopy(template)
    model.net = template.net.at_depth(3)
    trainer = bare_trainer(2)
    trainer.fit(model, datamodule=data)
    model.eval()
    with torch.no_grad():
        wrong = sum(int((model(x).argmax(1) != y).sum()) for x, y in data.eval_dataloader("train"))
    assert train_err == wrong / len(data.splits["train"])
    assert val_err == trainer.callback_metrics["val/err"].item()
    assert train_err != trainer.callback_metrics["train/err"].item()  # what the column held before


def test_the_error_plot_ticks_the_probed_depths(tmp_path):
    """One depth probed: a tick at k = 3, not a float axis from 2.85 to 3.15."""
    fig = plot_errors([search_depth(stub(3), upper=3)], 0.2, tmp_path / "errors.png")
    assert list(fig.axes[0].get_xticks()) == [3] and (tmp_path / "errors.png").is_file()
    many = plot_errors([search_depth(stub(447), upper=450)], 0.2, tmp_path / "many.png")
    assert all(float(t).is_integer() for t in many.axes[0].get_xticks())


def test_a_search_where_no_depth_trains_says_what_its_confirmation_found(tmp_path):
    """Not `confirmed: yes` beside `none`: the confirmation found k = 3 untrainable again (or trainable with other
    seeds); the plot's legend says that none trains, not k* = 0."""
    none = search_depth(stub(0), upper=24, variant="none")

    def lucky(depth, seed):  # k = 3 trains with the confirmation's seed only
        return (0.05, 0.05) if depth == 3 and seed == 1 else (0.9, 0.9)

    noisy = search_depth(lucky, upper=24, variant="noisy")
    paths = write_results([none, noisy, search_depth(stub(9), upper=24, variant="nine")], 0.2, tmp_path)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in paths["md"].read_text().splitlines()]
    confirmed = {cells[0]: cells[5] for cells in rows if len(cells) == 10}
    assert confirmed == {
        "variant": "confirmed",
        "---": "---",
        "none": "k = 3 fails again",
        "noisy": "no: k = 3 trains with other seeds",
        "nine": "yes",
    }
    legend = [t.get_text() for t in plot_errors([none], 0.2, tmp_path / "none.png").axes[0].get_legend().get_texts()]
    assert legend[0] == "none (no depth trainable)"


def test_the_error_plot_marks_diverged_and_failed_trials_apart_from_trained_ones(tmp_path):
    def unstable(depth, seed):  # k = 3 trains, k = 6 diverges, deeper crashes
        if depth > 6:
            raise RuntimeError("out of memory")
        return (0.05, 0.05) if depth == 3 else (math.nan, math.nan)

    result = search_depth(unstable, upper=24, variant="net")  # probes k = 12 (fails), 6, 3; confirms 3 and 6
    fig = plot_errors([result], 0.2, tmp_path / "errors.png")
    ax = fig.axes[0]
    drawn = {line.get_label(): (line.get_marker(), list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
    assert drawn["net (k*=3)"] == ("o", [3, 3], [0.05, 0.05])  # trained: at their error
    assert drawn["_diverged net"][:2] == ("x", [6, 6]) and drawn["_failed net"][:2] == ("s", [12])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "diverged (drawn at error 1)" in legend and "failed (drawn at error 1)" in legend


def test_a_diverging_trial_says_diverged_without_torchmetrics_nan_warnings():
    """Its NaN losses reach the epoch's means before the finiteness check stops it; torchmetrics' warning that it
    drops them would come between the search's trial lines, which say `diverged` already."""
    data = Digits(batch_size=64)
    template = Classifier(DepthCNN(depth=3), optimizer=lambda p: torch.optim.SGD(p, lr=math.inf))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        errors = DepthTrial({"net": template.net}, template, data, epochs=1)("net", 3, 0)
    assert all(math.isnan(e) for e in errors)  # diverged
    assert [str(w.message) for w in caught if "nan" in str(w.message).lower()] == []


def test_the_gpu_table_preset_searches_every_variant_with_three_seeds_and_prints_its_wall_time(in_tmp, capsys):
    """configs/presets/depth_table_gpu.yaml on search_all.yaml: 3 seeds, the GPU, Ray with 8 trials per GPU, as parsed;
    run here on the CPU, one variant cut to k <= 6 and 2 steps per trial (too few to train), it trains 3 seeds at
    k = 3, 3 fresh ones to confirm, and prints the search's wall time."""
    preset = CONFIGS / "presets" / "depth_table_gpu.yaml"
    base = ["--config", CONFIGS / "depth" / "resnet.yaml", "--config", CONFIGS / "depth" / "search_all.yaml"]
    with pytest.raises(SystemExit):
        main(["search", *map(str, base), "--config", str(preset), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert (config["seeds"], config["launcher"], config["trials_per_gpu"]) == (3, "ray", 8)
    assert config["trainer"]["accelerator"] == "gpu" and len(config["variants"]) == 8
    root = make_mnist(in_tmp / "data", n_train=160)
    cli("search", *base, "--config", preset, *small_splits(root), "--variants", f"{{{CONFIGS / 'depth' / 'tanh.yaml'}: 6}}",
        "--trainer.accelerator", "cpu", "--launcher", "local", "--trainer.max_steps", "2", *QUIET)  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"search: 6 trial\(s\) trained in \d+ s of wall time", out)  # k = 3 fails; 3 fresh seeds agree
    assert all(f"depth/tanh k=   3 seed={seed}" in out for seed in range(6))
