"""Deformable attention's sampling locations: rows of L * P * 2 values against (x, y) pairs.

``MSDeformAttn.sampling_locations`` divides each point's pixel offset by its level's
(W, H) and adds the reference point. Broadcast over (x, y) pairs, the innermost loop is
two values long; over rows of L * P * 2 values (what it does) it is 32 long for 4 levels
and 4 points. The values are the same to the bit; this checks that and times both,
forward and forward + backward, at the demo head's image-encoder size (4 images of about
2,750 tokens, 4 heads, 4 levels, 4 points), median of ``--repeats``.

    python -m benchmarks.sampling_locations
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import cpu_name, table
from frozenseg.ops.modules import MSDeformAttn

SHAPES = [(46, 40), (23, 20), (12, 10), (6, 5)]


def by_pairs(reference: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The plain broadcast over (x, y) pairs: the reference formula."""
    normalizer = torch.tensor(SHAPES, dtype=offsets.dtype).flip(-1)
    return reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2750)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    module = MSDeformAttn(d_model=64, n_levels=4, n_heads=4, n_points=4)
    g = torch.Generator().manual_seed(0)
    offsets = torch.randn(4, args.queries, 4, 4, 4, 2, generator=g, requires_grad=True)
    reference = torch.rand(4, args.queries, 4, 2, generator=g)
    rows_fn = lambda: module.sampling_locations(reference, offsets, SHAPES)  # noqa: E731
    pairs_fn = lambda: by_pairs(reference, offsets)  # noqa: E731
    assert torch.equal(rows_fn(), pairs_fn()), "the two layouts must give the same bits"
    result = []
    for name, fn in (("pairs", pairs_fn), ("rows", rows_fn)):
        forward = median_ms(lambda fn=fn: fn().detach(), args.repeats)
        both = median_ms(lambda fn=fn: fn().square().sum().backward(), args.repeats)
        result.append([name, f"{forward:.2f}", f"{both:.2f}"])
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"offsets {tuple(offsets.shape)}; bitwise equal: yes")
    print(table(["broadcast", "forward ms", "forward + backward ms"], result))


if __name__ == "__main__":
    main()
