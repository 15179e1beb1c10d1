"""Where a study's independent trials run: here, one after another (`local`), or concurrently as Ray tasks (`ray`).

A launcher runs calls `fn(*args)` and hands back their outcomes as they finish. A call that raises, or
whose Ray worker dies, is run once more; if that fails too its outcome is a `Failed`, and the study
reports it in its table and goes on. The study decides what is independent; the launcher only runs it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning_modules.errors import ConfigError

LAUNCHERS = ("local", "ray")
RAY_HINT = "--launcher ray needs Ray: pip install -e '.[ray]' (or pip install 'ray[client]>=2.9')"
RAY_TOKEN_NOTE = "ray._private.authentication.authentication_token_setup"
# the driver's settings a Ray worker needs (W&B mode and key, verbosity); not WANDB_SERVICE, the address of
# this process's own W&B service, which W&B sets for its child processes and no remote worker could reach
FORWARDED_ENV = ("WANDB_", "NETLAB_")


@dataclass
class Failed:
    """The outcome of a call that failed twice: its last error, in a line."""

    error: str


class LocalLauncher:
    """Runs each call in this process when the study waits for it, in the order submitted (today's studies)."""

    slots = 1  # calls in flight at once: the study submits the next only when this one has finished

    def __init__(self):
        self._queue: dict[int, tuple[str, Callable, tuple]] = {}
        self._next = 0

    def submit(self, label: str, fn: Callable, *args) -> int:
        """Queue `fn(*args)`; `label` names it in messages. Returns its handle."""
        self._next += 1
        self._queue[self._next] = label, fn, args
        return self._next

    def wait(self) -> tuple[int, Any]:
        """Run the oldest submitted call (twice at most) and return (its handle, its outcome)."""
        handle = next(iter(self._queue))
        label, fn, args = self._queue.pop(handle)
        for attempt in (1, 2):
            try:
                return handle, fn(*args)
            except Exception as e:  # a trial's own crash; KeyboardInterrupt stops the study
                error = one_line(e)
                print(f"  {label} crashed (attempt {attempt} of 2): {error}", flush=True)
                if os.environ.get("NETLAB_VERBOSE", "") not in ("", "0"):
                    traceback.print_exc()
        return handle, Failed(error)

    def close(self) -> None:
        self._queue.clear()


class RayLauncher:
    """Runs every call as a Ray task with its own resources, on the cluster at `address` or on a Ray
    instance started here; each task is retried once by Ray when it raises or its worker dies."""

    slots = math.inf  # every ready call is submitted: Ray queues what the cluster cannot run yet

    def __init__(self, address: str | None = None, cpus_per_trial: float = 1, trials_per_gpu: int = 1):
        try:
            import ray
        except ImportError:
            raise ConfigError(RAY_HINT) from None
        if cpus_per_trial <= 0 or trials_per_gpu < 0:
            raise ConfigError(
                f"--cpus_per_trial must be > 0 and --trials_per_gpu >= 0, got {cpus_per_trial} and {trials_per_gpu}"
            )
        self.ray = ray
        self._pending: dict[Any, Any] = {}  # Ray ObjectRef -> (the handle given out, the call's label)
        self._shared: dict[int, Any] = {}  # id(fn) -> (fn, its ObjectRef): one upload per study function
        self._next = 0
        self.started_here = not ray.is_initialized()
        if self.started_here:
            env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV) and k != "WANDB_SERVICE"}
            verbose = os.environ.get("NETLAB_VERBOSE", "") not in ("", "0")
            if not verbose:  # Ray's note that its token authentication is on: nothing for the user to do
                logging.getLogger(RAY_TOKEN_NOTE).setLevel(logging.ERROR)
                warnings.filterwarnings("ignore", message="Ray Client connection timed out")  # said in our error
            try:
                ray.init(
                    address=address,
                    include_dashboard=False,
                    log_to_driver=verbose,  # each trial's outcome is printed here; the workers' own lines: --verbose
                    logging_level=logging.INFO if verbose else logging.WARNING,
                    runtime_env={"env_vars": env} if env else None,
                )
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ConfigError(f"Ray did not start{f' at --ray_address {address}' if address else ''}: {e}") from e
        resources = ray.cluster_resources()
        if cpus_per_trial > resources.get("CPU", 0):
            self.close()
            raise ConfigError(
                f"--cpus_per_trial {cpus_per_trial:g}: the Ray cluster has {resources.get('CPU', 0):g} CPUs"
            )
        gpus = resources.get("GPU", 0)
        self.gpu = gpus > 0 and trials_per_gpu > 0  # trials share the GPUs when the cluster has some
        self.options = {
            "num_cpus": cpus_per_trial,
            "num_gpus": 1 / trials_per_gpu if self.gpu else 0,
            "max_retries": 1,  # a worker that dies: once more
            "retry_exceptions": True,  # a trial that raises: once more
        }
        if address:
            where = f"the Ray cluster at {address}"
        else:
            where = "a local Ray instance" if self.started_here else "the Ray instance this process joined"
        per_trial = f"{cpus_per_trial:g} CPU" + (f" and 1/{trials_per_gpu} GPU" if self.gpu else "")
        at_once = resources.get("CPU", 0) / cpus_per_trial
        if self.gpu:
            at_once = min(at_once, gpus * trials_per_gpu)
        print(f"launcher: {where} ({resources.get('CPU', 0):g} CPUs, {gpus:g} GPUs): {per_trial} per trial, "
              f"{int(at_once)} trial(s) at once", flush=True)  # fmt: skip
        self._remote = ray.remote(_call_in_worker).options(**self.options)

    def submit(self, label: str, fn: Callable, *args) -> int:
        """Start `fn(*args)` as a Ray task; `label` names it in messages. Returns its handle."""
        if id(fn) not in self._shared:  # the function carries the data and the model: put in the object store once
            self._shared[id(fn)] = fn, self.ray.put(fn)
        ref = self._remote.remote(self._shared[id(fn)][1], self.options["num_cpus"], *args)
        self._next += 1
        self._pending[ref] = self._next, label
        return self._next

    def wait(self) -> tuple[int, Any]:
        """Block until one submitted call has finished; return (its handle, its outcome)."""
        (ref,), _ = self.ray.wait(list(self._pending), num_returns=1)
        handle, label = self._pending.pop(ref)
        try:
            return handle, self.ray.get(ref)
        except Exception as e:  # raised twice, or its worker died twice (Ray has retried once)
            error = one_line(getattr(e, "cause", None) or e)
            print(f"  {label} failed twice on Ray: {error}", flush=True)
            return handle, Failed(error)

    def close(self) -> None:
        for ref in self._pending:
            self.ray.cancel(ref, force=True)
        self._pending.clear()
        self._shared.clear()
        if self.started_here:
            self.ray.shutdown()


