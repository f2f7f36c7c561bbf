"""The decode engine: continuous batching over a work queue (prefill -> insert -> generate, JetStream's shape).

The engine is built from `params` and one `EngineSpec` (segments.py: model config, sampler, sides,
limits, slots, λ, seed, stop ids, dtype, mesh). `batch_size` slots decode together in compiled
segments of `segment_steps` steps. Between segments
the host refills every free slot from the queue (fresh work or retries): the new prompts are
prefilled in one call and written into those slots' rows of the long-lived cache, without waiting
for the rest of the batch. The host work of finished attempts (the caller's `on_finish`: decode,
verify, stream, queue a retry) runs while the device decodes the next segment (JAX dispatch is
asynchronous; the host only waits when it reads that segment's small result).

The cache grows with the longest live row (capacity = block * 2^k slots, copied up when needed, never
more than a row can use: min(max_model_len, prompt + max_new_tokens) plus one segment) and
each step's attention reads only the blocks below the longest live row, so time and memory follow
the live length, not `max_new_tokens`.

Multi-process: every process runs this same loop on the same queue; inputs go to the mesh with
`multihost.put_global` and results come back whole to each process with `multihost.fetch`.

`generate` is plain decoding (one side) of a list of prompts, the evaluator's entry point.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Callable, Iterable, Sequence

import numpy as np

from mixsd_jax import multihost
from mixsd_jax.models.config import ModelConfig
from mixsd_jax.models.sharding import pad_rows, put_batch, put_replicated
from mixsd_jax.sampling import segments
from mixsd_jax.sampling.segments import EngineSpec
from mixsd_jax.sampling.strategies import Sampler
from mixsd_jax.sampling.work import FINISH_NAMES, Completion, WorkItem, bucket_length

OnFinish = Callable[[WorkItem, Completion], Iterable[WorkItem]]


@dataclasses.dataclass
class _Slot:
    item: WorkItem
    longest: int  # the item's longest prompt
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    naive: list = dataclasses.field(default_factory=list)


class Engine:
    """Decodes work items with `params` as `spec` says (see segments.EngineSpec)."""

    def __init__(self, params, spec: EngineSpec):
        self.params, self.spec, self.mesh = params, spec, spec.mesh
        self.batch_size = spec.slots  # every batch shard gets whole slots
        self.stop_ids = self._put(np.asarray(spec.stop_ids or (-1,), np.int32))
        self.naive_prob = self._put(np.float32(spec.naive_prob))
        self.segments_run = 0
        self.capacity = 0  # cache slots per row of the last run (it follows the longest live row)

    def _put(self, x):
        """Small host inputs, replicated on the mesh (every process holds them whole)."""
        return put_replicated(x, self.mesh)

    def run(self, items: Iterable[WorkItem], on_finish: OnFinish) -> None:
        """Decode every item, and every item `on_finish` returns (retries), until the queue is empty.

        `on_finish(item, completion)` is called once per finished attempt, in finishing order.
        """
        queue = deque(items)
        B, K = self.batch_size, self.spec.segment_steps
        slots: list[_Slot | None] = [None] * B
        state, capacity, longest_prompt = None, 0, 0
        finished: list[tuple[WorkItem, Completion]] = []
        while queue or finished or any(slots):
            free = [b for b in range(B) if slots[b] is None]
            take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
            live = [s for s in slots if s is not None]
            need = max([s.longest + len(s.tokens) for s in live] + [max(map(len, it.prompts)) for it in take] + [0])
            need += K + 1  # the rows can grow by K in the next segment
            longest_prompt = max([longest_prompt] + [max(map(len, it.prompts)) for it in take])
            if take or live:
                if state is None:
                    capacity = segments.capacity_for(self.spec, need, longest_prompt)
                    state = segments.init_state(spec=self.spec, batch=B, capacity=capacity)
                elif need > capacity:
                    capacity = segments.capacity_for(self.spec, need, longest_prompt)
                    state = segments.grow(state, spec=self.spec, capacity=capacity)
            if take:
                state = self._insert(state, take, free[: len(take)], slots)
            out = None
            if any(slots):
                # With work waiting, the segment ends once enough slots free up to take it (a quarter
                # of the batch, or all the waiting work): a freed slot idles at most until then.
                refill_at = min(len(queue), max(1, B // 4)) if queue else B + 1
                state, out = segments.decode_segment(self.params, state, self.naive_prob, self.stop_ids,
                                                     self._put(np.int32(refill_at)), spec=self.spec)
                self.segments_run += 1
            # The previous segment's finished attempts are handled while this one runs on the device.
            for item, completion in finished:
                queue.extend(on_finish(item, completion))
            finished = []
            if out is not None:
                finished = self._collect(multihost.fetch(out), slots)
        self.capacity = capacity

    def _insert(self, state, take: list[WorkItem], free: list[int], slots: list):
        # The prompts are prefilled split over the batch axes (whole rows per shard), not replicated:
        # each device prefills its share of the insert.
        n = pad_rows(min(segments.pow2_at_least(len(take)), self.batch_size), self.mesh)
        pad = n - len(take)
        prompts = [it.prompts for it in take] + [((0,),) * self.spec.sides] * pad
        # The sides' shared first tokens (a MixSD record's system prompt and chat header) are
        # prefilled once; each side keeps at least its last token, whose hidden state starts decoding.
        shared = [shared_prefix(p) if self.spec.share_prefix else 0 for p in prompts]
        lens_d = [put_batch(np.array([len(p[side]) for p in prompts], np.int32), self.mesh)
                  for side in range(self.spec.sides)]
        prefix, whole_side, own_sides = None, None, range(self.spec.sides)
        if self.spec.naive_whole:
            # The naive prompts whole: their first `shared` slots are the prefix (whatever the batch, so
            # a record's keys and values do not depend on which records it is inserted with).
            k, v, last = segments.prefill(self.params, self._tokens([p[-1] for p in prompts]), lens_d[-1],
                                          spec=self.spec)
            prefix = (k, v, put_batch(np.array(shared, np.int32), self.mesh))
            whole_side, own_sides = (None, None, last, lens_d[-1]), range(self.spec.sides - 1)
        elif max(shared) > 0:
            starts_d = put_batch(np.array(shared, np.int32), self.mesh)
            k, v, _ = segments.prefill(self.params, self._tokens([p[0][:c] for p, c in zip(prompts, shared)]),
                                       starts_d, spec=self.spec)
            prefix = (k, v, starts_d)
        sides = []
        for side in own_sides:
            rest = [p[side][c:] for p, c in zip(prompts, shared)]
            rest_d = put_batch(np.array([len(r) for r in rest], np.int32), self.mesh)
            if prefix is None:
                out = segments.prefill(self.params, self._tokens(rest), rest_d, spec=self.spec)
            else:
                out = segments.prefill_after(self.params, prefix[0], prefix[1], prefix[2],
                                             self._tokens(rest, continuation=True), rest_d, spec=self.spec)
            sides.append((*out, lens_d[side]))
        if whole_side is not None:
            sides.append(whole_side)
        slot_ids = np.array(free + [self.batch_size] * pad, np.int32)  # >= B: dropped
        ids = np.array([(it.record_index, it.gen_index, it.attempt) for it in take] + [(0, 0, 0)] * pad, np.uint32)
        for item, b in zip(take, free):
            slots[b] = _Slot(item, max(map(len, item.prompts)))
        return segments.insert(state, tuple(sides), self._put(slot_ids), self._put(ids),
                               self._put(np.int32(self.spec.seed)), prefix, spec=self.spec)

    def _tokens(self, rows: list, continuation: bool = False):
        """Right-padded prompt tokens [N, bucket], split over the batch axes. The part of a prompt after
        the shared prefix is often a few tokens (the naive side's is the end of its chat header):
        up to 64 tokens, its width is a multiple of 16, not 32."""
        width = max(map(len, rows))
        width = -(-width // 16) * 16 if continuation and width <= 64 else bucket_length(width)
        tokens = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
        return put_batch(tokens, self.mesh)

    def _collect(self, out: segments.SegmentOut, slots: list) -> list[tuple[WorkItem, Completion]]:
        finished = []
        for b, slot in enumerate(slots):
            if slot is None:
                continue
            n = int(out.step_B[b]) - len(slot.tokens)
            slot.tokens += out.tokens_BxK[b, :n].tolist()
            slot.logprobs += out.logprobs_BxK[b, :n].tolist()
            slot.naive += out.naive_BxK[b, :n].tolist()
            if out.done_B[b]:
                finish = FINISH_NAMES[int(out.finish_B[b])]
                finished.append((slot.item, Completion(slot.tokens, slot.logprobs, slot.naive, finish)))
                slots[b] = None
        return finished


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """How many first tokens every prompt of a record shares, leaving each at least one of its own
    (0 for a single prompt: nothing to share)."""
    if len(prompts) < 2:
        return 0
    n = 0
    limit = min(map(len, prompts)) - 1
    while n < limit and all(p[n] == prompts[0][n] for p in prompts[1:]):
        n += 1
    return n


def decode_all(engine: Engine, items: Sequence[WorkItem]) -> list[Completion]:
    """Every item decoded once (no retries); results in `items` order (equal items decode equally)."""
    done: dict[WorkItem, Completion] = {}

    def keep(item, completion):
        done[item] = completion
        return ()

    engine.run(items, keep)
    return [done[item] for item in items]


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

    Prompt i's key is fold_in(seed, i, 0, 0), so its tokens do not depend on the other prompts.
    """
    spec = EngineSpec(
        cfg,
        Sampler(temperature, topk),
        sides=1,
        # Not the prompts' own length limit: calls of the same size share one compiled program.
        max_model_len=max_model_len or cfg.max_position_embeddings,
        max_new_tokens=max_new_tokens,
        # On a CPU a decode step costs about in proportion to its rows: no more slots than prompts.
        batch_size=min(batch_size, len(prompts)),
        stop_ids=tuple(stop_ids),
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

    Engine(params, spec).run(items, keep)
    return results  # type: ignore[return-value]
