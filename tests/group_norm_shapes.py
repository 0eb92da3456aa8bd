"""Shapes every GroupNorm implementation is tested on: (shape, num_groups) with 3 channels per group, 1 per
group, 1x1, odd H x W, 40 channels (no power-of-two block of 16 or more divides them), 1-D, 3-D and no spatial
dims (none are multiples of the kernels' block sizes)."""

SHAPES = [
    ((3, 96, 7, 5), 32),
    ((2, 32, 7, 5), 32),
    ((2, 64, 1, 1), 8),
    ((2, 64, 33, 17), 16),
    ((2, 40, 5, 3), 8),
    ((3, 48, 19), 6),
    ((2, 32, 3, 5, 7), 8),
    ((4, 64), 16),
]
