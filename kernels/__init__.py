"""Attention and KV-compression kernels: Triton kernels beside their torch reference twins."""
