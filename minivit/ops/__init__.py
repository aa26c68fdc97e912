"""Stateless forward/backward pairs.

Every op follows one convention (see ``shared/API.md`` and ``docs/ops/``)::

    out, cache = ops.<name>_forward(inputs..., options...)
    grads = ops.<name>_backward(dout, cache)    # a tuple, one entry per floating input

``dout`` has the forward output's backend, shape and dtype, exactly (``_common.check_dout``:
anything else raises before any work). Backward never modifies ``dout`` or the cache. Under
``no_grad()`` (inference) an op may skip work that only backward needs; such a cache is not
valid for backward.
"""

from ._common import Cache, grad_enabled, no_grad, set_grad_enabled  # noqa: F401
from .activations import (  # noqa: F401
    bias_gelu_forward,
    gelu_backward,
    gelu_forward,
    tanh_backward,
    tanh_forward,
)
from .attention import attention_backward, attention_forward  # noqa: F401
from .conv import *  # noqa: F401,F403
from .dropout import dropout_backward, dropout_forward  # noqa: F401
from .embedding import embedding_backward, embedding_forward  # noqa: F401
from .layernorm import layernorm_backward, layernorm_forward  # noqa: F401
from .linear import (  # noqa: F401
    linear_backward,
    linear_forward,
    linear_gelu_backward,
    linear_gelu_forward,
)
from .loss import cross_entropy_backward, cross_entropy_forward  # noqa: F401
from .patch import patch_embed_backward, patch_embed_forward  # noqa: F401
from .sinkhorn import *  # noqa: F401,F403
from .softmax import softmax_backward, softmax_forward  # noqa: F401
