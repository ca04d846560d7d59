"""Backend selection: per call, global setter, environment variable, auto fallback, reporting."""
import pytest
import torch

import sam_kernels
from sam_kernels.ops import dispatch


@pytest.fixture(autouse=True)
def _reset_backend(monkeypatch):
    monkeypatch.delenv("SAM_KERNELS_BACKEND", raising=False)
    sam_kernels.set_backend(None)
    yield
    sam_kernels.set_backend(None)


def _restore_once(**kw):
    p, b = [torch.zeros(3)], [torch.ones(3)]
    sam_kernels.ops.restore_(p, b, **kw)
    assert torch.equal(p[0], b[0])
    return dispatch.last_used["restore_"]


def test_backends_reports_every_backend_with_reason():
    info = sam_kernels.backends()
    assert set(info) == {"eager", "cpp", "cuda", "triton"}
    assert info["eager"]["available"] and "cpu" in info["eager"]["devices"]
    for name, b in info.items():
        assert b["available"] or b["reason"], f"{name} is missing without a reason"


def test_per_call_backend_is_used():
    assert _restore_once(backend="eager") == "eager"


def test_global_setter_and_env_var(monkeypatch):
    sam_kernels.set_backend("eager")
    assert sam_kernels.get_backend() == "eager"
    assert _restore_once() == "eager"
    sam_kernels.set_backend(None)
    monkeypatch.setenv("SAM_KERNELS_BACKEND", "eager")
    assert sam_kernels.get_backend() == "eager"
    assert _restore_once() == "eager"
    monkeypatch.setenv("SAM_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        sam_kernels.get_backend()


def test_auto_prefers_cpp_on_cpu_when_built():
    expected = "cpp" if sam_kernels.backends()["cpp"]["available"] else "eager"
    assert _restore_once(backend="auto") == expected


def test_explicit_unavailable_backend_raises_with_reason():
    # The cuda backend can never serve CPU tensors.
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run restore_ on cpu tensors"):
        _restore_once(backend="cuda")


def test_non_contiguous_groups_fall_back_to_eager():
    p = [torch.zeros(4, 3).t()]
    b = [torch.ones(3, 4)]
    sam_kernels.ops.restore_(p, b, backend="auto")
    assert dispatch.last_used["restore_"] == "eager"
    assert torch.equal(p[0], b[0])
