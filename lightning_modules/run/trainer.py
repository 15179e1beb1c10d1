"""The Trainer of this framework: Lightning's, plus the `count` and `search` subcommands."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import ArgumentParser
from pytorch_lightning.loggers import WandbLogger
from torch import nn

from lightning_modules.counting import CountResult, count_model
from lightning_modules.errors import ConfigError, require
from lightning_modules.run.checkpoints import load_net
from lightning_modules.run.files import atomic_save
from lightning_modules.studies.launchers import Failed, make_launcher
from lightning_modules.studies.noise import (
    NOISE_LEVELS,
    NoiseResult,
    checkpoint_label,
    evaluate_noise,
    write_noise_results,
)
from lightning_modules.studies.search import SearchResult, TrialLog, describe, run_searches, search_plan, write_results
from lightning_modules.studies.sweep import (
    TRAINING_KEYS,
    expand_grids,
    failed_rows,
    point_label,
    stack_groups,
    write_tables,
)
from lightning_modules.studies.sweep_plots import write_plots
from lightning_modules.studies.trials import DepthTrial, StackTrial, TrialRuns, bare_trainer, portable, quiet_lightning

__all__ = ["ResearchTrainer", "bare_trainer", "config_name", "net_from_config", "quiet_lightning"]

SWEEP_PROGRESS = "sweep_progress.pt"  # the stacks a sweep has trained, for a restart of the same command


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


class ResearchTrainer(pl.Trainer):
    """Lightning's Trainer with the framework's subcommands `count`, `search`, `sweep` and `noise`."""

    @property
    def log_every_n_steps(self) -> int:
        """The configured logging interval, shortened to the epoch when an epoch has fewer batches."""
        batches = getattr(getattr(self, "fit_loop", None), "max_batches", math.inf)
        if isinstance(batches, int) and 0 < batches < self._log_every_n_steps:
            return batches
        return self._log_every_n_steps

    @log_every_n_steps.setter
    def log_every_n_steps(self, value: int) -> None:
        self._log_every_n_steps = value

    def _one_process(self, study: str, why: str) -> None:
        """Refuse a multi-process setting that a study would otherwise ignore (or run once per rank)."""
        if self.world_size > 1:
            raise ConfigError(f"{study} runs in one process ({why}): set --trainer.devices 1 --trainer.num_nodes 1")

    def _refuse_unhonoured(self, study: str, honoured: tuple[str, ...] = ()) -> None:
        """Refuse the trainer settings that change training but that a study's own trainings would not apply."""
        changed = {
            "precision": str(self.precision) not in ("32-true", "32"),
            "max_steps": self.max_steps not in (None, -1),
            "accumulate_grad_batches": self.accumulate_grad_batches != 1,
            "gradient_clip_val": bool(self.gradient_clip_val),
            "limit_train_batches": self.limit_train_batches not in (None, 1.0),
        }
        ignored = [f"--trainer.{name}" for name, set_ in changed.items() if set_ and name not in honoured]
        if ignored:
            raise ConfigError(f"{study} does not apply {', '.join(ignored)} to its trainings: unset it")

    def count(
        self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None, per_layer: bool = False
    ) -> CountResult:
        """Print the parameters and mult-adds of the model's net for one sample of the datamodule's input.

        Args:
            per_layer: also print a per-layer table.
        """
        result = count_model(model, datamodule)
        print(result.summary())
        if per_layer:
            print(result.table())
        return result

    def search(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        upper: int | None = None,
        seeds: int = 1,
        epochs: int = 3,
        max_error: float = 0.2,
        variants: dict[str, int] | None = None,
        launcher: Literal["local", "ray"] = "local",
        ray_address: str | None = None,
        cpus_per_trial: float = 1,
        trials_per_gpu: int = 1,
    ) -> list[SearchResult]:
        """Binary-search the deepest trainable depth k of the model's net, then confirm the boundary.

        Each depth trains `epochs` epochs from scratch per seed (or the trainer's `max_steps` when it is
        set, e.g. by configs/presets/original_steps.yaml); it is trainable when the mean validation
        error over its seeds is below `max_error`. Writes results.csv, results.md and error_vs_depth.png
        into the run folder and logs the table to W&B, where each trial is also a run of its own.

        Args:
            upper: the largest depth to try (the search runs over k = 3, 6, ..., upper).
            seeds: seeds trained per depth (the confirmation uses fresh ones).
            epochs: epochs per trial (the spec: 3).
            max_error: trainability threshold on the validation error (the spec: 0.2).
            variants: instead of the model's own net, search each of these configs' `model.net`,
                mapped to its own upper bound; data, optimizer and trainer settings stay this run's.
            launcher: where trials train: `local` (here, one after another) or `ray` (in parallel, as Ray
                tasks: a probe's seeds, the two confirmation depths and the variants' searches).
            ray_address: the Ray cluster to run on (`ray` launcher; default: a Ray instance started here).
            cpus_per_trial: CPUs each Ray trial asks for (and its torch threads).
            trials_per_gpu: Ray trials sharing one GPU when the cluster has GPUs; 0 trains on CPUs only.
        """
        self._one_process("search", "each trial trains on one device; --launcher ray trains trials in parallel")
        self._refuse_unhonoured("search", honoured=("precision", "max_steps"))
        require("positive", seeds=seeds, epochs=epochs, cpus_per_trial=cpus_per_trial)
        require("probability", max_error=max_error)
        require("non_negative", trials_per_gpu=trials_per_gpu)
        for name, bound in [("upper", upper), *(variants or {}).items()]:
            if bound is not None and bound < 3:
                raise ConfigError(
                    f"{name}: the search's upper bound must be at least 3 (the shallowest depth), got {bound}"
                )
        if not callable(getattr(datamodule, "eval_dataloader", None)):  # each trial's error on its training split
            raise ConfigError(f"search needs one of the in-memory datamodules; {type(datamodule).__name__} is not")
        if variants:
            jobs = [(config_name(path), net_from_config(path), bound) for path, bound in variants.items()]
        elif upper is not None:
            jobs = [(getattr(self, "run_name", None) or type(model.net).__name__, model.net, upper)]
        else:
            raise ValueError("search needs --upper (the largest depth to try) or --variants")
        for _, net, _ in jobs:
            if not hasattr(net, "at_depth"):
                raise TypeError(f"{type(net).__name__} has no at_depth(k): the search must rebuild it at other depths")
        first_seed = pl.seed_everything(verbose=False)  # the run's seed (seed_everything in the config)
        steps = self.max_steps if self.max_steps and self.max_steps > 0 else None
        length = f"{steps} steps" if steps else f"{epochs} epochs"
        log = TrialLog(Path(self.log_dir or self.default_root_dir) / "results.csv")  # a killed search's trials
        if log.trials:
            print(f"search: {len(log.trials)} trial(s) already in {log.path}, not trained again")
        plans = {}
        runner = make_launcher(launcher, ray_address, cpus_per_trial, trials_per_gpu)
        try:
            device = self.strategy.root_device
            if launcher == "local":  # this process's device and data, as they are
                where = dict(datamodule=datamodule, device=str(device))
            else:  # the worker's device; the data is read here once and travels once, on the CPU
                datamodule.trainer = self
                datamodule.setup("fit")
                where = dict(datamodule=portable(datamodule), device=None if runner.gpu else "cpu")
            nets = {name: net for name, net, _ in jobs}
            trial = DepthTrial(nets, portable(model), epochs=epochs, steps=steps, precision=self.precision,
                               runs=TrialRuns.of(self), **where)  # fmt: skip
            for name, _, bound in jobs:
                print(f"search {name}: k in 3..{bound}, {seeds} seed(s) per depth, {length}, "
                      f"trainable below {max_error:.0%}")  # fmt: skip
                plans[name] = search_plan(bound, seeds, max_error, first_seed, name)
            results = run_searches(
                plans, trial, runner, log, lambda r: print(f"search {r.variant}: {describe(r, max_error)}", flush=True)
            )
        finally:
            runner.close()
        self._report(results, max_error)
        return results

    def _report(self, results: list[SearchResult], max_error: float) -> None:
        folder = Path(self.log_dir or self.default_root_dir)
        paths = write_results(results, max_error, folder)
        print(paths["md"].read_text())
        print(f"search results: {paths['csv']}, {paths['md']}, {paths['plot']}")
        trials = [t for r in results for t in r.trials]
        columns = list(vars(trials[0]))
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("search/trials", columns=columns, data=[list(vars(t).values()) for t in trials])
                logger.log_table(
                    "search/deepest",
                    columns=["variant", "upper", "deepest", "confirmed"],
                    data=[[r.variant, r.upper, r.deepest, r.confirmed] for r in results],
                )
                logger.log_image("search/error_vs_depth", [str(paths["plot"])])

    def sweep(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        grids: list[dict[str, list]] | None = None,
        seeds: int = 4,
        epochs: int = 3,
        pca_samples: int = 2048,
        pca_k: list[int] | None = None,
        zero_tol: float = 0.0,
        launcher: Literal["local", "ray"] = "local",
        ray_address: str | None = None,
        cpus_per_trial: float = 1,
        trials_per_gpu: int = 1,
    ) -> list[dict]:
        """Train every point of the grids for `seeds` seeds, all seeds of a point at once (vmapped), and
        measure accuracy, size, dead units and the activation statistics of the hidden layer.

        Writes runs.csv, runs.md, history.csv and the study's plots into the run folder and logs them to
        W&B, where each (point, seed) is also a run of its own. Seeds start at the run's
        `seed_everything`; seed s starts as `fit --seed_everything s` would (its initialisation and data order)
        and, with nothing drawn at random in training (no random slope, dropout or augmentation), trains as
        that fit would; otherwise it draws its own randomness: an independent run, not the same draws.

        Args:
            grids: a list of grids, each mapping MLP arguments (width, layer, start_size, ...) or `penalty`
                to a list of values; a grid stands for the cartesian product of its lists. Default: the
                model's own net.
            seeds: seeds per grid point.
            epochs: epochs per run.
            pca_samples: validation samples whose pre-activations enter the PCA.
            pca_k: top-k components whose reconstruction distance is reported (default 1, 10, 50).
            zero_tol: a unit with activation variance at or below this counts as zero-variance.
            launcher: where the stacks train: `local` (here, one after another) or `ray` (in parallel, one
                Ray task per stack).
            ray_address: the Ray cluster to run on (`ray` launcher; default: a Ray instance started here).
            cpus_per_trial: CPUs each Ray stack asks for (and its torch threads).
            trials_per_gpu: Ray stacks sharing one GPU when the cluster has GPUs; 0 trains on CPUs only.
        """
        self._one_process("sweep", "it stacks seeds, not ranks")
        self._refuse_unhonoured("sweep")
        require("positive", seeds=seeds, epochs=epochs, pca_samples=pca_samples, cpus_per_trial=cpus_per_trial)
        require("non_negative", zero_tol=zero_tol, trials_per_gpu=trials_per_gpu)
        require("positive", **{f"pca_k[{i}]": k for i, k in enumerate(pca_k or ())})
        if getattr(datamodule, "first_epoch_batch_size", None):
            raise ConfigError("sweep trains every epoch at data.batch_size: unset data.first_epoch_batch_size")
        if not callable(getattr(model.net, "variant", None)) or not callable(getattr(model, "build_optimizer", None)):
            raise ConfigError(
                f"sweep needs a Classifier-like model over a net with variant(**args) "
                f"(lightning_modules.nets.MLP); got {type(model).__name__} over {type(model.net).__name__}"
            )
        points = expand_grids(grids) if grids else [{}]
        for point in points:  # every point must build, before any training starts (shapes only: no memory)
            try:
                with torch.device("meta"):
                    model.net.variant(**{k: v for k, v in point.items() if k not in TRAINING_KEYS})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"sweep grid point {point_label(point)}: {e}") from e
        first_seed = pl.seed_everything(verbose=False)
        seed_list = list(range(first_seed, first_seed + seeds))
        datamodule.trainer = self
        datamodule.setup("fit")
        groups = stack_groups(points)
        progress_path = Path(self.log_dir or self.default_root_dir) / SWEEP_PROGRESS
        done = torch.load(progress_path, weights_only=True) if progress_path.is_file() else {}  # a killed sweep's
        for n in sorted(n for n in done if n <= len(groups)):
            print(f"sweep [{n}/{len(groups)}] already in {progress_path}, not trained again", flush=True)
        results = {n: done[n] for n in done if n <= len(groups)}
        runner = make_launcher(launcher, ray_address, cpus_per_trial, trials_per_gpu)
        try:
            if launcher == "local":
                where = dict(datamodule=datamodule, device=str(self.strategy.root_device))
            else:
                where = dict(datamodule=portable(datamodule), device=None if runner.gpu else "cpu")
            stack = StackTrial(portable(model), epochs=epochs, pca_samples=pca_samples,
                               pca_k=tuple(pca_k or (1, 10, 50)), zero_tol=zero_tol, **where)  # fmt: skip
            handles = {}
            for n, group in enumerate(groups, 1):
                if n not in results:
                    label = f"sweep [{n}/{len(groups)}] {len(group)} point(s) x {seeds} seed(s) as one stack"
                    print(f"{label}, {epochs} epochs", flush=True)
                    handles[runner.submit(label, stack, group, seed_list)] = n
            runs = TrialRuns.of(self)
            while handles:
                handle, outcome = runner.wait()
                n = handles.pop(handle)
                group = groups[n - 1]
                if isinstance(outcome, Failed):  # reported in the tables, trained again by a restart
                    penalty = getattr(model, "penalty", 0.0)
                    failed = failed_rows(model.net, group, seed_list, epochs, penalty, outcome.error)
                    results[n] = failed, [], [torch.empty(0)] * len(failed)
                    continue
                results[n] = done[n] = outcome
                atomic_save(done, progress_path)  # each stack as it finishes: a restarted sweep skips it
                self._say_stack(n, len(groups), group, outcome, seeds, epochs, runs)
        finally:
            runner.close()
        rows, history, variances = [], [], []
        for n in sorted(results):
            rows, history, variances = rows + results[n][0], history + results[n][1], variances + results[n][2]
        self._report_sweep(rows, history, variances)
        return rows

    @staticmethod
    def _say_stack(n: int, total: int, group: list[dict], outcome, seeds: int, epochs: int, runs) -> None:
        """Print a finished stack's accuracies and sizes; log each of its runs to W&B as a run of its own."""
        rows, history, _ = outcome
        for i, point in enumerate(group):
            members = rows[i * seeds : (i + 1) * seeds]
            accs = ", ".join(f"{r['val_acc']:.4f}" for r in members)
            sizes = ", ".join(f"{r['size']:g}" for r in members)
            print(f"  [{n}/{total}] {point_label(point) or 'the config net'}: val acc {accs}; size {sizes}", flush=True)
        if runs is None:
            return
        for i, row in enumerate(rows):
            point = group[i // seeds]
            config = {**point, "seed": row["seed"], "epochs": epochs}
            name = f"{point_label(point) or 'the config net'} seed={row['seed']}"
            runs.log_finished(name, config, history[i * epochs : (i + 1) * epochs], row)

    def _report_sweep(self, rows: list[dict], history: list[dict], variances: list) -> None:
        folder = Path(self.log_dir or self.default_root_dir)
        paths = write_tables(rows, history, folder)
        plots = write_plots(rows, history, variances, folder)
        print(paths["md"].read_text())
        print("sweep results: " + ", ".join(str(p) for p in [*paths.values(), *plots]))
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                for key, table in (("sweep/runs", rows), ("sweep/history", history)):
                    columns = list(dict.fromkeys(k for row in table for k in row))
                    logger.log_table(key, columns=columns, data=[[row.get(c) for c in columns] for row in table])
                for plot in plots:
                    logger.log_image(f"sweep/{plot.stem}", [str(plot)])

    def noise(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        checkpoints: list[str] | str | None = None,
        levels: list[float] | None = None,
        split: str = "test",
        noise_seed: int = 0,
    ) -> list[NoiseResult]:
        """Accuracy of trained models on the test split under input noise, and their noise scores.

        Each checkpoint is evaluated with the net of its own run (the `config.yaml` beside its
        `checkpoints/` folder; else this config's net), on this config's data. Writes noise.csv,
        noise.md and noise.png into the run folder and logs the table and plot to W&B.

        Args:
            checkpoints: the checkpoints to evaluate: `--checkpoints A.ckpt`, `--checkpoints [A.ckpt,B.ckpt]`, or
                `--checkpoints+=A.ckpt --checkpoints+=B.ckpt`.
            levels: noise levels a (default 0, 0.05, ..., 0.5, the paper's).
            split: the split to make noisy.
            noise_seed: seed of the noise, the same for every model.
        """
        self._one_process("noise", "it evaluates on one device")
        require("fraction", **{f"levels[{i}]": level for i, level in enumerate(levels or ())})
        paths = [checkpoints] if isinstance(checkpoints, str) else list(checkpoints or [])
        if not paths:
            raise ConfigError("noise needs --checkpoints: one or more checkpoints of trained models")
        if not callable(getattr(datamodule, "noise_dataloader", None)):
            raise ConfigError(f"noise needs a datamodule with noise_dataloader; {type(datamodule).__name__} has none")
        levels = tuple(levels) if levels is not None else NOISE_LEVELS
        datamodule.trainer = self
        datamodule.setup("test")
        device = self.strategy.root_device
        results = []
        for path in paths:
            path = Path(path)
            config = path.parent.parent / "config.yaml"
            net = net_from_config(config) if config.is_file() else copy.deepcopy(model.net)
            load_net(net, path)
            evaluated = copy.deepcopy(portable(model))  # without the trainer and the CLI the model refers to
            evaluated.net = net
            evaluated.setup("test")
            evaluated.to(device).eval()
            result = evaluate_noise(
                evaluated,
                lambda level: datamodule.noise_dataloader(split, level, noise_seed),
                levels,
                checkpoint_label(path),
                device,
            )
            accuracies = ", ".join(f"{level:g}: {result.accuracy(level):.4f}" for level in levels)
            print(f"noise {result.model}: {accuracies}; noise score {result.noise_score:,}", flush=True)
            results.append(result)
        folder = Path(self.log_dir or self.default_root_dir)
        written = write_noise_results(results, folder)
        print(written["md"].read_text())
        print(f"noise results: {written['csv']}, {written['md']}, {written['plot']}")
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                columns = ["model", *(f"acc@{level:g}" for level in levels), "noise_score"]
                data = [[r.model, *(r.accuracy(level) for level in levels), r.noise_score] for r in results]
                logger.log_table("noise/results", columns=columns, data=data)
                logger.log_image("noise/accuracy_vs_noise", [str(written["plot"])])
        return results
