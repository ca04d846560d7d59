"""Deprecated name of :mod:`sam_kernels.optim.telemetry` (the telemetry and cost counters)."""
import warnings

from .telemetry import *  # noqa: F401,F403
from .telemetry import FOLD, KEYS, VALUES, every  # noqa: F401  (the names the docs used)

warnings.warn("sam_kernels.optim.stats is now sam_kernels.optim.telemetry", DeprecationWarning, stacklevel=2)
