"""Pallas kernels for m1-jax (each kernel beside its pure-JAX reference)."""
