"""A multi-step ascent (``ascent_steps=k``): k normalized ascent steps of rho/k each, from the point
the last one reached, w_{i+1} = w_i + (rho/k)·g(w_i)/(‖g(w_i)‖ + eps) (ASAM: T at w_i), then the
base step at w with g(w_k) (optax.contrib.sam's adversarial steps, with ``normalize()``).

The first ascent is SAM's own (w is kept once, in its backups); each later one is :func:`ascend_again`,
which ``first_step`` runs as a body of its own, so a compiled ``first_step`` keeps one graph per
kind of ascent, whatever k is.
"""
from __future__ import annotations

from typing import Any

from . import backups, groups, sparse_grads
from .ascent import Ascent, bucket_key

SCRATCH = "ascent_scratch"  # state entry: the copy a later ascent's perturb_ writes (w is in "backup")
OWN_PERTURBATION = ("ascent_params", "perturbation_options", "ascent_direction")  # methods a variant may override


def check(name: str, ascent_steps: Any, own: list[str]) -> None:
    """Raise ``ValueError`` unless ``ascent_steps`` is an int >= 1, and 1 for a variant that chooses its
    own perturbation (``own``: the methods of :data:`OWN_PERTURBATION` it overrides)."""
    if isinstance(ascent_steps, bool) or not isinstance(ascent_steps, int) or ascent_steps < 1:
        raise ValueError(f"{name}: ascent_steps must be an int >= 1, got {ascent_steps!r}")
    if ascent_steps > 1 and own:
        raise ValueError(f"{name}: ascent_steps > 1 is not supported by a variant that chooses its "
                         f"own perturbation ({', '.join(own)}); use ascent_steps=1")


def count(sam) -> None:
    """Count a later ascent, on the host before it runs (its compiled body never reads the count, so
    one graph serves every ascent of the k); ``RuntimeError`` when ``first_step`` is called once more
    than ``ascent_steps`` allows (nothing changed: the step is still pending). A failed ascent ends
    the step, and with it the count."""
    now = sam.step_state
    if now.ascents >= sam.ascent_steps:
        times = "twice" if now.ascents == 1 else f"{now.ascents + 1} times"
        raise RuntimeError(f"SAM.first_step() called {times} with ascent_steps={sam.ascent_steps}: call "
                           "second_step() (or restore()) first")
    now.ascents += 1


def keep_scratch(sam, params: list) -> None:
    """Create the later ascents' scratch buffers with the first ascent's backups, so a compiled later
    ascent finds the state it writes already there (one graph from its first call on)."""
    backups.get(sam.state, params, SCRATCH)


def ascend_again(sam) -> None:
    """A later ascent: w_i += (rho/k)·g(w_i)/‖g(w_i)‖ on the params the first ascent perturbed (w stays
    in their backups; :data:`SCRATCH` takes the copy ``perturb_`` writes). The caller restores w on error."""
    now = sam.step_state
    if sparse_grads.any_sparse(sam.param_groups):
        sparse_grads.refuse_multi_step(sam)
    held = {id(p) for p in now.perturbed}
    entries = [(g, p) for g, p in groups.with_grads(sam.param_groups) if id(p) in held]
    if not entries:
        return
    sq = groups.sq_norm(entries, sam.backend)
    ascent = Ascent(entries, sq, sam.loss_scale, subset=True, alias_keys=now.aliases, backup_key=SCRATCH)
    sam.amp.screen(sam, sam.distributed.ascent_sq_norm(sam, sq), "first_step")
    ascent.options = sam.perturbation_options(ascent.params, ascent.grads)
    ascent.options.update(sam.amp.perturb_args(sam, ascent.scale))
    ascent.buckets = groups.bucket(entries, bucket_key(sam))
    ascent.perturb(sam.state, sam.backend)
    sam.telemetry.on_ascent_again()
