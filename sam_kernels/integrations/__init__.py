"""Integrations with training frameworks, one module per framework; each imports its framework and
is installed as an extra (``pip install sam_kernels[lightning]``, ``[transformers]``, ``[accelerate]``).
This package imports none of them: ``import sam_kernels.integrations.lightning`` does.

- :mod:`.lightning`: precision plugins that take SAM steps under automatic optimization.
- :mod:`.transformers`: a ``transformers.Trainer`` subclass whose training step is a SAM step.
- :mod:`.accelerate`: helpers of the documented ``accelerate`` loop.
"""
