"""Seeds of one net trained together as one vectorised model (torch.func), as independent runs.

Seed s gets what `train.py fit --seed_everything s` gives a run: the net initialised right after
`torch.manual_seed(s)`, the training data in that run's order (the datamodule's ShardedOrder seeded
with s, reshuffled each epoch) and its own optimizer state. The seeds' parameters are stacked along
a new leading dimension; one `vmap` of `grad_and_value` gives every seed the gradient of its own
loss in one pass. One optimizer over stacked tensors is S independent optimizers when it works
elementwise, as SGD, Adam, AdamW and RMSprop do.

Randomness during training is each member's own (`vmap(..., randomness="different")`): every member
draws its own dropout masks and random slopes, and the data augmentation draws per sample. So a member
equals `fit --seed_everything s` exactly when training draws nothing at random (no dropout, no random
slope, no augmentation: the tests hold it to 1e-5); otherwise it is an independent run with the same
distribution as that fit, not the same draws.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from datamodules.tensor_data import ShardedOrder, TensorDataModule, TensorLoader
from lightning_modules.statistics.moments import MomentAccumulator, Moments

OptimizerFactory = Callable[[Iterable[tuple[str, torch.Tensor]]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class _Method(nn.Module):
    """Calls one method of `net`, so `functional_call` can run methods other than forward."""

    def __init__(self, net: nn.Module, method: str):
        super().__init__()
        self.net, self.method = net, method

    def forward(self, *args):
        return getattr(self.net, self.method)(*args)


@dataclass
class EpochRecord:
    """One epoch of every member of the stack; lists are per member."""

    epoch: int
    train_loss: list[float]
    train_acc: list[float]
    penalty: list[float]  # lambda * the net's penalty, the term added to the loss
    val_loss: list[float]
    val_acc: list[float]
    sizes: dict[str, list[float]] = field(default_factory=dict)
    grad_norm: list[float] = field(default_factory=list)  # of all parameters, at the epoch's last step (before it)
    weight_norm: list[float] = field(default_factory=list)  # of all parameters, at the epoch's end


@dataclass
class HiddenStatistics:
    """What the observers measure on the hidden layer, per seed: peak activation, moments, pre-activation rows."""

    peaks: torch.Tensor  # (seeds, units)
    moments: list[Moments]
    pre_rows: torch.Tensor  # (seeds, samples, units), at most `pca_samples` samples


class SeedStack:
    """S copies of one architecture, each with its own initialisation, trained as one vmapped model.

    Members are usually seeds of one net; they may also differ in what only sets initial values
    (a flexible layer's starting size) and in the penalty weight, and may then share a seed.
    """

    def __init__(self, nets: list[nn.Module], seeds: list[int]):
        if len(nets) != len(seeds) or not nets:
            raise ValueError("one seed per net, at least one net")
        shapes = {tuple((n, tuple(p.shape)) for n, p in net.state_dict().items()) for net in nets}
        if len(shapes) > 1:
            raise ValueError("the nets of a stack must have the same parameter names and shapes")
        self.seeds = list(seeds)
        self.template = copy.deepcopy(nets[0]).to("meta")  # holds the structure; the stacks hold the values
        # an untouched copy for `net`: a call may leave state on the template (a random slope drawn under vmap)
        self.blueprint = copy.deepcopy(self.template)
        params, buffers = stack_module_state(nets)
        self.params = {f"net.{name}": p for name, p in params.items()}
        self.buffers = {f"net.{name}": b for name, b in buffers.items()}

    @classmethod
    def build(cls, makers: list[Callable[[], nn.Module]], seeds: Iterable[int]) -> SeedStack:
        """Every maker for every seed (maker-major), each initialised as a run seeded with it would be:
        `torch.manual_seed(seed)`, then `make()`."""
        seeds = list(seeds)
        nets, member_seeds = [], []
        for make in makers:
            for seed in seeds:
                torch.manual_seed(seed)
                nets.append(make())
                member_seeds.append(seed)
        return cls(nets, member_seeds)

    def __len__(self) -> int:
        return len(self.seeds)

    def to(self, device: torch.device | str) -> SeedStack:
        with torch.no_grad():
            self.params = {n: p.to(device).requires_grad_(p.requires_grad) for n, p in self.params.items()}
            self.buffers = {n: b.to(device) for n, b in self.buffers.items()}
        return self

    def call(self, method: str, *args, training: bool = False):
        """`net.<method>(*args)` for every seed at once, on the same inputs, in evaluation mode unless `training`
        (dropout and random slopes then draw per member); outputs get a leading seed dim."""
        probe = _Method(self.template, method).train(training)

        def one(params, buffers):
            return functional_call(probe, (params, buffers), args)

        return vmap(one, randomness="different")(self.params, self.buffers)

    def net(self, index: int) -> nn.Module:
        """Seed `index` as an ordinary module of its own (a copy, in evaluation mode), e.g. to save or inspect it."""
        net = copy.deepcopy(self.blueprint).to_empty(device=next(iter(self.params.values())).device)
        state = {name[len("net.") :]: t[index].detach() for name, t in {**self.params, **self.buffers}.items()}
        net.load_state_dict(state)
        return net.eval()

    def fit(
        self,
        data: TensorDataModule,
        epochs: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        penalty: float | list[float] = 0.0,
        on_epoch: Callable[[EpochRecord], None] | None = None,
    ) -> list[EpochRecord]:
        """Train all seeds for `epochs` epochs on `data`'s training split, validating after each epoch.

        Args:
            data: a set-up in-memory datamodule (its splits are read directly).
            epochs: epochs to train.
            optimizer: builds the optimizer from named parameters (stacked tensors named `net.<param>`, as
                a LightningModule names its net's), e.g. `Classifier.build_optimizer`.
            scheduler: builds an lr scheduler from the optimizer, stepped once per epoch.
            penalty: lambda, the weight of `net.penalty()` in the loss: one for all, or one per member.
            on_epoch: called with each epoch's record (for progress output).
        """
        if getattr(data, "first_epoch_batch_size", None):
            raise ValueError(
                "a seed stack trains every epoch at the datamodule's batch_size: first_epoch_batch_size is not "
                "honoured here (unset it, or train the seeds one by one with `fit`)"
            )
        opt = one_pass(optimizer(self.params.items()))
        sched = scheduler(opt) if scheduler is not None else None
        train = data.splits["train"]
        orders = [ShardedOrder(len(train), True, seed) for seed in self.seeds]
        loader = TensorLoader(train, data.batch_size, data.mean, data.std, orders[0], augment=data.augment)
        probe = _TrainProbe(self.template)
        lams = torch.as_tensor(penalty, dtype=torch.float32, device=train.images.device).expand(len(self))

        def loss_fn(params, buffers, x, y, lam):
            logits, size_penalty = functional_call(probe, (params, buffers), (x,))
            task = F.cross_entropy(logits, y)
            added = lam * size_penalty
            return task + added, (task.detach(), added.detach(), (logits.argmax(-1) == y).sum())

        # gradients as functions (vmap of grad), not autograd through a vmapped forward: each seed's weight
        # gradient then comes out in its parameter's layout, where autograd's accumulation would copy
        # the whole stack, transposed, every step (half the step time of a 784-256-10 stack on a CPU)
        step = vmap(grad_and_value(loss_fn, has_aux=True), randomness="different")  # each member its own draws
        trained = [name for name, p in self.params.items() if p.requires_grad]
        records = []
        for epoch in range(epochs):
            probe.train()  # `evaluate` below leaves the template in evaluation mode, as Lightning's validation does
            for order in orders:
                order.set_epoch(epoch)
            index = torch.stack([order.indices() for order in orders]).to(train.images.device)  # (members, samples)
            # per member: task loss, added penalty, correct, samples; read once per epoch (no per-step sync)
            sums = torch.zeros(4, len(self), dtype=torch.float64, device=train.images.device)
            for b in range(len(loader)):
                rows = index[:, b * data.batch_size : (b + 1) * data.batch_size]
                x, y = loader.batch(rows.reshape(-1))  # every member's batch in one gather
                x, y = x.view(*rows.shape, *x.shape[1:]), y.view(rows.shape)
                with torch.no_grad():  # no outer graph: the gradients come from the transform
                    grads, (_, (task, added, correct)) = step(self.params, self.buffers, x, y, lams)
                for name in trained:
                    self.params[name].grad = grads[name]
                if b == len(loader) - 1:  # the training-dynamics signals per member, once an epoch (no sync per step)
                    grad_norm = member_norms(grads[name] for name in trained)
                opt.step()
                n = y.shape[1]
                sums += torch.stack([task * n, added * n, correct, torch.full_like(task, n)]).double()
            if sched is not None:
                sched.step()
            val_loss, val_acc = self.evaluate(data.eval_dataloader("val"))
            sums = sums.cpu()
            record = EpochRecord(
                epoch,
                (sums[0] / sums[3]).tolist(),
                (sums[2] / sums[3]).tolist(),
                (sums[1] / sums[3]).tolist(),
                val_loss.tolist(),
                val_acc.tolist(),
                {name: size.float().cpu().tolist() for name, size in self.sizes().items()},
                grad_norm.cpu().tolist(),
                member_norms(p.detach() for p in self.params.values()).cpu().tolist(),
            )
            records.append(record)
            if on_epoch is not None:
                on_epoch(record)
        return records

    def sizes(self) -> dict[str, torch.Tensor]:
        """Each seed's effective size per sized layer, `{layer: (seeds,)}`."""
        with torch.no_grad():
            return {name: size.expand(len(self)) for name, size in self.call("sizes").items()}

    @torch.no_grad()
    def evaluate(self, loader: TensorLoader) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and accuracy of every seed over one loader, as (seeds,) CPU tensors."""
        loss = torch.zeros(len(self), dtype=torch.float64, device=loader.split.images.device)
        correct, count = torch.zeros_like(loss), 0
        for x, y in loader:
            logits = self.call("forward", x)  # (seeds, batch, classes)
            loss += (
                F.cross_entropy(logits.flatten(0, 1), y.repeat(len(self)), reduction="none").view(len(self), -1).sum(1)
            )
            correct += (logits.argmax(-1) == y).sum(1)
            count += len(y)
        return (loss / max(count, 1)).cpu(), (correct / max(count, 1)).cpu()

    @torch.no_grad()
    def hidden_statistics(self, loader: TensorLoader, pca_samples: int = 2048) -> HiddenStatistics:
        """Peak activation, moments and pre-activation rows of the hidden units of every seed (nets with
        `hidden_activations(x) -> (pre, post)`), as DeadUnits and ActivationStats measure them."""
        peaks = None
        accumulators = [MomentAccumulator() for _ in range(len(self))]
        rows, kept = [], 0
        for x, _ in loader:
            pre, post = self.call("hidden_activations", x)  # (seeds, batch, units)
            peak = post.amax(1)
            peaks = peak if peaks is None else torch.maximum(peaks, peak)
            for accumulator, seed_post in zip(accumulators, post, strict=True):
                accumulator.update(seed_post)
            if kept < pca_samples:
                rows.append(pre[:, : pca_samples - kept])
                kept += rows[-1].shape[1]
        if peaks is None:
            raise ValueError("the loader yielded no batches")
        return HiddenStatistics(peaks, [a.moments() for a in accumulators], torch.cat(rows, 1))


def member_norms(stacked: Iterable[torch.Tensor]) -> torch.Tensor:
    """The L2 norm over all these stacked tensors of each member (the leading dimension): (members,)."""
    return torch.stack([t.float().reshape(len(t), -1).pow(2).sum(1) for t in stacked]).sum(0).sqrt()


def one_pass(
    optimizer: torch.optim.Optimizer, kernels: tuple[str, ...] = ("fused", "foreach")
) -> torch.optim.Optimizer:
    """The same optimizer with its fused kernel (or else its foreach one; the first of `kernels` it has) where the
    config left the choice open: the default per-tensor path makes several temporaries the size of the whole stack
    per step, 6x slower for 16 seeds of a 784-256-10 net on a CPU (fused Adam: the same update, to rounding)."""
    defaults = optimizer.defaults
    if defaults.get("differentiable") or defaults.get("foreach"):
        return optimizer
    for flag in kernels:
        if flag in defaults and defaults[flag] is None:
            try:
                return type(optimizer)([{**g, flag: True} for g in optimizer.param_groups], **{**defaults, flag: True})
            except (RuntimeError, ValueError):  # not on this device or dtype: try the next, or keep it as it is
                continue
    return optimizer


class _TrainProbe(nn.Module):
    """forward(x) -> (logits, penalty) of `net`, in one functional call."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x), self.net.penalty()
