"""Triton kernels for the Anima DiT's elementwise hot spots, bit-equal to the torch path they replace."""
