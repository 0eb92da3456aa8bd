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


def as_rows(t: Tensor, width: int) -> Tensor:
    """``t`` as (rows, width) with unit column stride: :func:`row_view`, else a contiguous copy."""
    view = row_view(t, width)
    return view if view is not None else t.reshape(-1, width).contiguous()
