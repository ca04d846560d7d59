"""sam_kernels: Sharpness-Aware Minimization and its efficient variants, with fused kernels.

>>> opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

``backends()`` tells which kernel backends (eager, cpp, cuda, triton) are available here and why
a missing one is missing; ``set_backend`` / ``SAM_KERNELS_BACKEND`` force one.
"""
from . import _extension  # noqa: F401  (loads _C when built: registers torch.ops.sam_kernels.*)
from . import ops
from .ops.dispatch import backends, get_backend, set_backend

from .optim import *  # noqa: F401,F403
from .optim import __all__ as _optim_all

__version__ = "0.1.0"
__all__ = ["ops", "backends", "set_backend", "get_backend", *_optim_all]
