"""`mixsd bench data`: records per second of the training batch stream over a JSONL file or TFDS dir."""

from __future__ import annotations

import time


def bench_data(source_path: str, batch_size: int = 16, steps: int = 200, seed: int = 0) -> dict:
    import grain  # noqa: F401  (imported before the clock starts)

    from mixsd_jax.data.grain_source import batch_iterator, record_source

    source = record_source(source_path)
    start = time.perf_counter()
    records = 0
    for step, batch in enumerate(batch_iterator(source, batch_size, seed)):
        if step == steps:
            break
        records += len(batch)
    seconds = time.perf_counter() - start
    return {"bench": "data", "source": str(source_path), "records": records,
            "seconds": round(seconds, 4), "records_per_s": round(records / max(seconds, 1e-9), 1)}
