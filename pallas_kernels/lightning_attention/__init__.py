"""Lightning attention (linear attention with per-head exponential decay): reference, chunked JAX, Pallas."""

from pallas_kernels.lightning_attention.api import lightning_attention
from pallas_kernels.lightning_attention.api import lightning_attention_step

__all__ = ["lightning_attention", "lightning_attention_step"]
