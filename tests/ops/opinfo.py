"""The op tests' tables (after PyTorch's ``op_db``): backend rows, and per op its sample inputs and check.

A backend row (:class:`Backend`) says how to call an op (``call(op, args, kwargs)``: the public op
of ``sam_kernels.ops`` with the arguments of a sample), on which device its samples live and why it
is skipped here; a new backend (a CUDA emulator registering ``torch.ops.sam_kernels_emu.<op>``,
say) is one more row. A :class:`Sample` builds fresh inputs for one call of one op and says how the
results compare with the eager reference: bitwise, or within the dtype's tolerance (times
``tol_scale``). :func:`check_against_eager` runs a sample on a backend and on ``eager`` and
compares the result and every argument the op writes (from the op table), and checks that no
argument it only reads changed (bitwise).

Inputs: odd sizes (1, 7, 127, 278,011, 13x17), zero-size tensors, hundreds of small tensors (so
launches split), conv-like shapes, dense non-contiguous layouts (channels_last, permuted) shared by
all lists, misaligned views (storage offset 1), a gradient in another layout than its parameter
(that entry runs eagerly), every flag of each op, and non-finite inputs (NaN/Inf grads, NaN
norms, NaN/Inf scores, -0.0 weights). Under the Triton interpreter (slow) the shapes are scaled
down: large dims /100, fewer small tensors.
"""
from __future__ import annotations

import inspect
import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
import torch

import sam_kernels
import sam_kernels.ops as ops
from sam_kernels.ops import contract
from tests.utils import DTYPES, assert_close, assert_lists_equal, backend_available

TOL = {dtype: (atol, rtol) for dtype, atol, rtol in DTYPES}
FLOAT_DTYPES = [d for d, _, _ in DTYPES]
REDUCTION_RTOL = {torch.float64: 1e-10}  # else 2e-5: fp32 accumulation in another order


# --------------------------------------------------------------------------- backends

@dataclass(frozen=True)
class Backend:
    """One backend row: ``call(op, args, kwargs)`` runs op ``op`` of the table; ``device`` holds the
    samples' tensors; ``skip()`` is why it cannot run here (None: it can); ``interpreted``: slow,
    samples scaled down; ``name``: the dispatch backend (``backend=`` of the public ops and the
    optimizers) for the tests that go through those, "" for a row that is not one."""
    id: str
    device: str
    call: Callable[[str, tuple, dict], Any]
    skip: Callable[[], Optional[str]]
    interpreted: bool = False
    name: str = ""


def public_op(backend: str) -> Callable[[str, tuple, dict], Any]:
    """Calls ``sam_kernels.ops.<op>(*args, backend=backend, **kwargs)``."""
    return lambda op, args, kwargs: getattr(ops, op)(*args, backend=backend, **kwargs)


def _unavailable(backend: str, device: str) -> Callable[[], Optional[str]]:
    def skip() -> Optional[str]:
        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        if not backend_available(backend, device):
            return f"backend {backend} unavailable on {device}: {sam_kernels.backends()[backend]['reason']}"
        return None
    return skip


def small_cuda_tables(call: Callable[[str, tuple, dict], Any]) -> Callable[[str, tuple, dict], Any]:
    """``call`` with the CUDA kernels' 4 KB argument tables forced (read by the extension at every call)."""
    def run(op, args, kwargs):
        before = os.environ.get("SAM_KERNELS_CUDA_TABLES")
        os.environ["SAM_KERNELS_CUDA_TABLES"] = "small"
        try:
            return call(op, args, kwargs)
        finally:
            if before is None:
                del os.environ["SAM_KERNELS_CUDA_TABLES"]
            else:
                os.environ["SAM_KERNELS_CUDA_TABLES"] = before
    return run


EAGER = Backend("eager-cpu", "cpu", public_op("eager"), lambda: None, name="eager")
COMPILED = [
    Backend("cpp-cpu", "cpu", public_op("cpp"), _unavailable("cpp", "cpu"), name="cpp"),
    Backend("cuda-cuda", "cuda", public_op("cuda"), _unavailable("cuda", "cuda"), name="cuda"),
    Backend("cuda-small-tables", "cuda", small_cuda_tables(public_op("cuda")), _unavailable("cuda", "cuda")),
    Backend("triton-cpu", "cpu", public_op("triton"), _unavailable("triton", "cpu"), interpreted=True,
            name="triton"),
    Backend("triton-cuda", "cuda", public_op("triton"), _unavailable("triton", "cuda"), name="triton"),
]
"""The rows compared with the eager reference."""
ALL = [EAGER, *COMPILED]
"""The rows of the tests that check an op's properties by hand (the reference included)."""


def backend_param(rows: list[Backend]):
    """``pytest.mark.parametrize("backend", rows)`` with the rows' ids."""
    return pytest.mark.parametrize("backend", rows, ids=[b.id for b in rows])


def dispatch_rows(rows: list[Backend]) -> list[Backend]:
    """The rows that are dispatch backends (for tests through ``backend=``)."""
    return [b for b in rows if b.name]


def require(backend: Backend) -> Backend:
    reason = backend.skip()
    if reason is not None:
        pytest.skip(reason)
    return backend


# --------------------------------------------------------------------------- inputs

