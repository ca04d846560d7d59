"""End-to-end training steps: SGD, SAM (davda54 loop, eager, fused) and each SAM variant that exists.

Each method trains a freshly initialised copy of the same model on one fixed random batch; a
step's time is split into forward/backward and optimizer work with phase marks (CUDA events on
GPU, so the split adds no host sync), and the total is compared with SGD's.

Protocols: ``sgd`` (zero_grad, forward/backward, step), ``sam`` (first_step / second_step around
two forward/backward passes: the documented API, same for davda54 and sam_kernels.SAM),
``closure`` (first forward/backward, then ``opt.step(closure)``, which decides whether to run the
closure as the second pass: SS-SAM, AE-SAM, AE-LookSAM, LookSAM, Sparse SAM, Stable SAM) and
``esam`` (ESAM's step runs both passes; the closure returns per-sample losses and the optimizer
runs the backward passes itself, so for ESAM the backward is counted in the optimizer phase).
On GPU a last row per model, protocol ``graph``, replays the fused SAM step captured in one CUDA
graph (it can beat an eager SGD step where kernel launches dominate).
Variants vary their cost from step to step, so the step time is a mean over the repeats (p20/p80
show the spread).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import sam_kernels
from .. import ops
from .baselines import Davda54SAM
from .models import Workload
from .noise import CpuMonitor
from .timing import PhaseClock, quantile

SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
RHO = 0.05


@dataclass
class Method:
    key: str  # command-line name (--methods)
    name: str
    build: Callable[[list], torch.optim.Optimizer]
    protocol: str
    needs: Optional[str] = None  # sam_kernels attribute that must exist
    note: str = ""
    kwargs: dict = field(default_factory=dict)
    varies: bool = False  # step cost varies by design (SAM on some steps only): its spread is not noise


def _sk(name: str):
    return getattr(sam_kernels, name)


def _variant(cls: str, protocol: str, note: str, varies: bool = False, **kw) -> Method:
    def build(ps):
        return _sk(cls)(ps, torch.optim.SGD, rho=RHO, finite_check=False, **kw, **SGD_KW)
    return Method(cls.lower(), cls, build, protocol, needs=cls, note=note, kwargs=kw, varies=varies)


def methods() -> list[Method]:
    """Every method to time, in table order. Variant options are the papers' usual settings.

    sam_kernels optimizers run with finite_check=False (like davda54, no host sync) except in
    the row that shows what the default checks cost.
    """
    def sam(backend: str, **kw):
        return lambda ps: _sk("SAM")(ps, torch.optim.SGD, rho=RHO, backend=backend, **kw, **SGD_KW)

    return [
        Method("sgd", "SGD", lambda ps: torch.optim.SGD(ps, **SGD_KW), "sgd"),
        Method("sam-loop", "SAM (davda54 loop)", lambda ps: Davda54SAM(ps, torch.optim.SGD, rho=RHO, **SGD_KW), "sam"),
        Method("sam-eager", "SAM eager", sam("eager", finite_check=False), "sam", needs="SAM"),
        Method("sam-fused", "SAM fused (auto)", sam("auto", finite_check=False), "sam", needs="SAM"),
        Method("sam-fused-checked", "SAM fused (auto), finite checks", sam("auto"), "sam", needs="SAM",
               note="finite_check=True (default): 2 host syncs"),
        _variant("SSSAM", "closure", "constant p = 0.6", varies=True, schedule="constant", p=0.6, seed=0),
        _variant("AESAM", "closure", "defaults (decay 0.9, l1 -1, l2 1)", varies=True, total_steps=1000),
        _variant("AELookSAM", "closure", "alpha 0.7", varies=True, total_steps=1000, alpha=0.7),
        _variant("ESAM", "esam", "beta 0.6 per tensor, gamma 0.5", beta=0.6, gamma=0.5, seed=0),
        _variant("SparseSAM", "closure", "dynamic mask, 50 % sparse, refreshed every 100 steps (not timed)",
                 sparsity=0.5, mask="dynamic", update_unit="step", update_freq=100, horizon=1000, seed=0),
        _variant("LookSAM", "closure", "k 5, alpha 0.7", varies=True, k=5, alpha=0.7),
        _variant("StableSAM", "closure", "renormalized SAM"),
    ]


def _step_fn(method: Method, opt, model, wl: Workload, clock: PhaseClock) -> Callable[[], None]:
    x, y = wl.inputs, wl.targets

    def fwd_bwd():
        clock.mark("optimizer")  # whatever ran since the last mark was optimizer work
        loss = wl.loss(model(x), y)
        loss.backward()
        clock.mark("fwd_bwd")
        return loss

    if method.protocol == "sgd":
        def step():
            opt.zero_grad(set_to_none=True)
            fwd_bwd()
            opt.step()
    elif method.protocol == "sam":
        def step():
            opt.zero_grad(set_to_none=True)
            fwd_bwd()
            opt.first_step(zero_grad=True)
            fwd_bwd()
            opt.second_step(zero_grad=True)
    elif method.protocol == "closure":  # step() follows the first backward; the closure is the second pass
        def step():
            opt.zero_grad(set_to_none=True)
            fwd_bwd()
            opt.step(fwd_bwd)
    else:  # esam
        def closure(indices: Optional[torch.Tensor] = None):
            clock.mark("optimizer")
            xs, ys = (x, y) if indices is None else (x[indices], y[indices])
            losses = wl.per_sample_loss(model(xs), ys)
            clock.mark("fwd_bwd")
            return losses

        def step():
            opt.zero_grad(set_to_none=True)
            opt.step(closure)
    return step


def _summary(samples: list[float]) -> dict:
    return {"mean_ms": statistics.fmean(samples), "median_ms": statistics.median(samples),
            "p20_ms": quantile(samples, 0.2), "p80_ms": quantile(samples, 0.8)}


def time_method(method: Method, wl: Workload, device: torch.device, warmup: int, repeats: int,
                cpu: CpuMonitor) -> dict:
    start = cpu.snap()
    r = _time_method(method, wl, device, warmup, repeats)
    return {**r, "cpu": cpu.others(start)}


def _time_method(method: Method, wl: Workload, device: torch.device, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = wl.make_model()
    opt = method.build(list(model.parameters()))
    clock = PhaseClock(device)
    step = _step_fn(method, opt, model, wl, clock)
    for _ in range(warmup):
        clock.start()
        step()
        clock.mark("optimizer")
    ops.last_used.clear()
    totals, fb, op = [], [], []
    for _ in range(repeats):
        clock.start()
        step()
        clock.mark("optimizer")
        phases = clock.read()  # syncs, after the step
        fb.append(phases.get("fwd_bwd", 0.0))
        op.append(phases.get("optimizer", 0.0))
        totals.append(fb[-1] + op[-1])
    return {"step": _summary(totals), "fwd_bwd_mean_ms": statistics.fmean(fb),
            "optimizer_mean_ms": statistics.fmean(op), "backends_ran": sorted(set(ops.last_used.values()))}


def cuda_graph_step(wl: Workload, device: torch.device, warmup: int, repeats: int) -> dict:
    """The fused SAM step (both passes) captured as one CUDA graph, replayed; raises if it cannot be captured."""
    torch.manual_seed(0)
    model = wl.make_model()
    opt = sam_kernels.SAM(list(model.parameters()), torch.optim.SGD, rho=RHO, backend="auto", finite_check=False,
                          **SGD_KW)
    x, y = wl.inputs, wl.targets

    def step():  # grads zeroed in place: set_to_none would change the addresses the graph reads
        opt.zero_grad(set_to_none=False)
        wl.loss(model(x), y).backward()
        opt.first_step(zero_grad=False)
        opt.zero_grad(set_to_none=False)
        wl.loss(model(x), y).backward()
        opt.second_step(zero_grad=False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (lazy state, cuBLAS workspaces) off the capture stream
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(warmup):
        graph.replay()
    events = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return {"step": _summary([s.elapsed_time(e) for s, e in events])}


def run_train(device: torch.device, wls: list[Workload], todo: list[Method], warmup: int, repeats: int, log,
              progress, cpu: CpuMonitor) -> dict:
    rows, skips = [], []
    for wl in wls:
        sgd_ms = None
        for m in todo:
            progress.set_postfix_str(f"{wl.name} {m.name}")
            if m.needs and not hasattr(sam_kernels, m.needs):
                skips.append({"model": wl.name, "method": m.name,
                              "reason": f"sam_kernels.{m.needs} does not exist yet"})
                progress.update(1)
                continue
            try:
                r = time_method(m, wl, device, warmup, repeats, cpu)
            except Exception as exc:  # e.g. a variant whose options changed: report, go on
                reason = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                skips.append({"model": wl.name, "method": m.name, "reason": reason})
                log(f"!! train step {wl.name} / {m.name}: {reason}")
                progress.update(1)
                continue
            if m.name == "SGD":
                sgd_ms = r["step"]["mean_ms"]
            rows.append({"model": wl.name, "method": m.name, "protocol": m.protocol, "note": m.note,
                         "options": m.kwargs, "varies": m.varies, **r,
                         "ratio_to_sgd": r["step"]["mean_ms"] / sgd_ms if sgd_ms else None})
            progress.update(1)
        if device.type == "cuda" and any(m.key == "sam-fused" for m in todo):
            progress.set_postfix_str(f"{wl.name} CUDA graph")
            name = "SAM fused (auto), CUDA graph"
            if not hasattr(sam_kernels, "SAM"):
                skips.append({"model": wl.name, "method": name, "reason": "sam_kernels.SAM does not exist yet"})
            else:
                try:
                    start = cpu.snap()
                    r = {**cuda_graph_step(wl, device, warmup, repeats), "cpu": cpu.others(start)}
                except Exception as exc:
                    skips.append({"model": wl.name, "method": name,
                                  "reason": f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"})
                else:
                    rows.append({"model": wl.name, "method": name, "protocol": "graph", "note": "one graph replay",
                                 "options": {}, **r, "fwd_bwd_mean_ms": None, "optimizer_mean_ms": None,
                                 "backends_ran": [],
                                 "ratio_to_sgd": r["step"]["mean_ms"] / sgd_ms if sgd_ms else None})
            progress.update(1)
    return {"rows": rows, "skips": skips}


def train_task_count(device: torch.device, n_workloads: int, todo: list[Method]) -> int:
    graph = device.type == "cuda" and any(m.key == "sam-fused" for m in todo)
    return n_workloads * (len(todo) + graph)
