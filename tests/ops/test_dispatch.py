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


def test_layouts_that_differ_fall_back_to_eager_and_are_counted():
    p = [torch.zeros(4, 3).t()]
    b = [torch.ones(3, 4)]
    before = dispatch.fallback_tensors[("restore_", "cpu", "layout")]
    sam_kernels.ops.restore_(p, b, backend="auto")
    assert dispatch.last_used["restore_"] == "eager"
    assert dispatch.last_call["restore_"].parts == (dispatch.Part("eager", "cpu", "float32", 1, 12, "layout"),)
    assert dispatch.fallback_tensors[("restore_", "cpu", "layout")] == before + 1
    assert torch.equal(p[0], b[0])


def test_explicit_eager_is_no_fallback():
    sam_kernels.ops.restore_([torch.zeros(4, 3).t()], [torch.ones(3, 4)], backend="eager")
    assert dispatch.last_call["restore_"].parts == (dispatch.Part("eager", "cpu", "float32", 1, 12, ""),)


def test_recording_collects_every_call_of_a_block():
    with dispatch.recording() as outer:
        sam_kernels.ops.grad_sq_norm([torch.ones(3)])
        with dispatch.recording() as inner:
            _restore_once()
    assert [r.op for r in outer] == ["grad_sq_norm", "restore_"]
    assert [r.op for r in inner] == ["restore_"]
    assert outer[1] is dispatch.last_call["restore_"]
    assert dispatch._recorders == []


def test_registered_backend_is_chosen_by_name_only():
    """A backend added by register_backend serves calls that name it, never auto's; removed, its
    name is unknown again and a global choice of it is dropped."""
    dispatch.register_backend("eager_again", "sam_kernels.ops.backends.eager")
    try:
        with pytest.raises(ValueError, match="already taken"):
            dispatch.register_backend("eager_again", "sam_kernels.ops.backends.eager")
        assert _restore_once(backend="eager_again") == "eager_again"
        assert _restore_once() != "eager_again"
        assert sam_kernels.backends()["eager_again"]["available"]
        sam_kernels.set_backend("eager_again")
        assert _restore_once() == "eager_again"
    finally:
        dispatch.unregister_backend("eager_again")
    assert sam_kernels.get_backend() == "auto"
    assert set(sam_kernels.backends()) == set(dispatch.BACKEND_NAMES)
    with pytest.raises(ValueError, match="unknown backend"):
        _restore_once(backend="eager_again")


@pytest.mark.parametrize("name", ["auto", "eager", "cpp"])
def test_register_backend_refuses_a_taken_name(name):
    with pytest.raises(ValueError, match="already taken"):
        dispatch.register_backend(name, "sam_kernels.ops.backends.eager")


@pytest.mark.parametrize("name", ["eager", "never_registered"])
def test_unregister_backend_refuses_builtin_and_unknown_names(name):
    with pytest.raises(ValueError, match="not a registered backend"):
        dispatch.unregister_backend(name)
