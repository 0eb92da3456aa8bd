"""Row views of tensors, shared by the model and the Triton kernels' wrappers (no triton import here).

Channels-last feature maps are (B*H*W, C) rows of channels; a channel slice of a wider map is the same rows at
a larger row stride. The kernels and the vendor GEMMs read such rows in place.
"""

from __future__ import annotations

from torch import Tensor


def row_view(t: Tensor, width: int) -> Tensor | None:
    """``t`` as a (rows, width) view with unit column stride (writes go through), or None where none exists."""
    if t.stride(-1) != 1 and width != 1:
        return None
    try:
        return t.view(-1, width)
    except RuntimeError:  # the leading dims do not merge into one stride
        return None


def copy_into_blocks(src: Tensor, out: Tensor) -> Tensor:
    """``src`` into each block of ``src.shape[0]`` leading rows of ``out`` (shaped like src, or with k times its
    rows: the two halves of a guided batch); returns ``out``."""
    if src.shape[0]:
        out.unflatten(0, (-1, src.shape[0])).copy_(src)
    return out


def as_rows(t: Tensor, width: int) -> Tensor:
    """``t`` as (rows, width) with unit column stride: :func:`row_view`, else a contiguous copy."""
    view = row_view(t, width)
    return view if view is not None else t.reshape(-1, width).contiguous()


def nhwc_row_stride(x: Tensor) -> int | None:
    """The pixel stride of a (B, C, H, W) map stored as pixel rows of C unit-strided channels at one row stride
    (channels_last, or a channel slice of a wider channels_last map), else None. Strides of size-1 dims do not
    count, as in PyTorch's own layout checks."""
    if x.dim() != 4:
        return None
    b, c, h, w = x.shape
    sb, sc, sh, sw = x.stride()
    row = sw if w > 1 else sh if h > 1 else sb if b > 1 else c
    rows_ok = (w == 1 or sw == row) and (h == 1 or sh == w * row) and (b == 1 or sb == h * w * row)
    return row if rows_ok and (c == 1 or sc == 1) and row >= c else None
