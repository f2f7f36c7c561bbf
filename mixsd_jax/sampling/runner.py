"""Work items and completions; `generate`, plain decoding on the decode engine; and `Runner`, the fixed-batch path.

`Runner` runs a whole batch through kernel.decode until its slowest record stops. It is kept as the
reference the continuous-batching engine (sampling/engine.py) is checked and benchmarked against
(tests/fixtures/engine, `mixsd bench generate --workload longtail`); generation and evaluation use the engine.

Runner's host side: pad work into fixed shapes, run it, unpack per item.

A batch always has `batch_size` records (empty slots are filled with a one-token dummy and
discarded) and prompts are padded to a bucket length, so a run compiles a handful of kernels, not
one per batch. With a mesh, records are split over the `data` axis (and the parameters and KV
heads over `tensor`, by the model's sharding rules and the kernel's cache constraint).

Multi-process: every process runs the same host logic on the same work items and holds the whole
host batch; `multihost.put_global` builds the global inputs from it and `multihost.fetch` returns the
whole result to every process, so the queue, the verifier and the retries stay identical everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixsd_jax import multihost
from mixsd_jax.models.config import ModelConfig
from mixsd_jax.models.sharding import batch_sharding, pad_rows, replicated
from mixsd_jax.sampling import kernel
from mixsd_jax.sampling.strategies import Sampler

def bucket_length(n: int) -> int:
    """Prompt widths are rounded up to a few sizes, so a run compiles a handful of kernels."""
    step = 32 if n <= 512 else 256 if n <= 4096 else 1024
    return -(-n // step) * step


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One attempt: its prompt(s) (1 for plain decoding, [expert, naive] for mixing) and stable ids."""

    prompts: tuple[tuple[int, ...], ...]
    record_index: int
    gen_index: int = 0
    attempt: int = 0


@dataclasses.dataclass(frozen=True)
class Completion:
    tokens: list[int]  # generated ids, the stop token included (as the reference counts them)
    logprobs: list[float]
    naive: list[bool]
    finish_reason: str


class Runner:
    def __init__(
        self,
        params,
        cfg: ModelConfig,
        *,
        sampler: Sampler,
        sides: int,
        stop_ids: Sequence[int],
        max_new_tokens: int,
        max_model_len: int,
        batch_size: int,
        seed: int,
        dtype: str = "float32",
        mesh=None,
        naive_prob: float = 0.0,
    ):
        self.batch_size = pad_rows(batch_size, mesh)  # every batch shard gets whole records
        self.params = params
        self.mesh, self.seed, self.sides = mesh, seed, sides
        self.spec = kernel.KernelSpec(cfg, sampler, sides, max_new_tokens, max_model_len, dtype, mesh)
        self.stop_ids = np.asarray(sorted(set(stop_ids)) or [-1], np.int32)
        self.naive_prob = np.float32(naive_prob)
        if mesh is not None:  # replicated global arrays: valid inputs on a multi-process mesh too
            self.stop_ids = multihost.put_global(self.stop_ids, replicated(mesh))
            self.naive_prob = multihost.put_global(self.naive_prob, replicated(mesh))

    def run(self, items: Sequence[WorkItem]) -> list[Completion]:
        """Decode up to `batch_size` items in one kernel call."""
        assert 0 < len(items) <= self.batch_size
        slots = list(items) + [WorkItem(((0,),) * self.sides, record_index=-1)] * (self.batch_size - len(items))
        prompts = []
        for side in range(self.sides):
            side_rows = [item.prompts[side] for item in slots]
            tokens = np.zeros((len(side_rows), bucket_length(max(map(len, side_rows)))), np.int32)
            for i, r in enumerate(side_rows):
                tokens[i, : len(r)] = r
            prompts.append((tokens, np.array([len(r) for r in side_rows], np.int32)))
        keys = kernel.record_keys(
            self.seed,
            jnp.asarray([max(s.record_index, 0) for s in slots], jnp.uint32),
            jnp.asarray([s.gen_index for s in slots], jnp.uint32),
            jnp.asarray([s.attempt for s in slots], jnp.uint32),
        )
        live = np.arange(self.batch_size) < len(items)
        if self.mesh is not None:
            rows, flat = batch_sharding(self.mesh, 1), batch_sharding(self.mesh, 2)
            prompts = [(multihost.put_global(t, flat), multihost.put_global(n, rows)) for t, n in prompts]
            # Typed keys travel as their raw uint32 words, split over the batch like the records.
            keys = jax.random.wrap_key_data(multihost.put_global(jax.random.key_data(keys), flat))
            live = multihost.put_global(live, rows)
        out = kernel.decode(self.params, tuple(prompts), keys, live, self.naive_prob, self.stop_ids, spec=self.spec)
        out = multihost.fetch(out)
        completions = []
        for b in range(len(items)):
            n = int(out["lengths"][b])
            completions.append(
                Completion(
                    tokens=out["tokens"][b, :n].tolist(),
                    logprobs=out["logprobs"][b, :n].tolist(),
                    naive=out["naive"][b, :n].tolist(),
                    finish_reason=kernel.FINISH_NAMES[int(out["finish"][b])],
                )
            )
        return completions


def generate(
    params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int = 8,
    temperature: float = 0.0,
    topk: int = 64,
    seed: int = 0,
    max_model_len: int | None = None,
    dtype: str = "float32",
    mesh=None,
    progress=None,
) -> list[Completion]:
    """Plain decoding of many prompts (the evaluator's entry point); results in input order.

    Runs on the continuous-batching engine (sampling/engine.py): a finished prompt's slot takes the
    next one at once, and attention reads only up to the longest live row.
    """
    from mixsd_jax.sampling.engine import Engine

    engine = Engine(
        params,
        cfg,
        sampler=Sampler(temperature, topk),
        sides=1,
        stop_ids=stop_ids,
        max_new_tokens=max_new_tokens,
        # Not the prompts' own length limit: calls of the same size share one compiled kernel.
        max_model_len=max_model_len or cfg.max_position_embeddings,
        # On a CPU a decode step costs about in proportion to its rows: no more slots than prompts.
        # (With a mesh the Runner rounds this up to whole rows per batch shard.)
        batch_size=min(batch_size, len(prompts)),
        seed=seed,
        dtype=dtype,
        mesh=mesh,
    )
    # Similar lengths together: fewer prompt buckets per insert. Keys follow the input index.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    items = [WorkItem((tuple(prompts[i]),), i) for i in order]
    results: list[Completion | None] = [None] * len(prompts)

    def keep(item: WorkItem, completion: Completion):
        results[item.record_index] = completion
        if progress is not None:
            progress(1)
        return ()

    engine.run(items, keep)
    return results  # type: ignore[return-value]