SHAPES = {
    "odd": [(1,), (7,), (127,), (278011,), (0,), (13, 17)],
    "many_small": [(3,)] * 200 + [(2, 5)] * 100,
    "conv": [(16, 8, 3, 3), (16,), (10, 144)],
    "empty": [(0,), (0, 3)],
    "rows": [(1, 5), (3, 0), (0, 4), (5,), (), (4, 70001), (2, 3, 5), (6, 1), (7, 13)],
}
LAYOUTS = ("contiguous", "dense", "misaligned", "mixed")
"""How every list of a sample is laid out: contiguous; ``dense``: channels_last 4-d, permuted 2-d
(the same in every list); ``misaligned``: views at storage offset 1; ``mixed``: contiguous but
the first list's last 2-d entry transposed (its layout differs from the other lists': eager for it)."""


def shapes_for(name: str, backend: Backend) -> list[tuple]:
    shapes = SHAPES[name]
    if not backend.interpreted:
        return shapes
    if name == "many_small":
        return [(3,)] * 40 + [(2, 5)] * 20
    return [tuple(d // 100 | 1 if d > 1000 else d for d in s) for s in shapes]


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in ``layout`` (see :data:`LAYOUTS`; "mixed" is applied by :class:`Inputs`)."""
    if layout == "dense" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout in ("dense", "transposed") and t.dim() == 2:
        return t.t().contiguous().t()
    if layout == "misaligned":
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        return flat[1:].view(t.shape).copy_(t)
    return t


class Inputs:
    """Makes a sample's tensor lists: same shapes, dtype, device and layout in every list.
    ``special(ts)`` edits a list's contiguous tensors (planted values) before they are laid out."""

    def __init__(self, shapes: list[tuple], dtype: torch.dtype, device: str, layout: str = "contiguous"):
        self.shapes, self.dtype, self.device, self.layout = shapes, dtype, device, layout
        self.lists = 0

    def _place(self, ts: list[torch.Tensor], special: Optional[Callable] = None) -> list[torch.Tensor]:
        if special is not None:
            special(ts)
        first = self.lists == 0
        self.lists += 1
        if self.layout != "mixed":
            return [laid_out(t, self.layout) for t in ts]
        last_2d = max((i for i, t in enumerate(ts) if t.dim() == 2), default=None) if first else None
        return [laid_out(t, "transposed") if i == last_2d else t for i, t in enumerate(ts)]

    def randn(self, positive: bool = False, special: Optional[Callable] = None) -> list[torch.Tensor]:
        ts = [torch.randn(s, device=self.device).to(self.dtype) for s in self.shapes]
        return self._place([t.abs() + 0.1 for t in ts] if positive else ts, special)

    def full(self, value: float) -> list[torch.Tensor]:
        return self._place([torch.full(s, value, device=self.device).to(self.dtype) for s in self.shapes])

    def masks(self) -> list[torch.Tensor]:
        return self._place([torch.rand(s, device=self.device) < 0.5 for s in self.shapes])

    def scalar(self, value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(value, dtype=dtype, device=self.device)


def planting(values: list[float], at: int = -1) -> Callable[[list[torch.Tensor]], None]:
    """A ``special`` that writes ``values`` at the start of entry ``at`` (contiguous, long enough)."""
    def plant(ts: list[torch.Tensor]) -> None:
        t = ts[at]
        t.view(-1)[:len(values)] = torch.tensor(values, device=t.device).to(t.dtype)
    return plant


# --------------------------------------------------------------------------- samples

@dataclass
class Sample:
    """One call of ``op``: ``make(backend)`` returns fresh (args, kwargs) for the public op on the
    backend's device. ``bitwise``: names of the outputs (written arguments, or "result") that must
    equal the reference bitwise; the others compare within the dtype's tolerance x ``tol_scale``."""
    op: str
    id: str
    dtype: torch.dtype
    make: Callable[[Backend], tuple[tuple, dict]]
    bitwise: tuple[str, ...] = ()
    tol_scale: float = 1.0
    same_changes: tuple[str, ...] = ()
    """Outputs whose bitwise-unchanged entries must be the reference's (which weights a perturbation moved)."""
    meta: dict = field(default_factory=dict)
    """The sample's settings (variant, condition, telemetry...), for the tests that check it by hand."""
    extended: bool = False
    """Part of a full product of flags: run against eager on the rows that are not interpreted."""

    def param(self):
        return pytest.param(self, id=f"{self.op}-{self.id}")


def _clone_call(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A deep copy of a call's tensors that keeps aliasing between arguments (same tensor -> same clone)
    and each tensor's strides (clone preserves a dense layout; a misaligned view is rebuilt)."""
    memo: dict[int, torch.Tensor] = {}

    def one(t):
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) not in memo:
            if t.storage_offset() != 0:  # a misaligned view: the same offset in a storage of its own
                flat = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype, device=t.device)
                memo[id(t)] = flat.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(t)
            else:
                memo[id(t)] = t.clone(memory_format=torch.preserve_format)
        return memo[id(t)]

    def walk(x):
        if isinstance(x, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in x):
            return [one(t) for t in x]
        return one(x)

    return tuple(walk(a) for a in args), {k: walk(v) for k, v in kwargs.items()}


INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
          torch.bfloat16: torch.int16}
"""The integer type of each float type's width (its storage bits)."""


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element: are a and b bitwise equal (so -0.0 != 0.0 and NaN payloads count)?"""
    return a.view(INT_OF[a.dtype]) == b.view(INT_OF[b.dtype])


def _tensors(x) -> Optional[list[torch.Tensor]]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return list(x)
    return None


def _bound(op: str, args: tuple, kwargs: dict) -> dict:
    return inspect.signature(getattr(ops.api, op)).bind(*args, **kwargs).arguments


def run(backend: Backend, sample: Sample) -> tuple[Any, dict, dict]:
    """(result, the call's arguments after it, the arguments before it) of ``sample`` on ``backend``."""
    args, kwargs = sample.make(backend)
    before = _bound(sample.op, *_clone_call(args, kwargs))
    result = backend.call(sample.op, args, kwargs)
    return result, _bound(sample.op, args, kwargs), before


def check_against_eager(backend: Backend, sample: Sample) -> None:
    """``sample`` on ``backend`` and on eager from the same inputs: the result and every written
    argument as the sample says (bitwise or within tolerance); every argument the op only reads
    bitwise unchanged."""
    if sample.extended and backend.interpreted:
        pytest.skip("the full product of flags runs on the compiled rows (the interpreter is slow)")
    torch.manual_seed(0)
    args, kwargs = sample.make(backend)
    mine_args, mine_kwargs = _clone_call(args, kwargs)
    ref_args, ref_kwargs = _clone_call(args, kwargs)
    before = _bound(sample.op, args, kwargs)
    got = backend.call(sample.op, mine_args, mine_kwargs)
    want = EAGER.call(sample.op, ref_args, ref_kwargs)
    mine, ref = _bound(sample.op, mine_args, mine_kwargs), _bound(sample.op, ref_args, ref_kwargs)
    atol, rtol = TOL[sample.dtype]
    atol, rtol = atol * sample.tol_scale, rtol * sample.tol_scale
    writes = contract.OPS[sample.op].writes
    outputs = [("result", _tensors(got), _tensors(want))]
    outputs += [(name, _tensors(mine[name]), _tensors(ref[name])) for name in writes if _tensors(mine.get(name))]
    for name, a, b in outputs:
        if a is None and b is None:
            continue
        assert a is not None and b is not None, f"{sample.op}: {name} is missing on one side"
        if name in sample.bitwise:
            assert_lists_equal(a, b, f"{sample.op} {name}")
            continue
        for i, (x, y) in enumerate(zip(a, b)):
            assert x.dtype == y.dtype and x.device == y.device, f"{sample.op} {name}[{i}]"
            if x.dtype == torch.bool:
                assert torch.equal(x, y), f"{sample.op} {name}[{i}]"
            elif x.dim() == 0 and name == "result":  # a reduction
                assert_close(x, y, 1e-30, REDUCTION_RTOL.get(sample.dtype, 2e-5), f"{sample.op} result")
            else:
                assert_close(x, y, atol, rtol, f"{sample.op} {name}[{i}]")
    for name in sample.same_changes:
        for i, (x, y, w) in enumerate(zip(_tensors(mine[name]), _tensors(ref[name]), _tensors(before[name]))):
            assert torch.equal(same_bits(x, w), same_bits(y, w)), f"{sample.op}: unchanged entries of {name}[{i}] differ"
    written = {id(t) for name in writes for t in (_tensors(before.get(name)) or [])}
    for name, value in before.items():
        if name in writes or _tensors(value) is None or any(id(t) in written for t in _tensors(value)):
            continue
        assert_lists_equal(_tensors(mine[name]), _tensors(value), f"{sample.op}: read-only {name} was written")


# --------------------------------------------------------------------------- per-op sample generators

def _cases(**axes):
    """The product of the named axes, as dicts."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def grad_sq_norm_samples() -> list[Sample]:
    out = []
    for c in _cases(dtype=FLOAT_DTYPES, shapes=["odd", "many_small", "conv"], variant=["plain", "adaptive", "masked",
                                                                                      "adaptive-masked"]):
        def make(b, c=c):
            x = Inputs(shapes_for(c["shapes"], b), c["dtype"], b.device)
            grads = x.randn()
            params = x.randn() if "adaptive" in c["variant"] else None
            masks = x.masks() if "masked" in c["variant"] else None
            for g, m in zip(grads, masks or []):
                g[~m] = float("nan")  # masked-out entries are selected away, not multiplied by 0
            return (grads,), dict(params=params, masks=masks, eta=0.02)
        out.append(Sample("grad_sq_norm", f"{_dtype_id(c['dtype'])}-{c['shapes']}-{c['variant']}", c["dtype"], make))
    for layout in LAYOUTS[1:]:
        def make(b, layout=layout):
            x = Inputs(shapes_for("conv", b) + [(5, 7)], torch.float32, b.device, layout)
            return (x.randn(),), dict(params=x.randn())
        out.append(Sample("grad_sq_norm", f"float32-{layout}", torch.float32, make))
    out.append(Sample("grad_sq_norm", "float32-empty", torch.float32,
                      lambda b: ((Inputs(SHAPES["empty"], torch.float32, b.device).randn(),), {})))
    out.append(Sample("grad_sq_norm", "mixed-dtypes", torch.float32, lambda b: (
        (Inputs([(7,), (3, 5)], torch.float32, b.device).randn() + Inputs([(9,)], torch.float64, b.device).randn(),),
        {})))
    out.append(Sample("grad_sq_norm", "complex64", torch.float32, lambda b: (
        ([torch.randn(5, 3, dtype=torch.complex64, device=b.device), torch.randn(4, device=b.device)],), {})))
    return out


def dot_samples() -> list[Sample]:
    out = []
    for c in _cases(dtype=FLOAT_DTYPES, shapes=["odd", "many_small", "empty"], layout=["contiguous", "misaligned"]):
        def make(b, c=c):
            x = Inputs(shapes_for(c["shapes"], b), c["dtype"], b.device, c["layout"])
            return (x.randn(), x.randn()), {}
        out.append(Sample("dot", f"{_dtype_id(c['dtype'])}-{c['shapes']}-{c['layout']}", c["dtype"], make))
    return out


PERTURB_VARIANTS = {
    "plain": dict(),
    "masked": dict(masked=True),
    "adaptive": dict(adaptive=True),
    "keep": dict(keep_prob=0.6),
    "all": dict(masked=True, adaptive=True, keep_prob=0.7),
}
PERTURB_CONDITIONS = ("finite", "nan-norm", "inf-norm", "inf-grad", "amp-step", "amp-skip")
PERTURB_TELEMETRY = ("none", "sq32", "sq64", "copies", "sq32+copies", "sq64+copies")


def perturb_samples() -> list[Sample]:
    """Every dtype x variant x condition with both telemetry outputs (a float32 0-dim one starting at
    0.5 with grad_copies, a float64 (1,) one starting at -0.0); the other telemetry settings extended."""
    out = []
    shape_cycle = itertools.cycle(["odd", "conv", "many_small"])
    for c in _cases(dtype=FLOAT_DTYPES, variant=list(PERTURB_VARIANTS), condition=PERTURB_CONDITIONS,
                    telemetry=["sq32+copies", "sq64"]):
        out.append(_perturb_sample(dict(c, shapes=next(shape_cycle))))
    for layout in LAYOUTS[1:]:
        out.append(_perturb_sample(dict(dtype=torch.float32, variant="all", condition="finite",
                                        telemetry="sq32+copies", shapes="conv", layout=layout)))
    taken = {(s.meta["dtype"], s.meta["variant"], s.meta["condition"], s.meta["telemetry"]) for s in out}
    for c in _cases(dtype=FLOAT_DTYPES, variant=list(PERTURB_VARIANTS), condition=PERTURB_CONDITIONS,
                    telemetry=PERTURB_TELEMETRY):
        if tuple(c.values()) not in taken:
            small = c["dtype"] == torch.float32 and c["variant"] == "all"  # lists longer than a 4 KB table
            out.append(_perturb_sample(dict(c, shapes="many_small" if small else "odd"), extended=True))
    return out


def _perturb_sample(c: dict, extended: bool = False) -> Sample:
    v = PERTURB_VARIANTS[c["variant"]]

    def make(b):
        x = Inputs(shapes_for(c["shapes"], b) + [(4, 6)], c["dtype"], b.device, c.get("layout", "contiguous"))
        tele = c["telemetry"]
        specials = [float("nan"), -0.0, float("-inf")] if "copies" in tele else []
        if c["condition"] == "inf-grad":
            specials += [1.0, float("inf")]
        params = x.randn(special=planting([-0.0], at=0))  # must survive bitwise where unselected
        grads = x.randn(special=planting(specials) if specials else None)
        backups = x.full(float("nan"))
        kw = dict(masks=x.masks() if v.get("masked") else None, adaptive=v.get("adaptive", False),
                  keep_prob=v.get("keep_prob"), seed=11, eta=0.02)
        if c["condition"] == "nan-norm":
            kw["sq_norm"] = x.scalar(float("nan"))
        elif c["condition"] == "inf-norm":
            kw["sq_norm"] = x.scalar(float("inf"))
        elif c["condition"].startswith("amp"):
            for g in grads:
                g.mul_(1024.0)
            kw["grad_scale"] = x.scalar(1024.0)
            kw["found_inf"] = x.scalar(float(c["condition"] == "amp-skip"))
        if "sq32" in tele:
            kw["perturbation_sq"] = x.scalar(0.5)
        if "sq64" in tele:
            kw["perturbation_sq"] = torch.full((1,), -0.0, dtype=torch.float64, device=b.device)
        if "copies" in tele:
            kw["grad_copies"] = x.full(3.0)
        return (params, grads, backups, 0.05), kw

    return Sample("perturb_", "-".join([_dtype_id(c["dtype"]), c["variant"], c["condition"], c["telemetry"],
                                        c["shapes"], c.get("layout", "contiguous")]),
                  c["dtype"], make, bitwise=("backups", "grad_copies"), same_changes=("params",), meta=c,
                  extended=extended)


def restore_samples() -> list[Sample]:
    out = []
    for c in _cases(dtype=FLOAT_DTYPES, shapes=["odd", "many_small"], layout=LAYOUTS):
        def make(b, c=c):
            x = Inputs(shapes_for(c["shapes"], b) + [(4, 6)], c["dtype"], b.device, c["layout"])
            params, backups = x.randn(), x.randn(special=planting([float("nan"), -0.0, float("-inf")]))
            return (params, backups), {}
        out.append(Sample("restore_", f"{_dtype_id(c['dtype'])}-{c['shapes']}-{c['layout']}", c["dtype"], make,
                          bitwise=("params",)))
    return out


SGD_CONFIGS = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9, weight_decay=5e-4),
    "nesterov": dict(momentum=0.9, weight_decay=1e-2, nesterov=True),
    "dampening-maximize": dict(momentum=0.8, dampening=0.1, weight_decay=1e-2, maximize=True),
}
DESCENT_AMP = ("off", "step", "skip")
DESCENT_TELEMETRY = ("none", "sums32", "sums32+ascent", "sums64", "sums64+ascent")


def _descent_inputs(c: dict, b: Backend):
    x = Inputs(shapes_for(c["shapes"], b) + [(4, 6)], c["dtype"], b.device, c.get("layout", "contiguous"))
    params, backups, grads = x.randn(), x.randn(), x.randn()
    kw = {}
    if c["amp"] != "off":
        for g in grads:
            g.mul_(1024.0)
        kw = dict(grad_scale=x.scalar(1024.0), found_inf=x.scalar(float(c["amp"] == "skip")))
    tele = c["telemetry"]
    if tele != "none":
        kw["sums"] = torch.tensor([0.5, -0.0], dtype=torch.float64 if "64" in tele else torch.float32,
                                  device=b.device)
        if "ascent" in tele:
            kw["ascent_grads"] = [a.mul_(0.1).add_(g, alpha=0.9) for a, g in zip(x.randn(), grads)]  # dot far from 0
    return x, params, backups, grads, kw


def sgd_samples() -> list[Sample]:
    out = []
    tele_cycle, amp_cycle = itertools.cycle(DESCENT_TELEMETRY), itertools.cycle(DESCENT_AMP)
    for c in _cases(dtype=FLOAT_DTYPES, config=list(SGD_CONFIGS), buffers=["fresh", "kept"]):
        c = dict(c, telemetry=next(tele_cycle), amp=next(amp_cycle), shapes="odd")
        out.append(_sgd_sample(c))
    for layout in LAYOUTS[1:]:
        out.append(_sgd_sample(dict(dtype=torch.float32, config="nesterov", buffers="kept", telemetry="sums32+ascent",
                                    amp="step", shapes="conv", layout=layout)))
    out.append(_sgd_sample(dict(dtype=torch.float32, config="momentum", buffers="some", telemetry="sums32+ascent",
                                amp="off", shapes="many_small")))
    for c in _cases(dtype=FLOAT_DTYPES, amp=DESCENT_AMP, telemetry=DESCENT_TELEMETRY):
        shapes = "many_small" if c["dtype"] == torch.float32 else "odd"  # lists longer than a 4 KB table
        out.append(_sgd_sample(dict(c, config="momentum", buffers="kept", shapes=shapes, layout="contiguous")))
    out += _sgd_check_samples()
    return _unique(out)


SGD_FAULTS = {
    "finite": None,
    "nan-last": (-1, 5, float("nan")),  # earlier tensors are written when it is seen
    "inf-first": (0, 0, float("inf")),
    "neginf-large": (3, 200_000, float("-inf")),  # inside the 278,011-element tensor, past its first chunks
}
"""The finite-check samples' planted gradient (entry, flat index, value) in the "odd" shapes + (4, 6); the
index wraps around in the interpreter's scaled-down shapes."""


def _sgd_check_samples() -> list[Sample]:
    out = []
    for c in _cases(dtype=FLOAT_DTYPES, check=list(SGD_FAULTS), config=list(SGD_CONFIGS)):
        out.append(_sgd_sample(dict(c, buffers="kept", amp="off", telemetry="none", shapes="odd")))
    for c in _cases(check=["finite", "nan-last"], buffers=["fresh", "some"], amp=["off", "step"]):
        tele = "sums32" if c["check"] == "finite" else "none"
        out.append(_sgd_sample(dict(c, dtype=torch.float32, config="momentum", telemetry=tele, shapes="odd")))
    for layout in ("mixed", "dense"):  # "mixed": an entry runs eagerly, the undo spans two launches
        out.append(_sgd_sample(dict(dtype=torch.float32, check="nan-last", config="nesterov", buffers="kept",
                                    amp="off", telemetry="none", shapes="odd", layout=layout)))
    out.append(_sgd_sample(dict(dtype=torch.float32, check="neginf-large", config="momentum", buffers="kept",
                                amp="skip", telemetry="none", shapes="odd")))
    return out


def _sgd_sample(c: dict) -> Sample:
    def make(b):
        x, params, backups, grads, kw = _descent_inputs(c, b)
        cfg = SGD_CONFIGS[c["config"]]
        bufs = None
        if cfg["momentum"] and c["buffers"] == "kept":
            bufs = x.randn()
        elif cfg["momentum"] and c["buffers"] == "some":  # first step of some params only
            bufs = [t if i % 2 else None for i, t in enumerate(x.randn())]
        if "check" in c:
            fault = SGD_FAULTS[c["check"]]
            if fault is not None:
                at, index, value = fault
                g = grads[at]
                g[torch.unravel_index(torch.tensor(index % g.numel()), g.shape)] = value  # any layout
            kw["nonfinite"] = x.scalar(0.0)
            if bufs is not None:
                kw["momentum_out"] = [None if b is None else o for b, o in zip(bufs, x.randn())]
        return (params, backups, grads, bufs), dict(lr=0.1, **cfg, **kw)

    check = [f"check-{c['check']}"] if "check" in c else []
    return Sample("sgd_restore_step_", "-".join([_dtype_id(c["dtype"]), c["config"], c["buffers"], c["amp"],
                                                 c["telemetry"], c["shapes"], c.get("layout", "contiguous"), *check]),
                  c["dtype"], make, tol_scale=10.0, meta=c)


def adamw_samples() -> list[Sample]:
    out = []
    tele_cycle = itertools.cycle(DESCENT_TELEMETRY)
    for c in _cases(dtype=FLOAT_DTYPES, config=["step1", "step7-maximize-nowd"], amp=DESCENT_AMP):
        c = dict(c, telemetry=next(tele_cycle), shapes="conv")
        out.append(_adamw_sample(c))
    for layout in LAYOUTS[1:]:
        out.append(_adamw_sample(dict(dtype=torch.float32, config="step1", amp="off", telemetry="sums64+ascent",
                                      shapes="conv", layout=layout)))
    out.append(_adamw_sample(dict(dtype=torch.float32, config="step1", amp="step", telemetry="sums32+ascent",
                                  shapes="many_small")))
    for c in _cases(dtype=FLOAT_DTYPES, amp=DESCENT_AMP, telemetry=DESCENT_TELEMETRY):
        shapes = "many_small" if c["dtype"] == torch.float32 else "conv"  # lists longer than a 4 KB table
        out.append(_adamw_sample(dict(c, config="step1", shapes=shapes, layout="contiguous")))
    return _unique(out)


def _unique(out: list[Sample]) -> list[Sample]:
    """``out`` without the samples whose id an earlier sample has."""
    seen, kept = set(), []
    for s in out:
        if s.id not in seen:
            seen.add(s.id)
            kept.append(s)
    return kept


def _adamw_sample(c: dict) -> Sample:
    def make(b):
        x, params, backups, grads, kw = _descent_inputs(c, b)
        m, v = x.randn(), x.randn(positive=True)
        step, maximize, wd = (1, False, 1e-2) if c["config"] == "step1" else (7, True, 0.0)
        return (params, backups, grads, m, v, step), dict(lr=1e-2, weight_decay=wd, maximize=maximize, **kw)

    return Sample("adamw_restore_step_", "-".join([_dtype_id(c["dtype"]), c["config"], c["amp"], c["telemetry"],
                                                   c["shapes"], c.get("layout", "contiguous")]),
                  c["dtype"], make, tol_scale=10.0, meta=c)


def variant_samples() -> list[Sample]:
    out = []
    for c in _cases(dtype=FLOAT_DTYPES, shapes=["conv", "many_small"]):
        name = f"{_dtype_id(c['dtype'])}-{c['shapes']}"

        def inputs(b, c=c, layout="contiguous"):
            return Inputs(shapes_for(c["shapes"], b), c["dtype"], b.device, layout)

        out += [
            Sample("renormalize_", name, c["dtype"],
                   lambda b, inputs=inputs: ((inputs(b).randn(), torch.tensor(2.5, device=b.device)), {})),
            Sample("renormalize_", name + "-norm-given", c["dtype"], lambda b, inputs=inputs: _renormalize_given(
                inputs(b))),
            Sample("fisher_accumulate_", name, c["dtype"], lambda b, inputs=inputs: (
                (lambda x: ((x.randn(positive=True), x.randn()), dict(scale=0.5)))(inputs(b)))),
            Sample("looksam_store_", name, c["dtype"], lambda b, inputs=inputs: (
                (lambda x: ((x.full(float("nan")), x.randn(), x.randn()), {}))(inputs(b))), tol_scale=10.0),
            Sample("looksam_apply_", name, c["dtype"], lambda b, inputs=inputs: (
                (lambda x: ((x.randn(), x.randn(), 0.7), {}))(inputs(b))), tol_scale=10.0),
            Sample("mix_", name, c["dtype"], lambda b, inputs=inputs: (
                (lambda x: ((x.randn(), x.randn(), 1.3, -0.4), {}))(inputs(b)))),
            Sample("mix_", name + "-device-factors", c["dtype"], lambda b, inputs=inputs: (
                (lambda x: ((x.randn(), x.randn(), torch.tensor(0.75, device=b.device),
                             torch.tensor(-2.5, dtype=torch.float64, device=b.device)), {}))(inputs(b)))),
        ]
    out.append(Sample("looksam_store_", "float32-g_v-is-sam_grads", torch.float32, lambda b: (
        lambda x, gs: ((gs, x.randn(), gs), {}))(*(lambda x: (x, x.randn()))(Inputs(SHAPES["conv"], torch.float32,
                                                                                     b.device))), tol_scale=10.0))
    out.append(Sample("mix_", "float32-others-is-grads", torch.float32, lambda b: (
        lambda g: ((g, g, 1.5, -0.25), {}))(Inputs(SHAPES["conv"], torch.float32, b.device).randn())))
    for layout in LAYOUTS[1:]:
        def x_of(b, layout=layout):
            return Inputs(shapes_for("conv", b) + [(5, 7)], torch.float32, b.device, layout)
        out += [
            Sample("mix_", f"float32-{layout}", torch.float32,
                   lambda b, x_of=x_of: (lambda x: ((x.randn(), x.randn(), 1.3, -0.4), {}))(x_of(b))),
            Sample("fisher_accumulate_", f"float32-{layout}", torch.float32,
                   lambda b, x_of=x_of: (lambda x: ((x.randn(positive=True), x.randn()), dict(scale=0.5)))(x_of(b))),
            Sample("looksam_store_", f"float32-{layout}", torch.float32,
                   lambda b, x_of=x_of: (lambda x: ((x.randn(), x.randn(), x.randn()), {}))(x_of(b)), tol_scale=10.0),
            Sample("looksam_apply_", f"float32-{layout}", torch.float32,
                   lambda b, x_of=x_of: (lambda x: ((x.randn(), x.randn(), 0.7), {}))(x_of(b)), tol_scale=10.0),
            Sample("renormalize_", f"float32-{layout}", torch.float32,
                   lambda b, x_of=x_of: ((x_of(b).randn(), torch.tensor(2.5, device=b.device)), {})),
        ]
    return out


def centralize_samples() -> list[Sample]:
    """Every dtype on conv-like, many small and row-edge shapes (one row, empty rows, zero rows, 0-dim
    and 1-dim tensors, rows longer than a chunk, rows of one element); the layouts (channels_last runs
    fused, a transposed matrix eagerly); a NaN and an Inf in one row."""
    out = []
    for c in _cases(dtype=FLOAT_DTYPES, shapes=["conv", "many_small", "rows", "empty"]):
        out.append(Sample("centralize_", f"{_dtype_id(c['dtype'])}-{c['shapes']}", c["dtype"], lambda b, c=c: (
            (Inputs(shapes_for(c["shapes"], b), c["dtype"], b.device).randn(),), {}), tol_scale=10.0))
    for layout in LAYOUTS[1:]:
        out.append(Sample("centralize_", f"float32-{layout}", torch.float32, lambda b, layout=layout: (
            (Inputs(shapes_for("conv", b) + [(5, 7)], torch.float32, b.device, layout).randn(),), {}),
            tol_scale=10.0))
    out.append(Sample("centralize_", "float32-nonfinite", torch.float32, lambda b: (
        (Inputs(shapes_for("rows", b), torch.float32, b.device).randn(special=planting([float("nan"), float("inf")])),),
        {})))
    return out


EMA_CONFIGS = {  # name: (weight, sigma, directions)
    "fsam": (0.4, 1.0, True), "fsam-sigma0.5": (0.1, 0.5, True), "vasso": (0.9, 0.0, False),
    "first": (1.0, 0.0, True),  # a first observation (the EMAs start at zero): m ← g/S, d ← g
}
EMA_AMP = ("off", "step", "skip", "skip-inf")  # skip-inf: an Inf/NaN gradient with found_inf set


def _ema_sample(c: dict) -> Sample:
    weight, sigma, with_dirs = EMA_CONFIGS[c["config"]]

    def make(b):
        x = Inputs(shapes_for(c["shapes"], b), c["dtype"], b.device, c.get("layout", "contiguous"))
        emas = x.full(0.0) if c["config"] == "first" else x.randn()
        special = planting([float("inf"), float("nan")]) if c["amp"] == "skip-inf" else None
        grads = x.randn(special=special)
        dirs = x.full(float("nan")) if with_dirs else None  # every element must be written
        kw = dict(weight=weight, sigma=sigma, directions=dirs)
        if c["amp"] != "off":
            for g in grads:
                g.mul_(1024.0)
            kw.update(grad_scale=x.scalar(1024.0), found_inf=x.scalar(float(c["amp"].startswith("skip"))))
        return (emas, grads), kw

    return Sample("ema_update_", "-".join([_dtype_id(c["dtype"]), c["config"], c["amp"], c["shapes"],
                                           c.get("layout", "contiguous")]), c["dtype"], make, tol_scale=10.0, meta=c)


def ema_samples() -> list[Sample]:
    out = [_ema_sample(c) for c in _cases(dtype=FLOAT_DTYPES, config=list(EMA_CONFIGS), amp=EMA_AMP, shapes=["odd"])]
    out += [_ema_sample(dict(dtype=torch.float32, config=config, amp="step", shapes="many_small"))
            for config in ("fsam", "vasso")]
    out += [_ema_sample(dict(dtype=torch.float32, config="fsam", amp="step", shapes="conv", layout=layout))
            for layout in LAYOUTS[1:]]
    return out


def _renormalize_given(x: Inputs):
    grads = x.randn()
    sq = sum(float((g.double() ** 2).sum()) for g in grads)
    return (grads, torch.tensor(2.5, device=x.device)), dict(sq_norm=torch.tensor(sq, device=x.device))


def _tricky_scores(x: Inputs) -> list[torch.Tensor]:
    """Scores with ties across thresholds, NaN, Inf and both zeros."""
    def plant(ts):
        flat = [t.view(-1) for t in ts if t.numel() >= 8]
        flat[0][:4] = 0.25
        flat[1][:4] = torch.tensor([float("nan"), float("inf"), -0.0, 0.0]).to(flat[1].dtype)
    return x.randn(special=plant)


NM_SHAPES = [(6, 16), (8, 3, 3, 3), (10,), (3, 13), (4, 100)]


def _nm_scores(x: Inputs) -> list[torch.Tensor]:
    """Scores for n:m masks (shapes :data:`NM_SHAPES`): ties, Inf and both zeros inside groups, a NaN
    at the end of a row. (A NaN among other scores of a group is not sampled: csrc/cpu/masks.cpp's
    nm_mask compares the raw scores, not their rank keys, and ranks it wrongly.)"""
    def plant(ts):
        ts[0][1, :4] = 1.0
        ts[1].view(-1)[:4] = torch.tensor([5.0, float("inf"), -0.0, 0.0]).to(ts[1].dtype)
        ts[3][0, 12] = float("nan")
    return x.randn(special=plant)


def mask_samples() -> list[Sample]:
    out = []
    shapes = [(1000,), (37, 11), (0,), (5,), (8, 3, 3, 3)]
    for dtype in FLOAT_DTYPES:
        for density in (0.0, 0.05, 0.3, 0.999, 1.0):
            out.append(Sample("topk_mask", f"{_dtype_id(dtype)}-{density}", dtype,
                              lambda b, d=dtype, density=density: (
                                  (_tricky_scores(Inputs(shapes, d, b.device)), density), {}),
                              bitwise=("result",)))
        for n, m in ((2, 4), (1, 4), (4, 8), (3, 3), (0, 4), (1, 1), (20, 40), (33, 64), (2, 130)):
            out.append(Sample("nm_mask", f"{_dtype_id(dtype)}-{n}:{m}", dtype,
                              lambda b, d=dtype, n=n, m=m: (
                                  (_nm_scores(Inputs(NM_SHAPES, d, b.device)), n, m), {}),
                              bitwise=("result",)))
    for layout in ("dense", "misaligned"):
        out.append(Sample("topk_mask", f"float32-{layout}", torch.float32, lambda b, layout=layout: (
            (_tricky_scores(Inputs(shapes, torch.float32, b.device, layout)), 0.3), {}), bitwise=("result",)))
        out.append(Sample("nm_mask", f"float32-{layout}", torch.float32, lambda b, layout=layout: (
            (_nm_scores(Inputs(NM_SHAPES, torch.float32, b.device, layout)), 2, 4), {}),
            bitwise=("result",)))
    return out


BSAM_AMP = ("off", "step", "skip")


def _bsam_inputs(c: dict, b: Backend):
    """Inputs of a bSAM op: w, backups, g (scaled by 1024 under AMP, a NaN and an Inf planted with
    ``nonfinite``), s > 0, and the AMP keywords."""
    x = Inputs(shapes_for(c["shapes"], b) + [(4, 6)], c["dtype"], b.device, c.get("layout", "contiguous"))
    params, backups = x.randn(), x.randn()
    grads = x.randn(special=planting([float("nan"), float("inf"), -float("inf")]) if c.get("nonfinite") else None)
    s = x.randn(positive=True)
    kw = {}
    if c.get("amp", "off") != "off":
        for g in grads:
            g.mul_(1024.0)
        kw = dict(grad_scale=x.scalar(1024.0), found_inf=x.scalar(float(c["amp"] == "skip")))
    return x, params, backups, grads, s, kw


def _bsam_id(c: dict, *keys: str) -> str:
    return "-".join([_dtype_id(c["dtype"]), *(str(c[k]) for k in keys), c["shapes"], c.get("layout", "contiguous")])


def bsam_samples() -> list[Sample]:
    out = []
    shapes = itertools.cycle(["odd", "many_small", "conv"])
    for c in _cases(dtype=FLOAT_DTYPES, shapes=["odd", "many_small", "conv"]):
        out.append(_bsam_noise_sample(c))
    for c in _cases(dtype=FLOAT_DTYPES, perturb=[True, False], amp=BSAM_AMP, nonfinite=[False, True]):
        out.append(_bsam_ascent_sample(dict(c, shapes=next(shapes))))
    for c in _cases(dtype=FLOAT_DTYPES, weight_decay=[0.0, 1e-2], amp=BSAM_AMP):
        out.append(_bsam_descent_sample(dict(c, shapes=next(shapes))))
    for layout in LAYOUTS[1:]:
        c = dict(dtype=torch.float32, shapes="conv", layout=layout)
        out += [_bsam_noise_sample(c), _bsam_ascent_sample(dict(c, perturb=True, amp="step", nonfinite=False)),
                _bsam_descent_sample(dict(c, weight_decay=1e-2, amp="step"))]
    return out


def _bsam_noise_sample(c: dict) -> Sample:
    def make(b):
        x, params, backups, _, s, _ = _bsam_inputs(c, b)
        return (params, backups, s, x.randn()), dict(num_data=50.0)

    return Sample("bsam_noise_", _bsam_id(c), c["dtype"], make, bitwise=("backups",), tol_scale=10.0, meta=c)


def _bsam_ascent_sample(c: dict) -> Sample:
    def make(b):
        _, params, backups, grads, s, kw = _bsam_inputs(c, b)
        return (params, backups, grads, s, x_like(s)), dict(rho=0.05, beta2=0.999, damping=0.1, weight_decay=0.25,
                                                            perturb=c["perturb"], **kw)

    moves = c["perturb"] and c["amp"] != "skip"
    return Sample("bsam_ascent_", _bsam_id(c, "perturb", "amp", "nonfinite"), c["dtype"], make,
                  bitwise=() if moves else ("params",), tol_scale=10.0, meta=c)


def _bsam_descent_sample(c: dict) -> Sample:
    def make(b):
        x, params, backups, grads, s, kw = _bsam_inputs(c, b)
        return (params, backups, grads, x.randn(), s, x.randn(positive=True)), dict(
            lr=0.1, beta1=0.9, weight_decay=c["weight_decay"], **kw)

    skip = c["amp"] == "skip"
    return Sample("bsam_descent_", _bsam_id(c, "weight_decay", "amp"), c["dtype"], make,
                  bitwise=("params", "exp_avgs", "s_next") if skip else ("s_next",), tol_scale=10.0, meta=c)


def x_like(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Garbage-filled outputs in the layout of ``ts`` (an op must write every element)."""
    return [torch.full_like(t, float("nan")) for t in ts]


SAMPLES: dict[str, list[Sample]] = {
    "grad_sq_norm": grad_sq_norm_samples(),
    "dot": dot_samples(),
    "perturb_": perturb_samples(),
    "restore_": restore_samples(),
    "sgd_restore_step_": sgd_samples(),
    "adamw_restore_step_": adamw_samples(),
    **{op: [s for s in variant_samples() if s.op == op]
       for op in ("renormalize_", "fisher_accumulate_", "looksam_store_", "looksam_apply_")},
    "ema_update_": ema_samples(),
    "mix_": [s for s in variant_samples() if s.op == "mix_"],
    **{op: [s for s in bsam_samples() if s.op == op] for op in ("bsam_noise_", "bsam_ascent_", "bsam_descent_")},
    "centralize_": centralize_samples(),
    **{op: [s for s in mask_samples() if s.op == op] for op in ("topk_mask", "nm_mask")},
}
"""op -> its samples; every op of the table has some (tests/ops/test_contract.py checks)."""


def samples(*op_names: str, extended: bool = True) -> list:
    """The pytest params of the samples of ``op_names`` (without the extended ones unless ``extended``)."""
    return [s.param() for name in op_names for s in SAMPLES[name] if extended or not s.extended]
