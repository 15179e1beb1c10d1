"""What a task stream and continual backprop add to a training step (spec 07).

The MLP of configs/plasticity/permuted_digits.yaml (784-256-10, SGD, batch 64) on the embedded digits, timed per
training step over the same number of steps, modes round-robin:
  plain     the digits as they are (one task)
  stream    a permuted-inputs TaskStream (a pixel gather per batch, on the device)
  cbp       the stream with continual backprop at its default rate (utility per step, replacements)

    python benchmarks/task_stream.py [--steps 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules import Digits, TaskStream  # noqa: E402
from lightning_modules import Classifier  # noqa: E402
from lightning_modules.nets import MLP  # noqa: E402
from lightning_modules.plasticity import Plasticity  # noqa: E402


class StepTimer(pl.Callback):
    """The wall time of every training step after the first few."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self.start)


def run(mode: str, steps: int) -> float:
    pl.seed_everything(0, verbose=False)
    data = Digits(batch_size=64)
    if mode != "plain":
        data = TaskStream(data, "permuted_inputs", tasks=steps // 100, steps_per_task=100)
    plasticity = Plasticity(cbp=True) if mode == "cbp" else None
    model = Classifier(MLP(width=256), plasticity=plasticity)
    timer = StepTimer()
    trainer = pl.Trainer(
        max_steps=steps, val_check_interval=100, check_val_every_n_epoch=None, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    return statistics.median(timer.times[10:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (a multiple of 100)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {m: [] for m in ("plain", "stream", "cbp")}
    for _ in range(args.rounds):
        for mode in times:
            times[mode].append(run(mode, args.steps))
    median = {m: statistics.median(t) for m, t in times.items()}
    print(json.dumps({
        **{f"{m}_ms": round(1000 * v, 3) for m, v in median.items()},
        "stream/plain": round(median["stream"] / median["plain"], 3),
        "cbp/stream": round(median["cbp"] / median["stream"], 3),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
