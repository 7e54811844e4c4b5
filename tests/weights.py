"""Random weights that expose conversion mistakes."""

from __future__ import annotations

import torch


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its init (zero heads, unit norms) so no mix-up can hide.

    Frozen batch norms keep their statistics and affine terms as buffers: those move too.
    Returns the model in eval mode.
    """
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.02)
    for key, b in model.named_buffers():
        if key.endswith("running_var"):
            b.copy_(torch.rand(b.shape, generator=g) + 0.5)
        elif key.endswith(("running_mean", "weight", "bias")):
            b.add_(torch.randn(b.shape, generator=g) * 0.1)
    return model.eval()
