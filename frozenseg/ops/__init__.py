"""Multi-scale deformable attention: one function (a registered op), one module, four back ends."""

from frozenseg.ops.fallback import ms_deform_attn_fallback
from frozenseg.ops.functional import (
    choose_backend,
    ms_deform_attn,
    ms_deform_attn_cpu,
    ms_deform_attn_cuda,
    ms_deform_attn_triton,
)
from frozenseg.ops.modules import MSDeformAttn

__all__ = [
    "MSDeformAttn", "choose_backend", "ms_deform_attn", "ms_deform_attn_cpu",
    "ms_deform_attn_cuda", "ms_deform_attn_fallback", "ms_deform_attn_triton",
]
