"""Start a ``torch.distributed`` job on one machine, the way ``torchrun`` would.

:func:`launch` spawns ``nproc`` processes (``torch.multiprocessing``, spawn start
method), each with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``
set and a process group initialised (gloo on CPU by default), runs ``fn(rank, *args)``
in each, and returns the ranks' return values. The rendezvous store is served by the
parent on a port the OS picks, so concurrent jobs never race for a port. The job is
bounded: a rank that fails is reported with its traceback, the others get
``failure_grace_s`` to fail on their own (their collectives see the dead peer), and
anything still running at ``deadline_s`` is terminated, then killed. No process
outlives the call.

Under a real ``torchrun``, call :func:`init_from_env` instead.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["LaunchError", "RankOutcome", "init_from_env", "launch"]

_HOST = "127.0.0.1"


@dataclass(frozen=True)
class RankOutcome:
    """How one rank ended: ``exitcode`` (None: still running when killed), ``error``
    (the traceback it reported, or why it has none) and its return ``value``."""

    rank: int
    exitcode: int | None
    error: str | None = None
    value: Any = None


class LaunchError(RuntimeError):
    """At least one rank failed or the job ran past its deadline; ``outcomes`` has every
    rank's exit code and error."""

    def __init__(self, message: str, outcomes: list[RankOutcome]) -> None:
        super().__init__(message)
        self.outcomes = outcomes


def init_from_env(backend: str | None = None, timeout: timedelta = timedelta(seconds=60)) -> bool:
    """Initialise the default process group from ``torchrun``'s environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). Backend: NCCL when CUDA is
    available, else gloo. Returns False (and does nothing) outside a launched job."""
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if chosen == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(chosen, timeout=timeout)
    return True


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    threads: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=_HOST, MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(_HOST, port, world_size, is_master=False, timeout=timeout)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        value = fn(rank, *args)
    except BaseException as exc:  # reported to the parent, which raises LaunchError
        results.put((rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", None))
        results.close()
        results.join_thread()
        os._exit(1)  # skip a destroy_process_group that could wait for a dead peer
    else:
        # Plain pickle: tensors travel by value (torch's queue reductions would pass
        # shared-memory handles that die with this process).
        results.put((rank, None, pickle.dumps(value)))
        dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    nproc: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout_s: float = 30.0,
    deadline_s: float = 600.0,
    failure_grace_s: float | None = None,
    threads_per_rank: int | None = None,
    start_method: str = "spawn",
) -> list[Any]:
    """Run ``fn(rank, *args)`` in ``nproc`` processes with an initialised process group.

    ``fn`` and ``args`` must be picklable (a module-level function). ``timeout_s`` is the
    process-group timeout (a collective waiting longer for a peer fails); after a rank
    fails the others get ``failure_grace_s`` (default ``timeout_s + 5``) to finish or fail;
    ``deadline_s`` bounds the whole job. Returns the ranks' return values in rank order;
    raises :class:`LaunchError` naming each failed rank and its error otherwise.

    ``start_method="fork"`` starts ranks without re-importing torch (much faster where
    imports are slow, e.g. in tests); use it only on CPU, before any CUDA use, with one
    thread per rank (a forked OpenMP pool is not safe to use).
    """
    if nproc < 1:
        raise ValueError(f"nproc={nproc} must be >= 1")
    if start_method not in ("spawn", "fork", "forkserver"):
        raise ValueError(f"start_method={start_method!r}: use 'spawn', 'fork' or 'forkserver'")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: use 'gloo' or 'nccl'")
    grace = timeout_s + 5.0 if failure_grace_s is None else failure_grace_s
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // nproc)
    store = dist.TCPStore(_HOST, 0, nproc, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, nproc, store.port, backend, timeout_s, threads, fn, tuple(args), results),
            daemon=True,
        )
        for rank in range(nproc)
    ]
    reported: dict[int, tuple[str | None, Any]] = {}
    start = time.monotonic()
    first_failure: float | None = None
    try:
        for p in procs:
            p.start()
        while True:
            _drain(results, reported, block=0.05)
            now = time.monotonic()
            failed = any(err is not None for err, _ in reported.values()) or any(p.exitcode not in (None, 0) for p in procs)
            if failed and first_failure is None:
                first_failure = now
            if all(p.exitcode is not None for p in procs):
                break
            if now - start > deadline_s or (first_failure is not None and now - first_failure > grace):
                break
        _drain(results, reported, block=0.2)
    finally:
        _stop(procs)
        results.close()
        del store
    outcomes = [_outcome(rank, p, reported) for rank, p in enumerate(procs)]
    if all(o.exitcode == 0 and o.error is None for o in outcomes):
        return [o.value for o in outcomes]
    lines = [f"rank {o.rank}: {_summary(o)}" for o in outcomes]
    raise LaunchError(f"distributed job of {nproc} ranks failed:\n" + "\n".join(lines), outcomes)


def _drain(results: Any, reported: dict[int, tuple[str | None, Any]], block: float) -> None:
    try:
        rank, err, value = results.get(timeout=block)
        reported[rank] = (err, value)
        while True:
            rank, err, value = results.get_nowait()
            reported[rank] = (err, value)
    except queue_module.Empty:
        pass


def _stop(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _outcome(rank: int, proc: Any, reported: dict[int, tuple[str | None, Any]]) -> RankOutcome:
    err, payload = reported.get(rank, (None, None))
    value = pickle.loads(payload) if payload is not None else None
    code = proc.exitcode
    if err is None and code != 0:
        err = "killed at the job's deadline or grace period" if code in (-15, -9) else "exited without reporting"
    return RankOutcome(rank, code, err, value)


def _summary(o: RankOutcome) -> str:
    if o.exitcode == 0 and o.error is None:
        return "ok"
    first = (o.error or "").strip().splitlines()[0] if o.error else ""
    return f"exit code {o.exitcode}: {first}"
