"""Causal GQA softmax (flash) attention with segments: reference, blockwise pure JAX, Pallas GPU and TPU."""

from pallas_kernels.softmax_attention.api import IMPLS, softmax_attention

__all__ = ["IMPLS", "softmax_attention"]
