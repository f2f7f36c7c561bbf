"""Mesh construction and the parameter sharding rules, declared once.

Mesh axes: `data` (batch only), `fsdp` (batch and parameter storage), `tensor` (heads / ffn /
vocab). Linear weights are [in, out]: the `fsdp` axis shards the model dimension and `tensor`
the other one, Megatron style (column-parallel in, row-parallel out). A dimension that an axis does
not divide stays unsharded along it, so tiny test models run on any mesh.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixsd_jax.errors import MixsdError
from mixsd_jax.models.config import ModelConfig
from mixsd_jax.models.transformer import param_shapes

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical layout of every parameter; `None` = replicated along that dimension.
_LAYER_RULES = {
    "attn_norm": P(None, None),
    "mlp_norm": P(None, None),
    "post_attn_norm": P(None, None),
    "post_mlp_norm": P(None, None),
    "wq": P(None, "fsdp", "tensor"),
    "wk": P(None, "fsdp", "tensor"),
    "wv": P(None, "fsdp", "tensor"),
    "wo": P(None, "tensor", "fsdp"),
    "w_gate": P(None, "fsdp", "tensor"),
    "w_up": P(None, "fsdp", "tensor"),
    "w_down": P(None, "tensor", "fsdp"),
    "bq": P(None, "tensor"),
    "bk": P(None, "tensor"),
    "bv": P(None, "tensor"),
    "q_norm": P(None, None),
    "k_norm": P(None, None),
}
_TOP_RULES = {"embed": P("tensor", "fsdp"), "lm_head": P("fsdp", "tensor"), "final_norm": P(None)}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1 (= all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise MixsdError(f"mesh: axis sizes must be positive with at most one -1, got {sizes}")


def platform_of(mesh: Mesh | None) -> str:
    """The platform of a mesh's devices ("cpu", "gpu" or "tpu"); JAX's default one without a mesh."""
    return jax.default_backend() if mesh is None else mesh.devices.flat[0].platform


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise MixsdError(f"mesh: {len(devices)} devices are not divisible by fixed axes product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if -1 not in (cfg.data, cfg.fsdp, cfg.tensor) and math.prod(sizes) < len(devices):
        if jax.process_count() > 1:  # the first devices would leave whole processes out of every kernel
            raise MixsdError(
                f"mesh: data*fsdp*tensor = {math.prod(sizes)} but the {jax.process_count()} processes have "
                f"{len(devices)} devices; a multi-host mesh must use them all (set one axis to -1)"
            )
        devices = devices[: math.prod(sizes)]  # an explicit smaller mesh uses the first devices
    if math.prod(sizes) != len(devices):
        raise MixsdError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {len(devices)} devices")
    return Mesh(device_grid(sizes, devices), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def device_grid(sizes, devices) -> np.ndarray:
    """`devices` as a [data, fsdp, tensor] array laid on the physical interconnect.

    On a TPU slice `create_device_mesh` maps the axes onto the ICI torus (the innermost, `tensor`,
    on the closest chips; across slices `create_hybrid_device_mesh` puts the slices along `data`,
    the one axis that only all-reduces gradients over DCN). Each tensor group is then ordered as a
    chain of neighbouring chips, so its ring collectives hop one link at a time. Devices without
    a physical layout (CPU, a subset a torus cannot hold) keep their creation order, which on a
    multi-host run keeps each host's devices contiguous along `data`.
    """
    from jax.experimental import mesh_utils

    sizes = tuple(sizes)
    slices = sorted({getattr(d, "slice_index", 0) or 0 for d in devices})
    try:
        if len(slices) > 1 and sizes[0] % len(slices) == 0:
            grid = mesh_utils.create_hybrid_device_mesh((sizes[0] // len(slices), *sizes[1:]), (len(slices), 1, 1),
                                                        devices)
        elif devices[0].platform == "tpu":
            grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        else:
            grid = np.array(devices).reshape(sizes)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.array(devices).reshape(sizes)
    if getattr(devices[0], "coords", None) is not None:
        grid = np.array([_chain(list(group)) for group in grid.reshape(-1, sizes[-1])]).reshape(sizes)
    return grid


def _chain(group: list) -> list:
    """The group's devices in an order where each is one ICI hop from the next, when the order the
    library chose is not one already (a 2x2 block comes row by row: the 2nd and 3rd are diagonal)."""
    def hops(a, b):
        return sum(abs(x - y) for x, y in zip(a.coords, b.coords)) + (a.coords == b.coords)

    if all(hops(a, b) <= 1 for a, b in zip(group, group[1:])):
        return group
    # Boustrophedon over the group's chips: along x, turning back at each new y (and z).
    def key(d):
        x, y, *rest = d.coords
        return (*reversed(rest), y, x if (y + sum(rest)) % 2 == 0 else -x, getattr(d, "core_on_chip", 0))
    return sorted(group, key=key)


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop mesh axes that do not divide their dimension."""
    fitted = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = axis if isinstance(axis, tuple) else (axis,) if axis else ()
        size = math.prod(mesh.shape[a] for a in axes)
        fitted.append(axis if axes and dim % size == 0 else None)
    return P(*fitted)


def param_specs(cfg: ModelConfig, mesh: Mesh) -> dict:
    shapes = param_shapes(cfg)
    specs = {name: fit_spec(_TOP_RULES[name], shape, mesh) for name, shape in shapes.items() if name != "layers"}
    specs["layers"] = {name: fit_spec(_LAYER_RULES[name], shape, mesh) for name, shape in shapes["layers"].items()}
    return specs


def param_shardings(cfg: ModelConfig, mesh: Mesh | None) -> dict:
    """NamedSharding per parameter, or a tree of None without a mesh (default device placement)."""
    if mesh is None:
        return jax.tree.map(lambda _: None, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), param_specs(cfg, mesh), is_leaf=lambda x: isinstance(x, P)
    )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh | None) -> int:
    """How many ways the batch dimension is split (data x fsdp); 1 without a mesh."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def pad_rows(rows: int, mesh: Mesh | None) -> int:
    """`rows` rounded up so every batch shard gets whole rows (the extra rows are padding)."""
    shards = batch_shards(mesh)
    return -(-rows // shards) * shards


def put_batch(x, mesh: Mesh | None):
    """A host batch (leading dim = rows, which `pad_rows` made divisible) as a global array split
    over data x fsdp; every process passes the same whole host batch (the multihost convention)."""
    from mixsd_jax import multihost

    if mesh is None:
        return jax.numpy.asarray(x)
    return multihost.put_global(x, batch_sharding(mesh, np.ndim(x)))


def put_replicated(x, mesh: Mesh | None):
    from mixsd_jax import multihost

    if mesh is None:
        return jax.numpy.asarray(x)
    return multihost.put_global(x, replicated(mesh))
