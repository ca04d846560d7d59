"""The optimizer layer: one SAM core (``sam.py``) and the variants as presets of it."""
from .batchnorm import frozen_running_stats
from .bsam import BSAM
from .descent import LookSAMReuse, Modifier, Renormalize
from .esam import ESAM
from .policy import AdaptivePolicy, LatePhasePolicy, PeriodicPolicy, Policy, ScheduledPolicy
from .sam_on import sam_on_param_groups
from .sam import SAM
from .sparse import SparseSAM
from .variants import AELookSAM, AESAM, LookSAM, SSSAM, StableSAM
from .variants import GSAM, WSAM
from .centralize import CentralizeAscent
from .mixing import SurrogateGap, WeightedSharpness
from .rho_schedule import ProportionalRho

__all__ = [
    "SAM", "SSSAM", "StableSAM", "LookSAM", "AESAM", "AELookSAM",
    "Policy", "ScheduledPolicy", "AdaptivePolicy", "PeriodicPolicy", "Modifier", "Renormalize", "LookSAMReuse",
    "frozen_running_stats", "SparseSAM", "ESAM",
    "LatePhasePolicy", "sam_on_param_groups", "BSAM",
    "GSAM", "WSAM", "ProportionalRho", "CentralizeAscent", "SurrogateGap", "WeightedSharpness",
]
