"""Stateless forward/backward pairs.

Every op follows one convention (see ``shared/API.md`` and ``docs/ops/``)::

    out, cache = ops.<name>_forward(inputs..., options...)
    grads = ops.<name>_backward(dout, cache)    # a tuple, one entry per floating input

Backward never modifies ``dout`` or the cache.
"""

from ._common import Cache  # noqa: F401
