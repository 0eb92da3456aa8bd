"""Fused operators with compiled (C++/CUDA/Triton) fast paths and a plain-PyTorch reference.

Importing this package loads nothing compiled; extensions load on first use. See
:mod:`rdm_fast.ops._dispatch` for the ``RDM_FAST_OPS`` modes.
"""

from __future__ import annotations

from . import _extension
from ._dispatch import FastPathUnavailable, get_mode, set_mode, use_mode
from .attention import attention, attention_reference
from .conv import MAX_THIN_CHANNELS, conv3x3, conv3x3_reference
from .cross_attention import cross_attention, cross_attention_reference
from .glue import (add_bias, add_bias_reference, add_layer_norm, add_layer_norm_reference, ddim_guided_step, geglu,
                   geglu_reference, layer_norm, layer_norm_reference, plms_guided_step)
from .group_norm import _triton_unavailable, group_norm, group_norm_reference


def available_backends() -> dict[str, bool]:
    """Which fast backends are loaded in this process (loads the extensions and imports triton).

    ``cuda-ext`` / ``triton`` being True does not imply a GPU is present; they are only used for CUDA tensors.
    """
    return {
        "cpu-ext": _extension.cpu_loaded(),
        "cuda-ext": _extension.cuda_loaded(),
        "triton": _triton_unavailable() is None,
    }


__all__ = ["MAX_THIN_CHANNELS", "FastPathUnavailable",
           "add_bias", "add_bias_reference", "add_layer_norm", "add_layer_norm_reference",
           "attention", "attention_reference", "available_backends", "conv3x3", "conv3x3_reference",
           "cross_attention", "cross_attention_reference", "ddim_guided_step", "geglu", "geglu_reference", "get_mode",
           "group_norm", "group_norm_reference", "layer_norm", "layer_norm_reference", "plms_guided_step",
           "set_mode", "use_mode"]
