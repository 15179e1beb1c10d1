"""Epoch time and whole-process time: the original notebook's loop against `python train.py fit`.

Same machine, same data (the official MNIST test file, 8,000 train / 2,000 val, seed 0), same net
(tanh, k = 12, init N(0, 0.05)), SGD lr 0.01 momentum 0.9, batch 256, 3 epochs; an epoch is one
pass over the training set plus one over the validation set, in every mode.

    python benchmarks/depth_epoch.py [--data ../shared/datasets/mnist-10k] [--repeats 2]

Modes (each run as its own process, so start-up is counted the same way):
  plain-pil     the notebook: a Dataset of PIL images, ToTensor + Normalize per sample, DataLoader(shuffle)
  plain-tensor  the same loop over in-memory tensors
  framework     `python train.py fit` with default settings (W&B offline, CSV, checkpoints, progress bar)
  framework-epochs  the same fit in-process, timing each epoch with a callback
  imports       `import lightning_modules.run.cli` and exit: the import share of the framework's process
  imports-notebook  the notebook's imports (torch, torchvision) and exit
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = [
    "--config",
    "configs/depth/tanh.yaml",
    "--config",
    "configs/presets/mnist_10k.yaml",
    "--model.init_args.net.init_args.depth",
    "12",
    "--trainer.max_epochs",
    "3",
]


def plain(data: Path, pil: bool) -> list[float]:
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision import transforms

    from datamodules.mnist import read_idx
    from lightning_modules.nets import DepthCNN

    torch.manual_seed(0)
    images, labels = read_idx(data / "t10k-images-idx3-ubyte.gz"), read_idx(data / "t10k-labels-idx1-ubyte.gz").long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    val, train = order[:2000], order[2000:]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])

    class PILDigits(torch.utils.data.Dataset):  # what torchvision.datasets.MNIST does per sample
        def __init__(self, index):
            self.images, self.labels = images[index], labels[index]

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return transform(Image.fromarray(self.images[i].numpy(), mode="L")), int(self.labels[i])

    if pil:
        train_loader = torch.utils.data.DataLoader(PILDigits(train), batch_size=256, shuffle=True)
        val_loader = torch.utils.data.DataLoader(PILDigits(val), batch_size=256)
    else:

        def normalised(index):
            return (images[index].float().unsqueeze(1) / 255 - 0.1307) / 0.3081, labels[index]

        (xt, yt), (xv, yv) = normalised(train), normalised(val)
        train_loader = None
        val_loader = [(xv[i : i + 256], yv[i : i + 256]) for i in range(0, len(yv), 256)]

    net = DepthCNN(depth=12, activation="tanh", init_std=0.05)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    epochs = []
    for _ in range(3):
        start = time.perf_counter()
        net.train()
        if pil:
            batches = train_loader
        else:
            perm = torch.randperm(len(yt))
            batches = ((xt[perm[i : i + 256]], yt[perm[i : i + 256]]) for i in range(0, len(yt), 256))
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            errors = sum((net(x).argmax(1) != y).sum().item() for x, y in val_loader)
        epochs.append(time.perf_counter() - start)
        print(f"epoch {len(epochs)}: {epochs[-1]:.2f} s, val err {errors / 2000:.4f}", file=sys.stderr)
    return epochs


def framework_epochs(data: Path) -> list[float]:
    import pytorch_lightning as pl

    from lightning_modules.run.cli import ResearchCLI

    class EpochClock(pl.Callback):
        def __init__(self):
            self.times = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):  # runs after the epoch's validation
            self.times.append(time.perf_counter() - self.start)

    clock = EpochClock()
    ResearchCLI(
        args=[
            "fit",
            *CONFIG,
            "--data.data_dir",
            str(data),
            "--wandb",
            "false",
            "--trainer.enable_progress_bar",
            "false",
        ],
        trainer_defaults={"default_root_dir": "runs", "callbacks": [clock]},
    )
    return clock.times


def run(mode: str, data: Path) -> dict:
    """Run one mode in a fresh process; return its wall time and epoch times."""
    if mode == "framework":
        command = [sys.executable, "train.py", "fit", *CONFIG, "--data.data_dir", str(data)]
    else:
        command = [sys.executable, __file__, "--data", str(data), "--child", mode]
    start = time.perf_counter()
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    wall = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{mode} failed:\n{result.stderr[-3000:]}")
    epochs = json.loads(result.stdout.strip().splitlines()[-1]) if mode != "framework" else []
    return {"mode": mode, "wall_s": wall, "epoch_s": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "mnist-10k")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--child", choices=["plain-pil", "plain-tensor", "framework-epochs", "imports", "imports-notebook"]
    )
    args = parser.parse_args()
    if args.child in ("imports", "imports-notebook"):
        import torch  # noqa: F401
        import torchvision  # noqa: F401

        if args.child == "imports":
            import lightning_modules.run.cli  # noqa: F401
        print(json.dumps([]))
        return
    if args.child:
        times = (
            framework_epochs(args.data)
            if args.child == "framework-epochs"
            else plain(args.data, args.child == "plain-pil")
        )
        print(json.dumps(times))
        return
    if not (args.data / "t10k-images-idx3-ubyte.gz").is_file():
        sys.exit(f"no MNIST test file in {args.data}: pass --data <folder with t10k-*-ubyte.gz>")
    rows = {}
    for _ in range(args.repeats):
        for mode in ("plain-pil", "plain-tensor", "framework-epochs", "framework", "imports", "imports-notebook"):
            r = run(mode, args.data)
            rows.setdefault(mode, []).append(r)
            print(
                f"{mode:17s} wall {r['wall_s']:6.2f} s  epochs {' '.join(f'{e:.2f}' for e in r['epoch_s'])}", flush=True
            )
    best = {mode: min(rs, key=lambda r: r["wall_s"]) for mode, rs in rows.items()}
    epoch = {
        mode: statistics.median(e for r in rs for e in r["epoch_s"]) for mode, rs in rows.items() if rs[0]["epoch_s"]
    }
    print("\n| mode | median epoch (s) | best whole process (s) |\n| --- | ---: | ---: |")
    for mode in rows:
        print(f"| {mode} | {epoch.get(mode, float('nan')):.2f} | {best[mode]['wall_s']:.2f} |")
    print(f"\nframework epoch / plain-pil epoch: {epoch['framework-epochs'] / epoch['plain-pil']:.2f} (target <= 0.6)")
    print(
        f"framework process / plain-pil process: {best['framework']['wall_s'] / best['plain-pil']['wall_s']:.2f} (target <= 0.8)"
    )
    imports, framework = best["imports"]["wall_s"], best["framework"]["wall_s"]
    print(
        f"imports: {imports:.2f} s of the framework's {framework:.2f} s ({imports / framework:.0%}); "
        f"the notebook's own imports (torch, torchvision) {best['imports-notebook']['wall_s']:.2f} s"
    )


if __name__ == "__main__":
    main()
