"""How many threads a process gives DALI and torch: its share of the machine's cores.

A process that runs torch beside a DALI pipeline has two thread pools on the same cores: DALI's
workers (decode and augmentation, `num_threads`) and torch's intra-op threads (one per core by
default). Oversubscribed, they spin against each other: on a 2-core machine shared with one other
job, train.py at torch's default threads ran 4.5-10 s per step, with OMP_NUM_THREADS=1 0.2-0.6 s
(issue 20; bench/threads.py measures it). So each process takes its share of the cores (cores //
processes on this machine, LOCAL_WORLD_SIZE under torchrun), DALI takes its threads out of that
share, and torch gets what is left, at least one thread.

Overrides, strongest first: an explicit torch thread count (a command-line option), then
OMP_NUM_THREADS / MKL_NUM_THREADS in the environment (torch already read them at start-up; they
are left alone). Only command lines call `use_threads`: a library function never changes a
process-wide setting behind its caller's back.

Light on purpose (no torch at import): the CLIs import it before parsing their arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

# DALI threads per GPU beyond which more did not help (H200, 2026-11-30: 4 threads beat 16 for every
# graph; the GPU does the pixel work, the threads only feed it). bench/gpu.sh's sweep re-measures it.
GPU_THREADS = 4
# Environment variables that set torch's intra-op threads at start-up (OpenMP, then MKL).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def machine_cores() -> int:
    """Cores this process may run on (its CPU affinity: a Slurm or taskset allocation, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def processes_per_machine(environ: Mapping[str, str] | None = None) -> int:
    """Processes sharing this machine's cores: torchrun's LOCAL_WORLD_SIZE, else 1."""
    environ = os.environ if environ is None else environ
    try:
        return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def core_share(cores: int, processes: int) -> int:
    """One process' share of `cores` split between `processes`, at least 1."""
    return max(1, cores // max(1, processes))


def dali_threads(share: int, device: str = "cpu") -> int:
    """DALI's default threads out of a process' share: all of it for a CPU pipeline, at most
    GPU_THREADS for a GPU one."""
    return min(share, GPU_THREADS) if device == "gpu" else share


def env_threads(environ: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """(variable, value) of the first of THREAD_ENV set to a positive integer, else None."""
    environ = os.environ if environ is None else environ
    for name in THREAD_ENV:
        try:
            value = int(environ.get(name, "").strip())
        except ValueError:
            continue
        if value > 0:
            return name, value
    return None


@dataclass(frozen=True)
class ThreadPlan:
    cores: int          # cores this process may run on
    processes: int      # processes per machine sharing them
    dali: int           # DALI CPU threads (the loader's num_threads)
    torch: int          # torch intra-op threads
    torch_from: str     # why: "share", "option" or the environment variable that set it

    def describe(self) -> str:
        why = {"share": f"its share of {self.cores} cores for {self.processes} process(es) per machine, "
                        f"minus {self.dali} DALI thread(s)",
               "option": "set on the command line"}.get(self.torch_from, f"{self.torch_from} is set")
        return f"threads: DALI {self.dali}, torch {self.torch} ({why})"


def plan_threads(device: str = "cpu", dali: int = 0, torch_threads: int = 0, cores: int | None = None,
                 environ: Mapping[str, str] | None = None) -> ThreadPlan:
    """The DALI and torch thread counts of this process (pure: no setting is changed).

    device: where the DALI pipeline runs ("cpu" or "gpu"); dali / torch_threads: explicit counts
    (0: from the share). torch gets the share minus DALI's threads, at least 1, unless set
    explicitly or by the environment."""
    if dali < 0 or torch_threads < 0:
        raise ValueError(f"thread counts must be >= 0 (0: automatic), got DALI {dali}, torch {torch_threads}")
    cores = machine_cores() if cores is None else cores
    processes = processes_per_machine(environ)
    share = core_share(cores, processes)
    dali = dali or dali_threads(share, device)
    from_env = env_threads(environ)
    if torch_threads:
        torch_n, source = torch_threads, "option"
    elif from_env is not None:
        source, torch_n = from_env
    else:
        torch_n, source = max(1, share - dali), "share"
    return ThreadPlan(cores=cores, processes=processes, dali=dali, torch=torch_n, torch_from=source)


def use_threads(device: str = "cpu", dali: int = 0, torch_threads: int = 0) -> ThreadPlan:
    """Plan this process' threads and give torch its intra-op count; pass `plan.dali` to the loader.

    The one call every command line that runs torch beside DALI makes once, after parsing its
    arguments and before building its loader (eval, pseudolabel, bench; the trainer too)."""
    import torch

    plan = plan_threads(device, dali, torch_threads)
    if torch.get_num_threads() != plan.torch:
        torch.set_num_threads(plan.torch)
    return plan
