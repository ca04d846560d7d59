"""The optimizer layer: one SAM core (``sam.py``) and the variants as presets of it."""
from .descent import LookSAMReuse, Modifier, Renormalize
from .policy import AdaptivePolicy, PeriodicPolicy, Policy, ScheduledPolicy
from .sam import SAM
from .variants import AELookSAM, AESAM, LookSAM, SSSAM, StableSAM

__all__ = [
    "SAM", "SSSAM", "StableSAM", "LookSAM", "AESAM", "AELookSAM",
    "Policy", "ScheduledPolicy", "AdaptivePolicy", "PeriodicPolicy", "Modifier", "Renormalize", "LookSAMReuse",
]
from .batchnorm import frozen_running_stats  # noqa: E402  (BatchNorm stats once per SAM step)
__all__.append("frozen_running_stats")

# Sparse SAM and ESAM live in their own modules; export them when present.
try:
    from .sparse import SparseSAM  # noqa: F401

    __all__.append("SparseSAM")
except ModuleNotFoundError as exc:
    if exc.name != f"{__name__}.sparse":
        raise
try:
    from .esam import ESAM  # noqa: F401

    __all__.append("ESAM")
except ModuleNotFoundError as exc:
    if exc.name != f"{__name__}.esam":
        raise
