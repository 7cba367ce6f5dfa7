"""Ahead-of-time lowering for CUDA from this CPU host.

From jax 0.11 the Triton lowering asks for the GPU it compiles for and, with no GPU present, refuses unless the
abstract mesh in context names one ("No supported GPU devices found, please specify an abstract GPU device").
`for_gpu` gives it an H100, on the axes of the mesh the program runs on (a one-axis mesh when there is none).
"""

import contextlib

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")


@contextlib.contextmanager
def for_gpu(mesh=None):
    """Lower Triton kernels for an H100 inside this block (on a machine without a GPU)."""
    if jax.devices()[0].platform == "gpu":  # a real GPU: the lowering targets it
        yield
        return
    if getattr(mesh, "abstract_device", None) is not None:  # an abstract mesh that names its device already
        abstract = mesh
    elif mesh is None:
        abstract = AbstractMesh((1,), ("gpu",), axis_types=(AxisType.Auto,), abstract_device=H100)
    else:
        abstract = AbstractMesh(tuple(mesh.axis_sizes), tuple(mesh.axis_names), axis_types=tuple(mesh.axis_types),
                                abstract_device=H100)
    with jax.sharding.use_abstract_mesh(abstract):
        yield


def lower_text(jitted, *args, platform: str, mesh=None) -> str:
    """The StableHLO text of `jitted` at `args` lowered for `platform` ("cuda", "tpu" or "cpu")."""
    with for_gpu(mesh) if platform == "cuda" else contextlib.nullcontext():
        return jitted.trace(*args).lower(lowering_platforms=(platform,)).as_text()
