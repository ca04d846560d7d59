"""Two gloo processes on CPU for the distributed tests; a hang becomes a failure, never a stuck run.

``Pool`` starts ``WORLD`` worker processes once (importing torch twice per test would dominate on
a small CI machine), each with a gloo process group whose collectives time out after
``PG_TIMEOUT_S``. ``Pool.run(fn, *args)`` runs ``fn(rank, world, *args)`` on every rank (``fn``
must be a module-level function) and returns the results in rank order. A job that raises, or
does not answer within ``JOB_TIMEOUT_S`` (a rank waiting on a collective its peer never issues),
fails the test and restarts the workers, so the next test starts from clean process groups.
"""
from __future__ import annotations

import datetime
import importlib
import os
import queue
import socket
import traceback

import torch.multiprocessing as mp

WORLD = 2
PG_TIMEOUT_S = 20
JOB_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    while True:
        job = jobs.get()
        if job is None:
            break
        module, name, args = job
        try:
            fn = getattr(importlib.import_module(module), name)
            results.put((rank, True, fn(rank, world, *args)))
        except BaseException:  # reported to the parent, which fails the test
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class Pool:
    def __init__(self, world: int = WORLD):
        self.world = world
        self.procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.jobs = [ctx.Queue() for _ in range(self.world)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, self.world, port, self.jobs[r], self.results), daemon=True)
                      for r in range(self.world)]
        for p in self.procs:
            p.start()

    def close(self, kill: bool = False) -> None:
        for p, q in zip(self.procs, getattr(self, "jobs", [])):
            if kill:
                p.kill()
            else:
                q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []

    def run(self, fn, *args, timeout: float = JOB_TIMEOUT_S) -> list:
        if not self.procs:
            self._start()
        for q in self.jobs:
            q.put((fn.__module__, fn.__name__, args))
        out: dict = {}
        try:
            while len(out) < self.world:
                rank, ok, value = self.results.get(timeout=timeout)
                out[rank] = (ok, value)
        except queue.Empty:
            self.close(kill=True)
            raise AssertionError(f"{fn.__name__}: ranks {sorted(set(range(self.world)) - set(out))} did not finish "
                                 f"within {timeout} s (a rank waits on a collective its peer never issued)") from None
        failed = {r: v for r, (ok, v) in out.items() if not ok}
        if failed:
            self.close(kill=True)
            raise AssertionError("\n".join(f"rank {r} raised:\n{v}" for r, v in sorted(failed.items())))
        return [out[r][1] for r in range(self.world)]
