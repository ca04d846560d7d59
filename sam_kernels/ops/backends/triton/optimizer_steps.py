"""Restore fused with the base optimizer's step: ``sgd_restore_step_`` and ``adamw_restore_step_``.

One pass reads the backup (not the perturbed weights), the gradient taken at w + e and the
optimizer state, and writes the new weights and state once. The maths follows torch.optim's
single-tensor/foreach formulas operation by operation (reference.py); scalars that depend only on
hyper-parameters (bias corrections, step sizes) are computed on the host as Python floats.

AMP (as torch's fused optimizers): ``grad_scale`` points at the loss scale the grads carry,
divided out as g·(1/S) with an fp32 reciprocal; a non-zero ``found_inf`` skips the update on the
device (params ← backups, state untouched). Both are compiled out when absent (HAS_SCALE, HAS_FOUND).

Finite check (``sgd_restore_step_``'s ``nonfinite``, CHECK): each program notes a NaN/Inf unscaled
gradient in its chunk during the update and stores 1 into the flag (one store per program, none on
a finite step); the new buffers go to ``momentum_out`` (HAS_OUT) and the old ones are only read.
A second launch on the same stream, :func:`_sgd_undo_kernel`, loads the flag and returns at once
when it is 0 (no memory pass), else puts params, momentum_out and a first step's buffers back: the
decision never visits the host.

Telemetry (reference.add_descent_sums): with ``sums`` (SUMS), each program also accumulates Σg²
and, with ``ascent_grads`` (HAS_ASCENT), Σa·g over its chunk in CDT, g as loaded (the loss scale
still in it), skipped AMP step or not; it writes the two into row ``program_id`` of a
[n_blocks, 2] partials buffer, and one program (:func:`_tables.add_partials_kernel`) adds the rows
in a fixed order into ``sums``. The only extra traffic is the read of ``ascent_grads``; without
``sums`` the flags compile the reduction out.
"""
import torch
import triton
import triton.language as tl

from . import _tables
from ._tables import block_offsets, chunk_bounds, div_ieee, load, round_to, scalar, sqrt_ieee, store, tensor_ptr


@triton.jit
def _amp_scalars(scale_ptr, found_ptr, CDT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr):
    """(1/grad_scale in CDT, skip) from the AMP device scalars (1 and False when absent)."""
    inv = tl.full((), 1.0, tl.float32)
    if HAS_SCALE:
        inv = div_ieee(inv, tl.load(scale_ptr))
    skip = tl.full((), 0, tl.int1)
    if HAS_FOUND:
        skip = tl.load(found_ptr) != 0.0
    return inv.to(CDT), skip


