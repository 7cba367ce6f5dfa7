"""Grouped matmul (the MoE's experts over expert-sorted rows): reference, CPU paths, Pallas GPU and TPU kernels."""

from pallas_kernels.grouped_matmul.api import IMPLS, grouped_matmul

__all__ = ["IMPLS", "grouped_matmul"]
