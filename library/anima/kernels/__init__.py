"""Triton kernels for the Anima DiT's CUDA training path, each with its torch fallback in the model."""