@triton.jit
def _restore_range(p_ptr, b_ptr, start, end, BLOCK: tl.constexpr):
    """A skipped AMP step: params ← backups over this program's chunk."""
    for off in range(start, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        mask = offs < end
        store(p_ptr + offs, load(b_ptr + offs, mask), mask)


@triton.jit
def _add_sums(acc_sq, acc_dot, g, a_ptr, offs, mask, CDT: tl.constexpr, HAS_ASCENT: tl.constexpr):
    """Adds g² (and a·g) lane by lane; masked-off lanes loaded 0, so they add 0."""
    acc_sq += g * g
    if HAS_ASCENT:
        acc_dot += load(a_ptr + offs, mask).to(CDT) * g
    return acc_sq, acc_dot


@triton.jit
def _sums_range(g_ptr, a_ptr, start, split, end, CDT: tl.constexpr, BLOCK: tl.constexpr, HAS_ASCENT: tl.constexpr):
    """The lane sums of a skipped step's chunk, block for block as the update loops add them."""
    acc_sq = tl.zeros((BLOCK,), CDT)
    acc_dot = tl.zeros((BLOCK,), CDT)
    for off in range(start, split, BLOCK):
        offs = block_offsets(off, BLOCK)
        acc_sq, acc_dot = _add_sums(acc_sq, acc_dot, load(g_ptr + offs, None).to(CDT), a_ptr, offs, None, CDT,
                                    HAS_ASCENT)
    for off in range(split, end, BLOCK):
        offs = block_offsets(off, BLOCK)
        mask = offs < end
        acc_sq, acc_dot = _add_sums(acc_sq, acc_dot, load(g_ptr + offs, mask).to(CDT), a_ptr, offs, mask, CDT,
                                    HAS_ASCENT)
    return acc_sq, acc_dot


@triton.jit
def _store_partials(partials, acc_sq, acc_dot):
    """Row program_id of the [n_blocks, 2] partials: (Σ g², Σ a·g) of this program's chunk."""
    row = partials + 2 * tl.program_id(0).to(tl.int64)
    tl.store(row, tl.sum(acc_sq, 0))
    tl.store(row + 1, tl.sum(acc_dot, 0))


@triton.jit
def _sgd_block(p_ptr, b_ptr, g_ptr, buf_ptr, out_ptr, offs, mask, neg_lr, mom, one_minus_dampening, weight_decay,
               inv_scale, bad, DT: tl.constexpr, CDT: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
               INIT_BUFFERS: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
               HAS_SCALE: tl.constexpr, HAS_OUT: tl.constexpr, CHECK: tl.constexpr):
    """One block of the update; returns g as loaded, in CDT (for the sums), and the lanes of ``bad``
    raised to 1 where an unscaled gradient is NaN/Inf (CHECK; masked-off lanes loaded 0)."""
    w = load(b_ptr + offs, mask).to(CDT)
    g = load(g_ptr + offs, mask).to(CDT)
    d = g
    if HAS_SCALE:
        d = d * inv_scale
    if CHECK:
        bad = tl.maximum(bad, tl.where(tl.abs(d) < float("inf"), 0, 1))  # NaN compares false
    if MAXIMIZE:
        d = -d
    if HAS_WD:
        d = d + weight_decay * w
    if HAS_MOMENTUM:
        if INIT_BUFFERS:
            buf = d
        else:
            buf = load(buf_ptr + offs, mask).to(CDT) * mom + one_minus_dampening * d
        buf = round_to(buf, DT)
        if HAS_OUT:
            store(out_ptr + offs, buf, mask)
        else:
            store(buf_ptr + offs, buf, mask)
        buf = buf.to(CDT)  # torch continues from the stored (rounded) buffer
        if NESTEROV:
            d = d + mom * buf
        else:
            d = buf
    store(p_ptr + offs, round_to(w + neg_lr * d, DT), mask)
    return g, bad


@triton.jit
def _sgd_restore_step_kernel(p_ptrs, b_ptrs, g_ptrs, buf_ptrs, out_ptrs, a_ptrs, sizes, blocks, scale_ptr, found_ptr,
                             flag_ptr, partials,
                             neg_lr: tl.float64, momentum: tl.float64, one_minus_dampening: tl.float64,
                             weight_decay: tl.float64, DT: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr,
                             CHUNK: tl.constexpr, ALIGNED: tl.constexpr, HAS_WD: tl.constexpr,
                             HAS_MOMENTUM: tl.constexpr, INIT_BUFFERS: tl.constexpr, NESTEROV: tl.constexpr,
                             MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr,
                             SUMS: tl.constexpr, HAS_ASCENT: tl.constexpr, HAS_OUT: tl.constexpr,
                             CHECK: tl.constexpr):
    """w = backup; d = ±g (+ wd·w); buf = d if INIT else momentum·buf + (1-dampening)·d;
    d = d + momentum·buf if NESTEROV else buf; w = w + (-lr)·d (torch.optim.SGD).
    SUMS: partials[b] = (Σ g², Σ a·g) over the chunk (a·g only with HAS_ASCENT).
    HAS_OUT: the new buffers go to out_ptrs (buf_ptrs only read). CHECK: *flag_ptr = 1 when some
    unscaled g of the chunk is NaN/Inf (a step found_inf skips is not looked at)."""
    t, start, split, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
    p_ptr = tensor_ptr(p_ptrs, t, DT, ALIGNED)
    b_ptr = tensor_ptr(b_ptrs, t, DT, ALIGNED)
    g_ptr = tensor_ptr(g_ptrs, t, DT, ALIGNED)
    buf_ptr = tensor_ptr(buf_ptrs, t, DT, ALIGNED)
    out_ptr = tensor_ptr(out_ptrs, t, DT, ALIGNED)
    a_ptr = tensor_ptr(a_ptrs, t, DT, ALIGNED)
    lr_c = scalar(neg_lr, CDT)
    mom = scalar(momentum, CDT)
    damp = scalar(one_minus_dampening, CDT)
    wd = scalar(weight_decay, CDT)
    inv, skip = _amp_scalars(scale_ptr, found_ptr, CDT, HAS_SCALE, HAS_FOUND)
    acc_sq = tl.zeros((BLOCK,), CDT)
    acc_dot = tl.zeros((BLOCK,), CDT)
    bad = tl.zeros((BLOCK,), tl.int32)  # per lane: reduced once, after the loops
    if skip:
        _restore_range(p_ptr, b_ptr, start, end, BLOCK)
        if HAS_OUT:  # the caller keeps momentum_out as the state
            _restore_range(out_ptr, buf_ptr, start, end, BLOCK)
        if SUMS:  # the sums do not depend on whether the step is taken
            acc_sq, acc_dot = _sums_range(g_ptr, a_ptr, start, split, end, CDT, BLOCK, HAS_ASCENT)
    else:
        for off in range(start, split, BLOCK):
            offs = block_offsets(off, BLOCK)
            g, bad = _sgd_block(p_ptr, b_ptr, g_ptr, buf_ptr, out_ptr, offs, None, lr_c, mom, damp, wd, inv, bad, DT,
                                CDT, HAS_WD, HAS_MOMENTUM, INIT_BUFFERS, NESTEROV, MAXIMIZE, HAS_SCALE, HAS_OUT, CHECK)
            if SUMS:
                acc_sq, acc_dot = _add_sums(acc_sq, acc_dot, g, a_ptr, offs, None, CDT, HAS_ASCENT)
        for off in range(split, end, BLOCK):
            offs = block_offsets(off, BLOCK)
            mask = offs < end
            g, bad = _sgd_block(p_ptr, b_ptr, g_ptr, buf_ptr, out_ptr, offs, mask, lr_c, mom, damp, wd, inv, bad, DT,
                                CDT, HAS_WD, HAS_MOMENTUM, INIT_BUFFERS, NESTEROV, MAXIMIZE, HAS_SCALE, HAS_OUT, CHECK)
            if SUMS:
                acc_sq, acc_dot = _add_sums(acc_sq, acc_dot, g, a_ptr, offs, mask, CDT, HAS_ASCENT)
    if CHECK:
        if tl.max(bad, 0) != 0:
            tl.store(flag_ptr, 1.0)
    if SUMS:
        _store_partials(partials, acc_sq, acc_dot)


@triton.jit
def _sgd_undo_kernel(p_ptrs, b_ptrs, old_ptrs, new_ptrs, sizes, blocks, flag_ptr, found_ptr, DT: tl.constexpr,
                     CDT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr,
                     HAS_FOUND: tl.constexpr, HAS_NEW: tl.constexpr, HAS_OLD: tl.constexpr):
    """The finite check's undo, launched after the update: nothing unless *flag_ptr != 0 (and the
    step was not skipped by found_inf from the start, which wrote nothing to undo); else params ←
    backups and, HAS_NEW, the new buffers ← the old ones (HAS_OLD) or 0 (a first step), bitwise."""
    act = tl.load(flag_ptr) != 0.0
    if HAS_FOUND:
        act = act & (tl.load(found_ptr) == 0.0)
    if act:
        t, start, split, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
        _restore_range(tensor_ptr(p_ptrs, t, DT, ALIGNED), tensor_ptr(b_ptrs, t, DT, ALIGNED), start, end, BLOCK)
        if HAS_NEW:
            new_ptr = tensor_ptr(new_ptrs, t, DT, ALIGNED)
            if HAS_OLD:
                _restore_range(new_ptr, tensor_ptr(old_ptrs, t, DT, ALIGNED), start, end, BLOCK)
            else:
                for off in range(start, end, BLOCK):
                    offs = block_offsets(off, BLOCK)
                    mask = offs < end
                    store(new_ptr + offs, tl.zeros((BLOCK,), DT), mask)


@triton.jit
def _adamw_block(p_ptr, b_ptr, g_ptr, m_ptr, v_ptr, offs, mask, decay, wt, beta2, one_minus_beta2,
                 bias_correction2_sqrt, eps, neg_step_size, inv_scale, DT: tl.constexpr, CDT: tl.constexpr,
                 MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr):
    """One block of the update; returns the gradient as loaded, in CDT (for the sums)."""
    w = load(b_ptr + offs, mask).to(CDT) * decay
    loaded = load(g_ptr + offs, mask).to(CDT)
    g = loaded
    if HAS_SCALE:
        g = g * inv_scale
    if MAXIMIZE:
        g = -g
    m = load(m_ptr + offs, mask).to(CDT)
    # torch's lerp: two formulas, chosen by |weight| < 0.5, for accuracy at both ends.
    m = tl.where(tl.abs(wt) < 0.5, m + wt * (g - m), g - (g - m) * (1.0 - wt))
    v = load(v_ptr + offs, mask).to(CDT) * beta2
    v = v + one_minus_beta2 * g * g
    denom = div_ieee(sqrt_ieee(v), bias_correction2_sqrt) + eps
    w = w + div_ieee(neg_step_size * m, denom)
    store(m_ptr + offs, round_to(m, DT), mask)
    store(v_ptr + offs, round_to(v, DT), mask)
    store(p_ptr + offs, round_to(w, DT), mask)
    return loaded


@triton.jit
def _adamw_restore_step_kernel(p_ptrs, b_ptrs, g_ptrs, m_ptrs, v_ptrs, a_ptrs, sizes, blocks, scale_ptr, found_ptr,
                               partials, decay: tl.float64, lerp_weight: tl.float64, beta2: tl.float64,
                               one_minus_beta2: tl.float64, bias_correction2_sqrt: tl.float64, eps: tl.float64,
                               neg_step_size: tl.float64, DT: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr,
                               CHUNK: tl.constexpr, ALIGNED: tl.constexpr, MAXIMIZE: tl.constexpr,
                               HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr, SUMS: tl.constexpr,
                               HAS_ASCENT: tl.constexpr):
    """w = backup·(1 - lr·wd); m = lerp(m, ±g, 1-beta1); v = v·beta2 + (1-beta2)·g·g;
    w = w + (-lr/bc1)·m / (sqrt(v)/sqrt(bc2) + eps) (torch.optim.AdamW).
    SUMS: partials[b] = (Σ g², Σ a·g) over the chunk (a·g only with HAS_ASCENT)."""
    t, start, split, end = chunk_bounds(blocks, sizes, CHUNK, BLOCK)
    p_ptr = tensor_ptr(p_ptrs, t, DT, ALIGNED)
    b_ptr = tensor_ptr(b_ptrs, t, DT, ALIGNED)
    g_ptr = tensor_ptr(g_ptrs, t, DT, ALIGNED)
    m_ptr = tensor_ptr(m_ptrs, t, DT, ALIGNED)
    v_ptr = tensor_ptr(v_ptrs, t, DT, ALIGNED)
    a_ptr = tensor_ptr(a_ptrs, t, DT, ALIGNED)
    dec = scalar(decay, CDT)
    wt = scalar(lerp_weight, CDT)
    b2 = scalar(beta2, CDT)
    one_b2 = scalar(one_minus_beta2, CDT)
    bc2 = scalar(bias_correction2_sqrt, CDT)
    eps_c = scalar(eps, CDT)
    step_c = scalar(neg_step_size, CDT)
    inv, skip = _amp_scalars(scale_ptr, found_ptr, CDT, HAS_SCALE, HAS_FOUND)
    acc_sq = tl.zeros((BLOCK,), CDT)
    acc_dot = tl.zeros((BLOCK,), CDT)
    if skip:
        _restore_range(p_ptr, b_ptr, start, end, BLOCK)
        if SUMS:  # the sums do not depend on whether the step is taken
            acc_sq, acc_dot = _sums_range(g_ptr, a_ptr, start, split, end, CDT, BLOCK, HAS_ASCENT)
    else:
        for off in range(start, split, BLOCK):
            offs = block_offsets(off, BLOCK)
            g = _adamw_block(p_ptr, b_ptr, g_ptr, m_ptr, v_ptr, offs, None, dec, wt, b2, one_b2, bc2, eps_c, step_c,
                             inv, DT, CDT, MAXIMIZE, HAS_SCALE)
            if SUMS:
                acc_sq, acc_dot = _add_sums(acc_sq, acc_dot, g, a_ptr, offs, None, CDT, HAS_ASCENT)
        for off in range(split, end, BLOCK):
            offs = block_offsets(off, BLOCK)
            mask = offs < end
            g = _adamw_block(p_ptr, b_ptr, g_ptr, m_ptr, v_ptr, offs, mask, dec, wt, b2, one_b2, bc2, eps_c, step_c,
                             inv, DT, CDT, MAXIMIZE, HAS_SCALE)
            if SUMS:
                acc_sq, acc_dot = _add_sums(acc_sq, acc_dot, g, a_ptr, offs, mask, CDT, HAS_ASCENT)
    if SUMS:
        _store_partials(partials, acc_sq, acc_dot)


def sgd_restore_step_(params, backups, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov,
                      maximize, init_buffers, grad_scale=None, found_inf=None, ascent_grads=None, sums=None,
                      momentum_out=None, nonfinite=None):
    """params ← backups, then torch.optim.SGD's update (see reference.sgd_restore_step_); with
    ``sums``, adds [Σ g², Σ ⟨ascent_grads, g⟩] into it (reference.add_descent_sums); with
    ``nonfinite``, the finite check in the pass and the undo launch (module docstring)."""
    has_momentum = momentum != 0
    amp = _amp_pointers(grad_scale, found_inf, params)
    _check_finite_args(params, momentum_out, nonfinite, has_momentum, init_buffers)
    _check_telemetry("sgd_restore_step_", params, grads, ascent_grads, sums)
    bufs = momentum_buffers if has_momentum else None
    flag = params[0] if nonfinite is None else nonfinite  # a placeholder pointer where absent: compiled out
    _launch_with_sums(_sgd_restore_step_kernel, [params, backups, grads, bufs, momentum_out, ascent_grads],
                      (*amp, flag), sums, ascent_grads, -lr, momentum, 1 - dampening, weight_decay,
                      HAS_WD=weight_decay != 0, HAS_MOMENTUM=has_momentum, INIT_BUFFERS=init_buffers,
                      NESTEROV=nesterov, MAXIMIZE=maximize, HAS_SCALE=grad_scale is not None,
                      HAS_FOUND=found_inf is not None, HAS_OUT=momentum_out is not None, CHECK=nonfinite is not None)
    if nonfinite is not None:
        old = bufs if has_momentum and not init_buffers else None
        new = momentum_out if momentum_out is not None else bufs
        _tables.launch_over(_sgd_undo_kernel, [params, backups, old, new], nonfinite, amp[1],
                            HAS_FOUND=found_inf is not None, HAS_NEW=new is not None, HAS_OLD=old is not None)


def adamw_restore_step_(params, backups, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay,
                        maximize, grad_scale=None, found_inf=None, ascent_grads=None, sums=None):
    """params ← backups, then torch.optim.AdamW's update (``step`` counted after its increment); with
    ``sums``, adds [Σ g², Σ ⟨ascent_grads, g⟩] into it (reference.add_descent_sums)."""
    amp = _amp_pointers(grad_scale, found_inf, params)
    _check_telemetry("adamw_restore_step_", params, grads, ascent_grads, sums)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    _launch_with_sums(_adamw_restore_step_kernel, [params, backups, grads, exp_avgs, exp_avg_sqs, ascent_grads], amp,
                      sums, ascent_grads, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, bias_correction2_sqrt,
                      eps, -lr / bias_correction1, MAXIMIZE=maximize, HAS_SCALE=grad_scale is not None,
                      HAS_FOUND=found_inf is not None)


def _launch_with_sums(kernel, lists, amp, sums, ascent_grads, *args, **constexprs):
    """One launch of a descent ``kernel`` over ``lists``; with ``sums``, its [n_blocks, 2] partials
    then :func:`_tables.add_partials` into ``sums`` (sums[1] only with ``ascent_grads``)."""
    partials = _tables.partials_for(lists, sums, 2)
    tab = _tables.launch_over(kernel, lists, *amp, partials, *args, SUMS=sums is not None,
                              HAS_ASCENT=ascent_grads is not None, **constexprs)
    if sums is not None:
        _tables.add_partials(partials, sums, tab.n_blocks, 2 if ascent_grads is not None else 1)


def _check_finite_args(params, momentum_out, nonfinite, has_momentum, init_buffers):
    """``momentum_out`` / ``nonfinite`` as csrc/common.h's check_sgd_out_args, before anything is launched."""
    if momentum_out is not None:
        if not has_momentum or init_buffers:
            raise ValueError("sgd_restore_step_: momentum_out needs momentum != 0 and the old buffers (not "
                             "init_buffers)")
        if len(momentum_out) != len(params):
            raise ValueError(f"sgd_restore_step_: {len(momentum_out)} momentum_out tensors for {len(params)} params")
    if nonfinite is not None:
        if nonfinite.dtype != torch.float32 or nonfinite.dim() != 0 or nonfinite.device != params[0].device:
            raise TypeError(f"nonfinite must be a 0-dim float32 tensor on {params[0].device}, got {nonfinite.dtype} "
                            f"{tuple(nonfinite.shape)} on {nonfinite.device}")
        if has_momentum and not init_buffers and momentum_out is None:
            raise ValueError("sgd_restore_step_: nonfinite with momentum needs momentum_out (buffers updated in "
                             "place could not be restored)")


def _check_telemetry(op, params, grads, ascent_grads, sums):
    """``sums``/``ascent_grads`` as csrc/common.h's check_telemetry_args, before anything is launched."""
    if sums is None:
        if ascent_grads is not None:
            raise ValueError(f"{op}: ascent_grads given without sums (where the dot would go)")
        return
    _tables.check_sums_tensor(op, "sums", sums, 2, params)
    if ascent_grads is None:
        return
    if len(ascent_grads) != len(grads):
        raise ValueError(f"{op}: {len(ascent_grads)} ascent_grads for {len(grads)} grads")
    # Read through the same table offsets as g: same shape, dtype, device and memory order. The usual
    # case (identical layouts) is checked list-wide; per-entry checks name the first bad entry.
    try:
        if [(a.dtype, a.shape, a.device, a.stride()) for a in ascent_grads] == \
                [(g.dtype, g.shape, g.device, g.stride()) for g in grads]:
            return
    except AttributeError:  # a non-tensor entry
        pass
    for i, (a, g) in enumerate(zip(ascent_grads, grads)):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"{op}: ascent_grads[{i}] is {type(a).__name__}, not a tensor")
        if a.dtype != g.dtype:
            raise TypeError(f"{op}: ascent_grads[{i}] has dtype {a.dtype}, expected {g.dtype}")
        if a.shape != g.shape or a.device != g.device or _memory_order(a) != _memory_order(g):
            raise ValueError(f"{op}: ascent_grads[{i}] is {tuple(a.shape)} with strides {a.stride()} on {a.device}, "
                             f"but grads[{i}] is {tuple(g.shape)} with strides {g.stride()} on {g.device}")


def _memory_order(t):
    """Strides of the dims of size > 1 (where equal, two same-shape dense tensors align element-wise)."""
    return tuple(st for sz, st in zip(t.shape, t.stride()) if sz != 1)


def _amp_pointers(grad_scale, found_inf, params):
    """The AMP scalars as kernel arguments (a placeholder pointer where absent: compiled out)."""
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != 1 or t.device != params[0].device):
            raise TypeError(f"{name} must be a 0-dim float32 tensor on {params[0].device}, got {t.dtype} "
                            f"{tuple(t.shape)} on {t.device}")
    placeholder = params[0]
    return (placeholder if grad_scale is None else grad_scale), (placeholder if found_inf is None else found_inf)