def _call_in_worker(fn: Callable, threads: float, *args):
    """A trial in a Ray worker, with as many torch threads as CPUs it asked for; it returns once the W&B runs it
    finished are on disk."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    try:
        return fn(*args)
    finally:
        written_out()


def written_out() -> None:
    """Wait until W&B has written every run this process finished. Its service writes a finished run's file (all of
    a small run's records) only when it closes the run, after `finish()` has returned; a Ray worker outlives its
    task, and is killed, not exited (no atexit), when Ray stops. `wandb.teardown`, run at a process's exit, waits."""
    if "wandb" not in sys.modules:  # the task logged nothing to W&B
        return
    import wandb

    try:
        wandb.teardown()  # the next trial in this worker starts a new service (half a second)
    except SystemExit:  # the service itself ended with an error: W&B never fails a trial
        pass


def make_launcher(
    launcher: str = "local", ray_address: str | None = None, cpus_per_trial: float = 1, trials_per_gpu: int = 1
) -> LocalLauncher | RayLauncher:
    """The launcher a study's `--launcher` names (Ray options are refused with the local launcher)."""
    if launcher == "local":
        if ray_address is not None:
            raise ConfigError("--ray_address needs --launcher ray")
        return LocalLauncher()
    if launcher == "ray":
        return RayLauncher(ray_address, cpus_per_trial, trials_per_gpu)
    raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")


def one_line(error: BaseException) -> str:
    """An error as `Type: first line of its message`."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
