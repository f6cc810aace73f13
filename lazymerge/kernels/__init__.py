"""Compute backends: the same chunk operations, on torch (reference, CPU) and Triton (CUDA)."""
