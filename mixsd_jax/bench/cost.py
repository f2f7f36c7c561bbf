"""Per-device memory and cost of one compiled kernel, and the roofline time a chip gives it.

`memory_analysis()` is exact for the compiled program. `cost_analysis()` is XLA's cost model and
counts a loop body once, whatever its trip count: the layer scan, the micro-batch scan, the decode
segment's step loop and the attention's block loop all read as one iteration. So the raw `flops`
/ `bytes_accessed` of a kernel with loops undercount it. bench.estimates recovers the real count
from the same kernel compiled with few layers and scaled to L; the result is named `*_est` (an
estimate from XLA:TPU's cost model, not a measurement).
"""

from __future__ import annotations

import re
import time

GIB = 1 << 30


def compile_lines(lowered: dict, *, chip=None, hbm_bytes: int) -> dict:
    """{kernel: line} for every lowered kernel, compiled in turn."""
    return {name: measure(low, chip=chip, hbm_bytes=hbm_bytes) for name, low in lowered.items()}


def measure(lowered, *, chip=None, hbm_bytes: int) -> dict:
    started = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as exc:  # XLA:TPU refuses a program bigger than the chip: that is the answer, not a crash
        over = over_memory(str(exc))
        if over is None:
            raise
        return {"peak_bytes": over, "peak_gib": round(over / GIB, 3), "peak_is_lower_bound": True,
                "hbm_bytes": hbm_bytes, "fits": False, "flops": None, "bytes_accessed": None, "roofline_s": None,
                "compile_s": round(time.perf_counter() - started, 1), "error": str(exc).splitlines()[0][:300]}
    compile_s = time.perf_counter() - started
    mem = compiled.memory_analysis()
    arg, out, alias, temp = (int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
    peak = arg + out - alias + temp
    flops, accessed = raw_cost(compiled)
    line = {
        "argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
        "peak_bytes": peak, "peak_gib": round(peak / GIB, 3), "hbm_bytes": hbm_bytes, "fits": peak <= hbm_bytes,
        "flops": flops, "bytes_accessed": accessed,
        "roofline_s": roofline(chip, flops, accessed),
        "compile_s": round(compile_s, 1),
    }
    return line


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?)B?\b")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def over_memory(message: str) -> int | None:
    """The bytes XLA says a program needs when it refuses to compile it for lack of device memory
    ("RESOURCE_EXHAUSTED: ... required for HLO temporaries (17.50G) exceeds available HBM (15.75G)"):
    the first size named, a lower bound of the program's peak; None for any other error."""
    if "RESOURCE_EXHAUSTED" not in message or "memory" not in message.lower():
        return None
    found = _SIZE.search(message)
    return int(float(found.group(1)) * _UNITS[found.group(2)[0]]) if found else 0


def raw_cost(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def roofline(chip, flops: float, accessed: float) -> float | None:
    """Per-device time bound: the slower of the matrix units at peak and HBM at full bandwidth."""
    if chip is None:
        return None
    return max(flops / chip.peak_flops, accessed / chip.hbm_bytes_per_s)
