"""Weights from other libraries' namings into minivit's (timm's names).

``from_hf_vit`` accepts both Hugging Face namings (hub checkpoints and transformers 5 in memory)
and timm dicts (validated, passed through); ``resample_abs_pos_embed`` resizes a position
embedding for another image size as timm does.
"""

from .vilt import from_hf_vilt, infer_vilt_config, is_hf_vilt  # noqa: F401
from .vit import (  # noqa: F401
    check_timm_vit,
    default_num_heads,
    detect_vit_naming,
    from_hf_vit,
    infer_vit_config,
    resample_abs_pos_embed,
    to_timm_vit,
)
