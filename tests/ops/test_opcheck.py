"""torch.library.opcheck on every compiled op (schema, fake impl, dispatch) and a torch.compile trace."""
from __future__ import annotations

import pytest
import torch

import sam_kernels  # noqa: F401  (loads the extension: ops and fake impls)
from tests.utils import require_backend

DEVICES = ["cpu", "cuda"]


LAYOUTS = ["contiguous", "dense"]


def _lists(device, n=3, layout="contiguous"):
    if layout == "contiguous":
        shapes = [(5,), (3, 4), (2, 3, 2)][:n]
        return [torch.randn(s, device=device) for s in shapes]
    # Non-contiguous but dense: channels_last, channels_last_3d, a permuted matrix (kernels walk storage).
    return [torch.randn(2, 3, 2, 3, device=device).to(memory_format=torch.channels_last),
            torch.randn(2, 3, 2, 2, 2, device=device).to(memory_format=torch.channels_last_3d),
            torch.randn(4, 3, device=device).t()][:n]


def samples(device, layout="contiguous"):
    p, g, b, s = (_lists(device, layout=layout) for _ in range(4))
    masks = [torch.rand_like(x) < 0.5 for x in p]  # in the params' layout
    sq = torch.tensor(2.0, device=device)
    ops = torch.ops.sam_kernels
    return {
        "grad_sq_norm": (ops.grad_sq_norm.default, (g, p, masks, 0.01)),
        "dot": (ops.dot.default, (g, s)),
        "perturb_": (ops.perturb_.default, (p, g, b, sq, 0.05, 1e-12, masks, True, 0.01, 0.5, [1, 2, 3])),
        "restore_": (ops.restore_.default, (p, b)),
        "sgd_restore_step_": (ops.sgd_restore_step_.default, (p, b, g, s, 0.1, 0.9, 0.0, 1e-4, True, False, False)),
        "adamw_restore_step_": (ops.adamw_restore_step_.default,
                                (p, b, g, s, [x.abs() for x in _lists(device, layout=layout)], 2, 1e-3, 0.9, 0.999, 1e-8, 0.01,
                                 False)),
        # telemetry: the descents also add [Σ g², Σ ⟨a, g⟩] into a mutated sums tensor
        "sgd_restore_step_sums": (ops.sgd_restore_step_.default,
                                  (p, b, g, s, 0.1, 0.9, 0.0, 1e-4, True, False, False, None, None,
                                   _lists(device, layout=layout), torch.zeros(2, device=device))),
        "adamw_restore_step_sums": (ops.adamw_restore_step_.default,
                                    (p, b, g, s, [x.abs() for x in _lists(device, layout=layout)], 2, 1e-3, 0.9, 0.999,
                                     1e-8, 0.01, False, None, None, None, torch.zeros(2, dtype=torch.float64,
                                                                                  device=device))),
        "renormalize_": (ops.renormalize_.default, (g, sq, torch.tensor(3.0, device=device), 1e-12)),
        "fisher_accumulate_": (ops.fisher_accumulate_.default, ([x.abs() for x in s], g, 0.5)),
        "looksam_store_": (ops.looksam_store_.default, (s, g, b, torch.tensor(0.3, device=device), sq, 1e-12)),
        "looksam_apply_": (ops.looksam_apply_.default, (g, s, 0.7, sq, torch.tensor(1.5, device=device), 1e-12)),
        "ema_update_": (ops.ema_update_.default, (s, g, b, 0.4, 1.0)),
        "ema_update_amp": (ops.ema_update_.default, (s, g, None, 0.9, 0.0, torch.tensor(1024.0, device=device),
                                                     torch.tensor(0.0, device=device))),
        "mix_": (ops.mix_.default, (g, s, torch.tensor(1.3, device=device), torch.tensor(-0.4, device=device))),
        "bsam_noise_": (ops.bsam_noise_.default, (p, b, [x.abs() + 0.1 for x in s], g, 50.0)),
        "bsam_ascent_": (ops.bsam_ascent_.default, (p, b, g, [x.abs() + 0.1 for x in s], _lists(device, layout=layout),
                                                    0.05, 0.999, 0.1, 0.01, True)),
        "bsam_descent_": (ops.bsam_descent_.default, (p, b, g, _lists(device, layout=layout), [x.abs() + 0.1 for x in s],
                                                      _lists(device, layout=layout), 0.1, 0.9, 0.01,
                                                      torch.tensor(4.0, device=device),
                                                      torch.tensor(0.0, device=device))),
        # dims 1.. of every entry after dim 0 in memory (dense: channels_last, channels_last_3d)
        "centralize_": (ops.centralize_.default, (_lists(device, n=2, layout=layout),)),
        "topk_mask": (ops.topk_mask.default, (s, 4)),
        "nm_mask": (ops.nm_mask.default, (s, 2, 4)),
    }


def _backend_for(device):
    return "cpp" if device == "cpu" else "cuda"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", list(samples("cpu")))
def test_opcheck(device, op, layout):
    require_backend(_backend_for(device), device)
    fn, args = samples(device, layout)[op]
    torch.library.opcheck(fn, args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("device", DEVICES)
def test_sam_ascent_compiles_fullgraph(device, compiler):
    require_backend(_backend_for(device), device)
    ops = torch.ops.sam_kernels

    def ascent_then_restore(params, grads, backups):
        sq = ops.grad_sq_norm(grads, None, None, 0.0)
        ops.perturb_(params, grads, backups, sq, 0.05, 1e-12, None, False, 0.0, 1.0, [0] * len(params))
        # A snapshot of the perturbed weights that Inductor cannot turn into an alias: with clone()
        # (or p * 1.0) torch 2.14's Inductor returns the input buffer itself, which the restore_
        # write-back then overwrites.
        moved = [p * 2.0 for p in params]
        ops.restore_(params, backups)
        return sq, moved

    params, grads = _lists(device), _lists(device)
    ref_params = [p.clone() for p in params]
    sq_e, moved_e = ascent_then_restore(ref_params, grads, [torch.empty_like(p) for p in params])
    torch._dynamo.reset()
    compiled = torch.compile(ascent_then_restore, fullgraph=True, backend=compiler)
    sq_c, moved_c = compiled(params, grads, [torch.empty_like(p) for p in params])
    torch.testing.assert_close(sq_c, sq_e)
    for a, b, p in zip(moved_c, moved_e, params):
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, 2.0 * p), "the weights were not perturbed"
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)


def test_rejects_wrong_device_and_dtype_in_kernel():
    require_backend("cpp", "cpu")
    with pytest.raises(RuntimeError, match="expected"):
        torch.ops.sam_kernels.restore_([torch.zeros(3)], [torch.zeros(4)])
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        torch.ops.sam_kernels.grad_sq_norm([torch.zeros(3, dtype=torch.int32)], None, None, 0.0)
