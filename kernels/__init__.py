"""Triton kernels of rdm_fast (installed as ``rdm_fast.kernels``); submodules import triton."""
