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


KNOWN_FAILURES: dict[tuple, str] = {
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
