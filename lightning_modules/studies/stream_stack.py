"""The seeds of one intervention trained over a task stream together, as one vmapped model (torch.func), where the
net and the intervention allow it; each member trains as its own `StreamTrial` would, to float rounding.

The members are the trial's nets, each drawn from its seed and stacked by `SeedStack`. Each reads the stream in
the order its own fit would (a ShardedOrder seeded with its seed); every member's batch of a step comes through one
gather and the stream's transform of that step's task. L2 Init is a term of the vmapped loss. Shrink and perturb
and a head reset draw each member's fresh weights as its own trial does: from (its seed, step), on the stack's
device. At each task's end every member is measured on an ordinary copy of its net, with the same formulas as the
loop's callbacks (TaskAccuracy, DeadUnits, ActivationStats, WeightSpectra). Continual backprop and ReDo act on one
net's modules through hooks, so their trials train one by one (`stack_refusal` says which trials cannot stack).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from callbacks.activation_observer import DEFAULT_TYPES, select_layers
from callbacks.training_dynamics import weighted_layers
from callbacks.weight_spectra import spectra_metrics
from datamodules.task_stream import TaskStream
from datamodules.tensor_data import ShardedOrder, TensorLoader, moved_splits
from lightning_modules.classifier import Classifier
from lightning_modules.errors import LossExplodedError, NonFiniteLossError
from lightning_modules.layers.kwinners import KWinnersBase
from lightning_modules.layers.sparse_weights import SparseWeights
from lightning_modules.plasticity import Plasticity, draw_seed, fresh_parameters, head_of, reinitialise
from lightning_modules.run.console import say
from lightning_modules.statistics.spectra import spectrum
from lightning_modules.statistics.unit_health import (
    blocked_entries,
    dormant_scores,
    dormant_share,
    passing_units,
    singular_values,
    srank,
    summed_abs_per_unit,
)
from lightning_modules.studies.seed_stack import SeedStack, _Method, one_pass
from lightning_modules.studies.trials import TrialRuns, worker_device

BLOCKING_EPS = 0.05  # a tanh or ELU unit is dead when its slope is at most this on every entry (DeadUnits')
DORMANT_TAU = 0.025  # the dormant share's tau
FEATURE_ROWS = 2048  # the outputs whose srank is measured (ActivationStats' pca_samples)
SPECTRA_TAIL = 20  # the fewest eigenvalues of an alpha's tail: a 10-class head's 10 get none, the hidden layers do
# each measure's key as the trial's callbacks log it
LOGGED = {"acc_online": "task/acc_online", "acc_final": "task/acc_final", "dead": "dead/fraction",
          "dormant": f"dormant/tau{DORMANT_TAU:g}/total", "srank": "act/srank_mean", "weight_norm": "task/weight_norm",
          "stable_rank": "spectra/stable_rank_mean", "alpha": "spectra/alpha_mean"}  # fmt: skip


def stack_refusal(model: pl.LightningModule, settings: dict, stream: TaskStream) -> str | None:
    """Why the seeds of this intervention cannot train as one stack (None: they can)."""
    if type(model) is not Classifier:
        return f"{type(model).__name__} adds to the Classifier's loss and steps"
    if settings.get("cbp"):
        return "continual backprop replaces units of one net through its hooks"
    if model.recycle is not None:
        return "ReDo recycles units of one net through its hooks"
    if model.scheduler_factory is not None:
        return "a learning-rate scheduler is stepped by Lightning's loop"
    for module in model.net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return "batch norm's running statistics are not stacked here"
        if isinstance(module, (KWinnersBase, SparseWeights)):
            return f"{type(module).__name__} keeps state of one net between steps"
    if getattr(stream.data, "augment", None) is not None:
        return "augmentation would draw other samples than each seed's own fit"
    return None


@torch.no_grad()
def task_end_measures(net: nn.Module, loader: TensorLoader) -> dict[str, float]:
    """One net at a task's end, over the task's evaluation loader, as the trial's callbacks measure it: final
    accuracy; the share of dead units (off, or saturated on every entry, DeadUnits' rule) and of tau-dormant ones
    over all monitored layers; the mean srank of their outputs over the first FEATURE_ROWS samples; the weight norm
    of the weighted layers (TaskAccuracy's); the weights' mean stable rank and alpha (WeightSpectra's)."""
    net.eval()
    layers = select_layers(net, tuple(DEFAULT_TYPES), ("*",))
    peaks, passing, sums, features = {}, {}, {}, {}

    def observe(name: str, module: nn.Module, inputs, output: torch.Tensor) -> None:
        h = output.detach()
        sums[name] = sums[name] + summed_abs_per_unit(h) if name in sums else summed_abs_per_unit(h)
        passes = passing_units(module, h, blocked_entries(module, h, BLOCKING_EPS))
        if passes is not None:
            passing[name] = passing[name] | passes if name in passing else passes
        peak = (h.amax(dim=tuple(range(2, h.dim()))) if h.dim() > 2 else h).amax(dim=0).float()
        peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
        room = FEATURE_ROWS - sum(len(rows) for rows in features.get(name, []))
        if room > 0:
            pooled = h[:room].float()
            pooled = pooled.mean(dim=tuple(range(2, pooled.dim()))) if pooled.dim() > 2 else pooled.clone()
            features.setdefault(name, []).append(pooled)

    handles = [m.register_forward_hook(lambda m, i, o, n=name: observe(n, m, i, o)) for name, m in layers.items()]
    correct, samples = 0, 0
    try:
        for x, y in loader:
            correct += int((net(x).argmax(dim=1) == y).sum())
            samples += len(y)
    finally:
        for handle in handles:
            handle.remove()
    dead = [~passing[n] if n in passing else peaks[n] <= 0 for n in peaks]
    scores = torch.cat([dormant_scores(sums[n].cpu().double() / max(samples, 1)) for n in sums])
    ranks = [srank(sigma=singular_values(torch.cat(rows))) for rows in features.values()]
    weights = weighted_layers(net)
    norms = [m.weight.detach().float().norm() for m in weights.values()]
    spectra = spectra_metrics({name: spectrum(m.weight, SPECTRA_TAIL) for name, m in weights.items()})
    units = sum(len(d) for d in dead)
    return {
        "acc_final": correct / samples if samples else math.nan,
        "dead": float(sum(int(d.sum()) for d in dead)) / units if units else math.nan,
        "dormant": dormant_share(scores, DORMANT_TAU),
        "srank": sum(ranks) / len(ranks) if ranks else math.nan,
        "weight_norm": float(torch.linalg.vector_norm(torch.stack(norms))) if norms else math.nan,
        "stable_rank": spectra["spectra/stable_rank_mean"],
        "alpha": spectra["spectra/alpha_mean"],
    }


@dataclass
class StackedStreamTrial:
    """The seeds of one intervention over the whole stream as one stack: `trial(name, settings, seeds)` returns
    one row per seed and task, as `StreamTrial(name, settings, seed)` would for each seed; with `runs`, each seed is
    also a W&B run of its own in the study's group, with its per-task measures."""

    template: pl.LightningModule
    datamodule: pl.LightningDataModule
    device: str | None = None
    runs: TrialRuns | None = None

    def __call__(self, name: str, settings: dict, seeds: list[int]) -> list[dict]:
        device = worker_device(self.device)
        stream = copy.copy(self.datamodule)
        if not stream.splits:
            stream.setup()
        stream.splits = moved_splits(stream.splits, device)
        nets = []
        for seed in seeds:  # each net as its own trial draws it
            pl.seed_everything(seed, verbose=False)
            net = copy.deepcopy(self.template.net)
            reinitialise(net, seed)
            nets.append(net)
        stack = SeedStack(nets, seeds).to(device)
        members = [Plasticity(**settings, seed=seed) for seed in seeds]
        history = self.train(stack, stream, members, device)
        rows = [{"intervention": name, "seed": seed, **row} for seed, rows in zip(seeds, history, strict=True)
                for row in rows]  # fmt: skip
        if self.runs is not None:
            for seed, own in zip(seeds, history, strict=True):
                log = [{"step": (r["task"] + 1) * stream.steps_per_task - 1, "task/index": r["task"],
                        **{LOGGED[k]: r[k] for k in LOGGED}} for r in own]  # fmt: skip
                config = {"intervention": name, "seed": seed, **settings, "stacked": True}
                self.runs.log_finished(f"{name} seed={seed}", config, log, log[-1] if log else {}, step_key="step")
        return rows

    def train(
        self, stack: SeedStack, stream: TaskStream, members: list[Plasticity], device: torch.device
    ) -> list[list[dict]]:
        """Every member over the stream; per member, one row of measures per task."""
        settings = members[0]
        shell = copy.deepcopy(self.template)  # its optimizer recipe and parameter groups, over the stacked tensors
        # fused SGD cannot step a tensor whose momentum a head reset dropped beside others that have one
        kernels = ("foreach",) if settings.head_reset else ("fused", "foreach")
        optimizer = one_pass(shell.build_optimizer(stack.params.items()), kernels)
        scratch = copy.deepcopy(self.template.net).to(device)  # where fresh weights are drawn, on the trial's device
        names = [f"net.{n}" for n, _ in scratch.named_parameters()]
        initial = {n: stack.params[n].detach().clone() for n in names} if settings.l2_init else None
        train = stream.splits["train"]
        orders = [ShardedOrder(len(train), True, member.seed) for member in members]
        loader = TensorLoader(train, stream.batch_size, stream.mean, stream.std, orders[0])
        probe = _Method(stack.template, "forward").train()

        def loss_fn(params, buffers, init, x, y):
            logits = functional_call(probe, (params, buffers), (x,))
            loss = F.cross_entropy(logits, y)
            if init is not None:
                loss = loss + settings.l2_init * sum(((params[n] - init[n]) ** 2).sum() for n in names)
            return loss, (logits.argmax(-1) == y).sum()

        step_fn = vmap(grad_and_value(loss_fn, has_aux=True), in_dims=(0, 0, 0 if initial else None, 0, 0),
                       randomness="different")  # fmt: skip
        trained = [n for n, p in stack.params.items() if p.requires_grad]
        count, per_task = len(members), stream.steps_per_task
        correct = torch.zeros(count, dtype=torch.long, device=device)  # this task's online counts, read at its end
        seen = 0
        guard = DivergenceGuard(shell, count, device)
        rows: list[list[dict]] = [[] for _ in members]
        batches, index = len(loader), None
        for step in range(stream.tasks.count * per_task):
            epoch, b = divmod(step, batches)
            if b == 0:
                for order in orders:
                    order.set_epoch(epoch)
                index = torch.stack([order.indices() for order in orders]).to(device)  # (members, samples)
            if step > 0:
                self.before_step(stack, optimizer, scratch, names, members, step, step % per_task == 0)
            task = stream.task_at(step)
            picked = index[:, b * stream.batch_size : (b + 1) * stream.batch_size]
            flat = picked.reshape(-1)
            x, y = stream.transform(task, *loader.batch(flat), flat, "train")  # every member's batch in one gather
            x, y = x.view(*picked.shape, *x.shape[1:]), y.view(picked.shape)
            with torch.no_grad():
                grads, (loss, hits) = step_fn(stack.params, stack.buffers, initial, x, y)
            for n in trained:
                stack.params[n].grad = grads[n]
            optimizer.step()
            correct += hits
            seen += picked.shape[1]
            guard.watch(loss)
            if (step + 1) % per_task == 0:
                guard.check(step, [m.seed for m in members])
                online = (correct.double() / seen).cpu().tolist()
                correct.zero_()
                seen = 0
                evaluation = stream.task_dataloader(task)
                for i in range(count):
                    measures = task_end_measures(stack.net(i), evaluation)
                    rows[i].append({"task": task, "acc_online": online[i], **measures})
        return rows

    @staticmethod
    @torch.no_grad()
    def before_step(
        stack: SeedStack, optimizer, scratch: nn.Module, names: list[str], members: list[Plasticity], step: int,
        boundary: bool,
    ) -> None:  # fmt: skip
        """Shrink and perturb and a head reset where due, each member's fresh weights its own trial's draw."""
        s = members[0]
        if s.shrinks and (s.shrink_perturb_every == "step" or boundary):
            draws = [fresh_parameters(scratch, draw_seed(m, step, 0)) for m in members]
            for j, n in enumerate(names):
                fresh = torch.stack([draw[j] for draw in draws])
                stack.params[n].mul_(s.shrink).add_(fresh, alpha=s.perturb)
        if s.head_reset and boundary:
            head_name, head = head_of(scratch)
            parts = [f"net.{head_name}.{part}" for part, _ in head.named_parameters()]
            for i, m in enumerate(members):
                for n, fresh in zip(parts, fresh_parameters(head, draw_seed(m, step, 1)), strict=True):
                    stack.params[n][i].copy_(fresh)
            for n in parts:
                optimizer.state.pop(stack.params[n], None)  # every member's state: reset alike


class DivergenceGuard:
    """The Classifier's divergence limits per member, watched on the device and checked at task ends."""

    def __init__(self, model: Classifier, members: int, device: torch.device):
        self.ratio, self.bound, self.stop = model.max_loss_ratio, model.max_loss, model.on_divergence == "stop"
        self.finite = torch.ones(members, dtype=torch.bool, device=device)
        self.first = torch.full((members,), math.nan, device=device)
        self.peak = torch.full((members,), -math.inf, device=device)

    def watch(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.finite &= torch.isfinite(loss)
        self.first = torch.where(torch.isnan(self.first), loss, self.first)
        self.peak = torch.maximum(self.peak, loss)

    def check(self, step: int, seeds: list[int]) -> None:
        finite = self.finite.cpu().tolist()
        if not all(finite):
            bad = [s for s, ok in zip(seeds, finite, strict=True) if not ok]
            raise NonFiniteLossError(f"the training loss of seed(s) {bad} became NaN or infinite by step {step}")
        exploded = torch.zeros_like(self.finite)
        if self.ratio is not None:
            exploded |= self.peak > self.ratio * self.first.abs()
        if self.bound is not None:
            exploded |= self.peak > self.bound
        if not bool(exploded.any()):
            return
        bad = [s for s, bad in zip(seeds, exploded.cpu().tolist(), strict=True) if bad]
        message = f"the training loss of seed(s) {bad} exploded past the divergence limits by step {step}"
        if self.stop:
            raise LossExplodedError(f"{message} (model.init_args.max_loss_ratio / max_loss / on_divergence)")
        say(f"warning: {message}; training on (on_divergence: warn), not said again.")
        self.ratio = self.bound = None
