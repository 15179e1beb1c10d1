"""A small seven-variant depth search, its trials one after another (`--launcher local`) against Ray tasks.

The search of configs/depth/search_all.yaml (the seven depth variants, data and optimizer of
configs/quickstart.yaml: the embedded digits) with every upper bound cut to `--upper` and every trial
to `--steps` steps, so that it ends in minutes on a CPU. Both launchers run it as a user does, one
`python train.py search` process each (W&B off), alternated `--rounds` times; the tables must agree.
Then the launcher's own cost, in-process: Ray's start-up (a local instance and its first trial, which
starts a worker that imports torch and receives the data) and its round trip per trial (a trial that
returns at once, its function already in Ray's object store) against the local launcher's.

    python benchmarks/search_launchers.py [--upper 12] [--steps 30] [--rounds 2]

Ray's local instance takes every core of the machine, one trial per core (`--cpus_per_trial 1`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def search_command(variants: Path, steps: int, launcher: str) -> list[str]:
    command = [sys.executable, str(ROOT / "train.py"), "search", "--config", str(ROOT / "configs" / "quickstart.yaml")]
    command += ["--config", str(variants), "--trainer.max_steps", str(steps), "--wandb", "false", "--name", "bench"]
    command += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    if launcher == "ray":
        command += ["--launcher", "ray", "--cpus_per_trial", "1"]  # as many trials at once as the machine has cores
    return command


def run_search(command: list[str], folder: Path, threads: int | None = None) -> tuple[float, str, int]:
    """Wall seconds of one search process, its results.md and the number of trials it trained."""
    folder.mkdir(parents=True)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    trials = sum(line.startswith("  depth/") for line in done.stdout.splitlines())
    return wall, (folder / "runs" / "bench" / "version_0" / "results.md").read_text(), trials


def return_at_once(depth: int, seed: int) -> tuple[float, float]:
    return 0.0, 0.0


def launcher_costs(tasks: int) -> dict[str, float]:
    """Seconds: Ray's start-up to a first result, and the mean round trip per trial of each launcher."""
    from lightning_modules.studies.launchers import LocalLauncher, RayLauncher

    def round_trip(launcher) -> float:
        start = time.perf_counter()
        for i in range(tasks):
            launcher.submit(f"trial {i}", return_at_once, 3, i)
        for _ in range(tasks):
            launcher.wait()
        return (time.perf_counter() - start) / tasks

    start = time.perf_counter()
    launcher = RayLauncher(cpus_per_trial=1)  # starts a local instance, as `train.py search --launcher ray` does
    launcher.submit("first", return_at_once, 3, 0)
    launcher.wait()
    first = time.perf_counter() - start
    for i in range(4 * (os.cpu_count() or 1)):  # every worker started (each imports torch) before the timing
        launcher.submit(f"warm-up {i}", return_at_once, 3, i)
    for _ in range(4 * (os.cpu_count() or 1)):
        launcher.wait()
    costs = {"ray_start_to_first_trial": first, "ray_round_trip": round_trip(launcher)}
    launcher.close()  # and shuts the instance down
    costs["local_round_trip"] = round_trip(LocalLauncher())
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upper", type=int, default=12, help="every variant's upper bound (k = 3 .. upper)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per trial")
    parser.add_argument("--rounds", type=int, default=2, help="local/ray pairs, alternated")
    parser.add_argument("--tasks", type=int, default=200, help="trials timed for the launchers' round trip")
    args = parser.parse_args()
    variants = yaml.safe_load((ROOT / "configs" / "depth" / "search_all.yaml").read_text())["variants"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cut = tmp / "variants.yaml"
        cut.write_text(yaml.safe_dump({"variants": {str(ROOT / v): args.upper for v in variants}}))
        modes = {"local": None, "local-1-thread": 1, "ray": None}  # mode: torch threads of the process
        walls: dict[str, list[float]] = {mode: [] for mode in modes}
        tables, trials = {}, {}
        for r in range(args.rounds):
            for mode in list(modes)[r % 3 :] + list(modes)[: r % 3]:  # round-robin, each mode first in turn
                command = search_command(cut, args.steps, mode.split("-")[0])
                wall, tables[mode], trials[mode] = run_search(command, tmp / f"{mode}{r}", modes[mode])
                walls[mode].append(wall)
                print(f"round {r + 1}: {mode:14s} {wall:6.1f} s, {trials[mode]} trials", flush=True)
    costs = launcher_costs(args.tasks)
    local, ray_wall = statistics.median(walls["local"]), statistics.median(walls["ray"])
    print(f"\n{len(variants)} variants, k = 3..{args.upper}, {args.steps} steps per trial, {trials['local']} trials")
    print(f"local with 1 torch thread (as each Ray trial): median {statistics.median(walls['local-1-thread']):.1f} s")
    print(
        f"local: median {local:.1f} s; ray ({os.cpu_count()} workers): median {ray_wall:.1f} s; ratio {ray_wall / local:.2f}"
    )
    same = tables["local-1-thread"] == tables["ray"]
    print(f"same tables as local with 1 thread: {same}")
    changed = [line for line in tables["ray"].splitlines() if line not in tables["local"].splitlines()]
    print(
        f"rows of the {os.cpu_count()}-thread local table that differ (float rounding of other threads): {len(changed)}"
    )
    print("\n".join(changed))
    print(f"Ray start-up to a first trial: {costs['ray_start_to_first_trial']:.1f} s")
    print(
        f"round trip per trial: ray {1000 * costs['ray_round_trip']:.1f} ms, local {1000 * costs['local_round_trip']:.3f} ms"
    )
    if not same:
        raise SystemExit("the launchers' tables differ")


if __name__ == "__main__":
    main()
