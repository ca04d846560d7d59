"""Parametrization of the loop matrix: variant x loop x backend, with today's known failures.

``KNOWN_FAILURES`` maps (loop, variants, backend) to what goes wrong: variants a tuple of names,
or None for all; backend a name, or None for all; the loop may carry a suffix naming a case of it
("amp_manual/unscale=first"). Those cases are ``xfail(strict=True)``: when a fix makes one pass, the
xfail fails and the entry must be removed here. Nothing is skipped.
"""
from __future__ import annotations

import pytest

from tests.optim.variants import VARIANTS, VariantInfo

BACKENDS = ("eager", "cpp")



def all_but(*names: str) -> tuple:
    return tuple(v.name for v in VARIANTS if v.name not in names)


# Scale-invariant steps hide a wrong loss scale: AdamW and Adagrad normalize by the gradient's own size and
# Stable SAM rescales the descent gradient to ‖g(w)‖, so those rows pass where the scale is mishandled.
SCALE_INVARIANT = ("SAM-AdamW", "SAM-Adagrad", "StableSAM")
ESAM_AMP = ("ESAM.step() refuses to end a manual step (scaler.step(opt) after first_step: ValueError, weights at "
            "w + e), and scaler.step(opt, closure) asserts a loss was scaled before ESAM's step runs its first pass")

KNOWN_FAILURES: dict[tuple, str] = {
    ("amp_manual/unscale=first", all_but(*SCALE_INVARIANT), None):
        "unscale_ on the first pass marks the scaler stage UNSCALED; amp.current_scale then returns None for the "
        "scaled second pass too: the descent uses a 1024x gradient",
    ("amp_closure/unscale=closure", all_but(*SCALE_INVARIANT[2:]), None):
        "unscale_ inside the closure: SAM.step marks the closure's gradients fresh (scaled by the scaler's scale) "
        "and divides them again: a step 1/1024 the size",
    ("amp_manual", ("ESAM",), None): ESAM_AMP,
    ("amp_manual/unscale=second", ("ESAM",), None): ESAM_AMP,
    ("amp_manual/unscale=first", ("ESAM",), None): ESAM_AMP,
    ("amp_closure", ("ESAM",), None): ESAM_AMP,
    ("amp_manual/overflow=1", ("ESAM",), None): ESAM_AMP,
    ("amp_manual/overflow=2", ("ESAM",), None): ESAM_AMP,
    ("amp_closure/overflow=1", ("ESAM",), None): ESAM_AMP,
    ("amp_closure/overflow=2", ("ESAM",), None): ESAM_AMP,
    ("amp_manual/fp16", ("ESAM",), None): ESAM_AMP,
    ("checkpoint/midstep_overflow", all_but("LookSAM"), None):  # LookSAM's step 1 is a plain step: no middle
        "the first pass's overflow flag (StepState.found) is not saved by state_dict(): the resumed step applies "
        "the overflowed step and the scale does not back off",
    ("compile", all_but("SAM-AdamW", "SAM-Adagrad", "SparseSAM-fisher", "SparseSAM-dynamic", "SparseSAM-structured",
                        "SparseSAM-nm"), None):
        "the lr schedule recompiles every step: the kernels take lr and rho as Python floats, which a compiled "
        "graph holds as constants, until the recompile limit fails fullgraph (tensor hyperparameters in the ops needed)",
    ("compile/inductor", None, None):
        "the lr schedule recompiles every step (lr and rho are float arguments of the kernels: graph constants)",
    ("compile", ("SAM-AdamW", "SAM-Adagrad"), None):
        "base_step.restore_and_step calls torch._dynamo.graph_break() for AdamW's host step counts and for bases "
        "without a fused descent: fullgraph=True fails in second_step",
    ("compile", ("SparseSAM-fisher", "SparseSAM-dynamic", "SparseSAM-structured", "SparseSAM-nm"), None):
        "the mask refresh inside first_step does not trace (Fisher: an opaque object created in the graph; "
        "random/dynamic: a CPU generator argument Dynamo cannot proxy)",
}


def known(loop: str, name: str, backend) -> str | None:
    for (lp, var, be), reason in KNOWN_FAILURES.items():
        if lp == loop and (var is None or name in var) and be in (None, backend):
            return reason
    return None


def cases(loop: str, variants=VARIANTS, backends=BACKENDS, refused: bool = False):
    """pytest params (info, backend) of ``loop``; ``refused``: the rows that refuse it instead."""
    out = []
    for info in variants:
        if (loop in info.refuses) != refused:
            continue
        for be in backends:
            reason = known(f"{loop}/refused" if refused else loop, info.name, be)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(info, be, id=f"{info.name}-{be}", marks=marks))
    return out


def refusal(info: VariantInfo, loop: str):
    """``pytest.raises`` of the error ``info`` must raise in ``loop``."""
    exc, match = info.refuses[loop]
    return pytest.raises(exc, match=match)
