"""The Trainer of this framework: Lightning's, plus the subcommands `count`, `propagate`, `search`, `sweep`,
`noise`, `plasticity` and `similarity`.

LightningCLI registers a subcommand from a Trainer method: its signature is the command line, its docstring the
help. So the methods are here and each is a few lines; a study's body is its module under `studies/`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import pytorch_lightning as pl

from lightning_modules.counting import CountResult, count_model
from lightning_modules.run.run_state import Run
from lightning_modules.studies.noise import NoiseResult, run_noise
from lightning_modules.studies.plasticity import run_plasticity
from lightning_modules.studies.propagate import Prediction, run_propagate
from lightning_modules.studies.search import SearchResult, run_search
from lightning_modules.studies.similarity import run_similarity
from lightning_modules.studies.study import Study
from lightning_modules.studies.sweep import run_sweep


class ResearchTrainer(pl.Trainer):
    """Lightning's Trainer with the framework's subcommands: count, propagate, search, sweep, noise, plasticity, similarity.

    `run` is the run's state, set by the CLI (None when the Trainer is built by hand). The first line is the title
    of the trainer's settings in `--help`: one whole line."""

    run: Run | None = None

    @property
    def log_every_n_steps(self) -> int:
        """The configured logging interval, shortened to the epoch when an epoch has fewer batches."""
        batches = getattr(getattr(self, "fit_loop", None), "max_batches", math.inf)
        if isinstance(batches, int) and 0 < batches < self._log_every_n_steps:
            return batches
        return self._log_every_n_steps

    @log_every_n_steps.setter
    def log_every_n_steps(self, value: int) -> None:
        self._log_every_n_steps = value  # Lightning's own assignment (see run/library_internals.py)

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

    def propagate(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        depths: list[int] | None = None,
        seeds: int = 3,
        pairs: int = 32,
        variants: dict[str, int] | None = None,
    ) -> list[Prediction]:
        """Measure signal propagation through the untrained net at each depth and predict its deepest trainable depth.

        At every block of the net rebuilt at each depth (`at_depth`, seeded as `fit` would), over pairs of
        training images: the length q^l, the pair correlation c^l and the loss's gradient norm (float64, training
        mode); the fitted depth scales xi_c and xi_grad; the prediction 6 min(xi_c, xi_grad) from the deepest
        depth, with its range over seeds; for plain nets the mean-field values beside them. Writes
        propagation.csv, depth_scales.csv, mean_field.csv, propagation.md and propagation_<variant>.png into the
        run folder and logs the tables and plots to W&B. Nothing is trained.

        Args:
            depths: depths k to measure (multiples of 3, at least 6; default 12, 24, 48, 96).
            seeds: initialisations per depth, from the run's seed on.
            pairs: input pairs per net (2 * pairs training images).
            variants: instead of the model's own net, probe each of these configs' `model.net` (the values,
                the search's upper bounds, are not used here), e.g. configs/depth/search_all.yaml.
        """
        args = dict(depths=depths, seeds=seeds, pairs=pairs, variants=variants)
        return self._study("propagate", run_propagate, model, datamodule, **args)

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
        bracket: Literal["binary", "predicted"] = "binary",
        probe_depth: int = 96,
        confirm_seeds: int | None = None,
        trials_from: str | None = None,
        group_seeds: bool = False,
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
            bracket: `binary` (search [3, upper] from its middle) or `predicted`: first measure each net's signal
                propagation at initialisation (as `propagate` does, 3 seeds at `probe_depth`) and start from the
                depth it predicts, galloping outward to the boundary (a right prediction: 2 probes).
            probe_depth: the depth at which `predicted` measures the untrained net.
            confirm_seeds: fresh seeds trained at each of the two confirmation depths (default: `seeds`).
            trials_from: the run folder of an earlier search of the same nets, data and training (its config.yaml
                says; another is refused): its trials of the same variant (the model's own net under any run
                name), depth and seed are taken, not trained again, e.g. to confirm a finished search with more seeds.
            group_seeds: train the seeds a probe needs at one depth together, as one grouped net (every conv grouped
                by seed, docs/studies.md), each as its own fit would up to float rounding; refused in one line
                where the settings do not allow it (a Classifier of DepthCNNs, an elementwise optimizer, float32 or
                float64). Off by default: on a 2-core CPU a grouped probe took 0.93 to 1.05 of the time of one seed
                after another (benchmarks/README.md).
        """
        args = dict(upper=upper, seeds=seeds, epochs=epochs, max_error=max_error, variants=variants)
        args |= dict(bracket=bracket, probe_depth=probe_depth, confirm_seeds=confirm_seeds, trials_from=trials_from)
        args |= dict(group_seeds=group_seeds)
        launch = dict(launcher=launcher, ray_address=ray_address, cpus_per_trial=cpus_per_trial)
        return self._study("search", run_search, model, datamodule, **args, **launch, trials_per_gpu=trials_per_gpu)

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
        args = dict(grids=grids, seeds=seeds, epochs=epochs, pca_samples=pca_samples, pca_k=pca_k, zero_tol=zero_tol)
        launch = dict(launcher=launcher, ray_address=ray_address, cpus_per_trial=cpus_per_trial)
        return self._study("sweep", run_sweep, model, datamodule, **args, **launch, trials_per_gpu=trials_per_gpu)

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
            split: the split to make noisy (`test`: never the images that validated).
            noise_seed: seed of the noise, the same for every model.
        """
        args = dict(checkpoints=checkpoints, levels=levels, split=split, noise_seed=noise_seed)
        return self._study("noise", run_noise, model, datamodule, **args)

    def plasticity(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        interventions: dict[str, dict] | None = None,
        seeds: int = 3,
        stack_seeds: bool = True,
        launcher: Literal["local", "ray"] = "local",
        ray_address: str | None = None,
        cpus_per_trial: float = 1,
        trials_per_gpu: int = 1,
    ) -> list[dict]:
        """Train every intervention for `seeds` seeds over the config's task stream and compare their plasticity.

        Each (intervention, seed) trains the config's model over the whole stream (data: datamodules.TaskStream)
        with the intervention's `plasticity` settings; per task it records the online and final accuracy, the
        share of dead and of tau-dormant (0.025) units, the mean srank of the monitored layers, the weight norm, and
        the weights' stable rank and power-law alpha (means over the weighted layers). Writes
        results.csv (trial by trial: the same command continues a killed study), results.md (per task: mean and
        spread over seeds; the first and last 3 tasks), plasticity.png and mechanism.png, and the W&B tables.

        Args:
            interventions: name: the Classifier's `plasticity` settings (docs/plasticity.md), e.g.
                `{none: {}, l2_init: {l2_init: 0.001}, cbp: {cbp: true}}`; default: none alone.
            seeds: seeds per intervention, from the run's seed on.
            stack_seeds: train an intervention's seeds together as one vmapped model, each as its own trial would
                (faster; the trials of continual backprop, ReDo, batch norm and a few more train one by one, and
                say why); false: every seed one after another through Lightning's loop.
            launcher: where the trials train: `local` (one after another) or `ray` (in parallel).
            ray_address: the Ray cluster to run on (`ray` launcher; default: a Ray instance started here).
            cpus_per_trial: CPUs each Ray trial asks for (and its torch threads).
            trials_per_gpu: Ray trials sharing one GPU when the cluster has GPUs; 0 trains on CPUs only.
        """
        launch = dict(launcher=launcher, ray_address=ray_address, cpus_per_trial=cpus_per_trial)
        return self._study("plasticity", run_plasticity, model, datamodule, interventions=interventions, seeds=seeds,
                           stack_seeds=stack_seeds, **launch, trials_per_gpu=trials_per_gpu)  # fmt: skip

    def similarity(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        checkpoints: list[str] | str | None = None,
        teacher: bool = False,
        layers: list[str] | None = None,
        types: list[str] | None = None,
        split: str = "test",
        conv: Literal["pool", "flatten"] = "pool",
    ):
        """Representation similarity: the linear CKA map (minibatch CKA, unbiased HSIC) between trained nets' layers.

        `--checkpoints A.ckpt`: A's layers against each other; with `--teacher true` (a student's config) A's layers
        against its teacher's; `--checkpoints [A.ckpt,B.ckpt]`: A's layers against B's (the same layers across
        training on the diagonal). Each checkpoint's net is its own run's (else this config's). Writes
        similarity.csv, similarity.md and similarity.png into the run folder and logs the map to W&B.

        Args:
            checkpoints: one or two checkpoints of trained nets.
            teacher: compare the one checkpoint (a student) with its teacher (the config's `teacher_checkpoint`).
            layers: the layers compared, fnmatch patterns on their names (default all of `types`).
            types: the module classes whose outputs are compared (default the activations: ReLU, ELU, Tanh, KWinners).
            split: the inputs (`test`, or `val`), in the loader's minibatches.
            conv: a conv layer's features: `pool` (averaged over positions) or `flatten` (every position).
        """
        args = dict(checkpoints=checkpoints, teacher=teacher, layers=layers or ["*"], types=types, split=split,
                    conv=conv)  # fmt: skip
        return self._study("similarity", run_similarity, model, datamodule, **args)

    def _study(self, name: str, body: Callable, model: pl.LightningModule, datamodule, **args):
        """Run a study's body; if it fails before anything trained, its new run folder and W&B run go again."""
        try:
            return body(Study(name, self), model, datamodule, **args)
        except BaseException:
            if self.run is not None:
                self.run.discard_if_untrained(self)
            raise
