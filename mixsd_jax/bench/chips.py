"""Per-chip constants of the TPU generations a plan is checked against, from Google's public pages.

One table, one source per row. `hbm_bytes` is what the runtime gives one JAX device (one chip; on a
v4 the topology lists each of a chip's two TensorCores as a device, so its row is per core);
`peak_flops` the bf16 matrix peak; `hbm_bytes_per_s` the HBM bandwidth. Figures derived from them
(`roofline_s`, `*_est`) are estimates from XLA:TPU's cost model and these peaks, not measurements.
"""

from __future__ import annotations

import dataclasses

from mixsd_jax.errors import MixsdError

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    device_kind: str  # jax Device.device_kind
    hbm_bytes: int
    hbm_bytes_per_s: float
    peak_flops: float  # bf16, per device
    source: str


CHIPS = {
    # v4: 32 GiB HBM2 at 1,200 GB/s and 275 bf16 TFLOP/s per chip; JAX shows its 2 TensorCores as 2 devices.
    "v4": Chip("v4", "TPU v4", 16 * GIB, 600e9, 137.5e12, "https://cloud.google.com/tpu/docs/v4"),
    # v5e: 16 GiB HBM2 at 819 GB/s, 197 bf16 TFLOP/s per chip (one TensorCore).
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GIB, 819e9, 197e12, "https://cloud.google.com/tpu/docs/v5e"),
    # v5p: 95 GiB HBM2e at 2,765 GB/s, 459 bf16 TFLOP/s per chip (megacore: one device).
    "v5p": Chip("v5p", "TPU v5", 95 * GIB, 2765e9, 459e12, "https://cloud.google.com/tpu/docs/v5p"),
    # v6e (Trillium): 32 GiB HBM at 1,640 GB/s, 918 bf16 TFLOP/s per chip.
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GIB, 1640e9, 918e12, "https://cloud.google.com/tpu/docs/v6e"),
}


def chip_for(topology: str) -> Chip:
    """The chip of a topology name such as `v5e:4x8`."""
    generation = topology.split(":", 1)[0]
    if generation not in CHIPS:
        raise MixsdError(f"--topology {topology!r}: no chip constants for {generation!r} "
                         f"(known: {', '.join(CHIPS)})")
    return CHIPS[generation]
