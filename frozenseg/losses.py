"""Point-sampled mask losses, shared by the mask head and Mask DINO.

PointRend's recipe (Mask2Former's too): the loss looks at a few thousand points per mask
instead of every pixel, chosen where the prediction is uncertain plus uniform ones.

Point convention (PointRend, detectron2's ``point_sample``): a point is (x, y)
normalised over a map, [0, 1] x [0, 1] spanning the whole map, so cell (i, j) of an
H x W map has its centre at ((j + 0.5) / W, (i + 0.5) / H); values between centres are
bilinear (grid_sample, align_corners=False), neighbours off the map read zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``maps`` at normalised points (module docstring convention).

    maps: (N, C, H, W) float; coords: (N, P, 2) (x, y) in [0, 1]. Returns (N, C, P).
    Differentiable in maps and coords.
    """
    grid = (2 * coords.to(maps.dtype) - 1)[:, :, None, :]
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[..., 0]


def uniform_points(n: int, p: int, generator: torch.Generator | None,
                    like: torch.Tensor) -> torch.Tensor:
    # Drawn in float32 on the generator's device, so a seed gives the same points
    # whatever the dtype or device of the masks.
    device = generator.device if generator is not None else like.device
    coords = torch.rand(n, p, 2, generator=generator, device=device)
    return coords.to(device=like.device, dtype=like.dtype)


def uncertain_point_coords(mask_logits: torch.Tensor, num_points: int, *,
                           oversample: float = 3.0, importance: float = 0.75,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """PointRend's training points: uncertain points plus uniform ones (paper sec. 3.5).

    mask_logits: (N, 1, H, W). Draws k*P uniform candidates (k = oversample, P =
    num_points; the first random draw, ``torch.rand((N, k*P, 2))``), keeps the
    int(beta*P) with the smallest |logit| (beta = importance), then adds the other
    points fresh and uniform. Returns (N, P, 2) (x, y) in [0, 1], kept points first.
    No gradient: the points only choose where the loss looks.
    """
    n = mask_logits.shape[0]
    candidates = uniform_points(n, int(num_points * oversample), generator, mask_logits)
    num_uncertain = int(importance * num_points)
    with torch.no_grad():
        uncertainty = -point_sample(mask_logits.detach(), candidates)[:, 0].abs()
    top = uncertainty.topk(num_uncertain, dim=1).indices
    kept = candidates.gather(1, top[..., None].expand(-1, -1, 2))
    fresh = uniform_points(n, num_points - num_uncertain, generator, mask_logits)
    return torch.cat([kept, fresh], dim=1)


def sample_bitmaps(masks: torch.Tensor, index: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of bool masks at image points, without a float copy of the masks.

    masks: (M, H, W) bool; index: (N,) long into M; points: (N, P, 2) (x, y) continuous
    pixels (pixel centres at k + 0.5). Equals point_sample(masks[index].float()) at
    points / (W, H). Returns (N, P) in points' dtype, zero off the image.
    """
    height, width = masks.shape[-2:]
    px, py = points[..., 0] - 0.5, points[..., 1] - 0.5
    x0, y0 = px.floor(), py.floor()

    def pixel(dy: int, dx: int) -> torch.Tensor:
        xi, yi = (x0 + dx).long(), (y0 + dy).long()
        inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        value = masks[index[:, None], yi.clamp(0, height - 1), xi.clamp(0, width - 1)]
        return (value & inside).to(points.dtype)

    # lerp(a, a, t) == a exactly, so targets are exactly 0 or 1 away from mask edges.
    fx, fy = px - x0, py - y0
    top = torch.lerp(pixel(0, 0), pixel(0, 1), fx)
    bottom = torch.lerp(pixel(1, 0), pixel(1, 1), fx)
    return torch.lerp(top, bottom, fy)


def mask_loss(point_logits: torch.Tensor, point_targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """BCE (mean over points) and dice (per mask over points, +1 smoothing), each a mean
    over masks (Mask2Former's ``sigmoid_ce_loss`` and ``dice_loss`` on points).

    point_logits, point_targets: (N, P), N >= 1, targets in [0, 1].
    Returns {"loss_mask_bce", "loss_mask_dice"}, scalars.
    """
    bce = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none")
    probs = point_logits.sigmoid()
    overlap = 2 * (probs * point_targets).sum(1)
    dice = 1 - (overlap + 1) / (probs.sum(1) + point_targets.sum(1) + 1)
    return {"loss_mask_bce": bce.mean(1).mean(), "loss_mask_dice": dice.mean()}
