"""Triton kernels behind the CUDA paths of the packkv ops, each beside its launcher."""
