"""What one Sharpness measurement costs against a training step, and so what the callback adds to a fit at its
default interval (every 2,500 steps).

Nets as their configs build them, on random inputs of their data's shape (speed does not depend on the values):
the quickstart's ResNet k = 9 (batch 64), the dead-unit study's MNIST VGG (batch 128) and the depth line's
delta-orthogonal tanh net at k = 87 (batch 256, the question of spec 08). A step is forward, backward and the optimizer's
update; a measurement is `Sharpness`'s at its defaults (a probe of the first batch's first 256 samples, up to 20
products of the power iteration, 10 of the trace; the tolerance is set to 0 so that all 20 are taken, and 20 more
where the first finds a negative eigenvalue: the worst case; under SGD; one net again under Adam, whose preconditioned sharpness adds 20 more products). Step and
measurement alternate, `--repeats` times; the medians are reported.

    python benchmarks/sharpness.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from callbacks.sharpness import sharpness_of  # noqa: E402
from lightning_modules import Classifier  # noqa: E402
from lightning_modules.run.config_files import net_from_config  # noqa: E402

NETS = {  # name: (config, batch, input shape, depth override, optimizer)
    "quickstart ResNet k=9": ("quickstart.yaml", 64, (1, 28, 28), None, "sgd"),
    "MNIST VGG (dead units)": ("dead_units/mnist_vgg_adam.yaml", 128, (1, 28, 28), None, "sgd"),
    "MNIST VGG, Adam (+ preconditioned)": ("dead_units/mnist_vgg_adam.yaml", 128, (1, 28, 28), None, "adam"),
    "tanh delta-orthogonal k=87": ("depth/tanh_delta_orthogonal.yaml", 256, (1, 28, 28), 87, "sgd"),
}
INTERVAL = 2500  # Sharpness's default every_n_steps


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cost(
    config: str, batch: int, shape: tuple[int, ...], depth: int | None, optimizer: str, repeats: int
) -> tuple[float, float]:
    """Median seconds of a training step and of a measurement, alternated `repeats` times after a warm-up."""
    net = net_from_config(ROOT / "configs" / config)
    if depth is not None:
        net = net.at_depth(depth)
    torch.manual_seed(0)
    model = Classifier(net).train()
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    probe = (x[:256], y[:256])  # the callback's probe: the first (up to 256) samples of the first batch
    if optimizer == "adam":
        chosen = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        chosen = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        chosen.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        chosen.step()

    def measure() -> None:
        sharpness_of(model, probe, chosen, torch.Generator().manual_seed(0), tol=0.0)

    step(), measure()  # warm up
    steps, measures = [], []
    for _ in range(repeats):
        steps.append(timed(step))
        measures.append(timed(measure))
    return statistics.median(steps), statistics.median(measures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"| net | batch | step (s) | measurement (s) | measurement / step | overhead every {INTERVAL:,} steps |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (config, batch, shape, depth, optimizer) in NETS.items():
        s, m = cost(config, batch, shape, depth, optimizer, args.repeats)
        print(f"| {name} | {batch} | {s:.3f} | {m:.2f} | {m / s:.0f} | {m / (INTERVAL * s):.1%} |", flush=True)


if __name__ == "__main__":
    main()
