"""The optimizer layer: one SAM core (``sam.py``) and the variants as presets of it."""
from .batchnorm import frozen_running_stats
from .descent import LookSAMReuse, Modifier, Renormalize
from .ema_ascent import FriendlySAM, VaSSO
from .esam import ESAM
from .momentum_sam import MomentumSAM
from .policy import AdaptivePolicy, PeriodicPolicy, Policy, ScheduledPolicy
from .sam import SAM
from .sparse import SparseSAM
from .variants import AELookSAM, AESAM, LookSAM, SSSAM, StableSAM

__all__ = [
    "SAM", "SSSAM", "StableSAM", "LookSAM", "AESAM", "AELookSAM",
    "Policy", "ScheduledPolicy", "AdaptivePolicy", "PeriodicPolicy", "Modifier", "Renormalize", "LookSAMReuse",
    "frozen_running_stats", "SparseSAM", "ESAM",
    "FriendlySAM", "VaSSO", "MomentumSAM",
]
