"""The decode engine's settings, its device state and its compiled pieces: prefill, insert into
slots, decode a segment of K steps, grow the cache.

The state (`DecodeState`) holds B slots and R = B * sides rows (row b * sides + side; side 0 =
expert or the only prompt, side 1 = naive); each side's keys and values are arrays of their own
(models/decode.py says why). The state and the segment's output are registered
dataclasses (`jax.tree_util.register_dataclass`), not `flax.struct.dataclass`: a standard
dataclass with one decorator does the job, and the project does not depend on Flax. None of their
fields is static, so every field is a leaf.

The step rule (`_draw`): step t of an attempt draws from fold_in(attempt key, t), split into the
side pick (0) and the token draw (1); the naive row is picked with probability λ; the LM head runs
on the chosen row only; the token extends every row of the record. Slot numbers and neighbours
never enter a row's arithmetic, so an attempt's tokens are the same whichever slot, segment, batch
size or device count it runs with.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixsd_jax.errors import MixsdError
from mixsd_jax.models import transformer
from mixsd_jax.models.config import ModelConfig
from mixsd_jax.models.decode import decode_step, stored
from mixsd_jax.models.matmul import to_words
from mixsd_jax.models.sharding import BATCH_AXES, fit_spec, pad_rows, platform_of
from mixsd_jax.sampling.strategies import Sampler
from mixsd_jax.sampling.work import EXPERT, MAX_MODEL_LEN, MAX_NEW_TOKENS, NAIVE, RUNNING, STOP


def default_block(dtype="float32", mesh: Mesh | None = None) -> int:
    """Cache slots per attention block: an accelerator pays per loop iteration (kernel launches), so
    fewer, bigger blocks; a CPU pays for every slot it reads, so blocks closer to the live length:
    128 in f32, 16 in bf16, where XLA:CPU copies each block it reads out of the cache. bf16 reads its
    live blocks at once (`EngineSpec.one_read_attention`), so the block is only the read's
    granularity: 16 took 0.96x the MixSD job's time of 32 and 0.97x plain decoding's (interleaved in
    one idle process, the same tokens), and 8 no less than 16 (docs/benchmarks.md). f32 keeps 128, so f32
    outputs stay those pinned (blocks change the order of attention's sums). The platform is the
    mesh's (`platform_of`), as `EngineSpec.on_cpu`'s."""
    if platform_of(mesh) != "cpu":
        return 512
    return 16 if jnp.dtype(dtype) == jnp.bfloat16 else 128


def _traced(**kw):
    """A setting the compiled programs receive as an array argument: outside the spec's equality and
    hash, which jit keys its compiled programs on."""
    return dataclasses.field(compare=False, **kw)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Everything a decode engine is built from.

    The compared fields are static: jit compiles one program per distinct value (with the shapes),
    and the programs read them as Python constants. The `_traced` fields are not compared or hashed:
    the engine hands the seed to `insert` and λ and the stop ids to `decode_segment` as device arrays,
    so one compiled program serves every λ of a sweep, every seed and every tokenizer's stop set; the
    compiled functions never read them from the spec. `batch_size` is left out for the same reason:
    the state's shapes carry it. `max_new_tokens` and `max_model_len` stay static: they are fixed for a
    run, and as constants they cost the step rule nothing.
    """

    cfg: ModelConfig
    sampler: Sampler
    sides: int  # 1: plain decoding; 2: expert + naive mixing
    max_new_tokens: int
    max_model_len: int
    batch_size: int = _traced()  # slots decoding together (rounded up to whole slots per batch shard)
    stop_ids: tuple[int, ...] = _traced(default=())
    seed: int = _traced(default=0)
    naive_prob: float = _traced(default=0.0)  # λ: the probability of a naive token
    dtype: str = "float32"
    mesh: Mesh | None = None
    segment_steps: int = 16  # decode steps between host refills
    block: int | None = None  # cache slots per attention block (None: default_block for the dtype and platform)
    # Prefill the sides' shared first tokens once (False: each side whole; the same outputs, to round-off).
    share_prefix: bool = True
    # With share_prefix and two sides, prefill the naive (last) side's prompts whole and continue the
    # expert's after their shared tokens, instead of prefilling the prefix and continuing both sides:
    # one prefill call fewer, at the prefix's width when the naive prompt is mostly the shared prefix
    # (51-58 of its 55-64 tokens on `mixsd bench generate`'s workload: 1.82 s of prefill an insert of
    # its 32 records, not 2.25 s). None: in bf16 on a CPU, where that was measured. f32 on a CPU keeps
    # its pinned outputs (the route changes the order of the sums); elsewhere, unmeasured, a whole
    # naive prompt past the prefix's width costs more FLOPs.
    naive_whole: bool | None = None

    def __post_init__(self):
        if self.block is None:
            object.__setattr__(self, "block", default_block(self.dtype, self.mesh))
        # Resolved here, so equal engines have equal specs (one compiled program) and `naive_whole`
        # alone says whether an insert takes the route.
        whole = self.one_read_attention if self.naive_whole is None else self.naive_whole
        object.__setattr__(self, "naive_whole", bool(whole and self.share_prefix and self.sides == 2))
        if self.sides not in (1, 2):
            raise MixsdError(f"engine: sides must be 1 or 2, got {self.sides}")
        for name in ("batch_size", "max_new_tokens", "max_model_len", "segment_steps", "block"):
            if getattr(self, name) < 1:
                raise MixsdError(f"engine: {name} must be >= 1, got {getattr(self, name)}")
        object.__setattr__(self, "stop_ids", tuple(sorted({int(t) for t in self.stop_ids})))

    @property
    def on_cpu(self) -> bool:
        """Whether the engine runs on CPU devices (XLA:CPU: f32 activations, bf16 kept as bits)."""
        return platform_of(self.mesh) == "cpu"

    @property
    def activation_dtype(self) -> jnp.dtype:
        """The residual stream's dtype: f32 around bf16 matmuls on a CPU (which has bf16 matmul units
        but emulates bf16 elementwise arithmetic, as the train step's `f32_activations`), the compute
        dtype elsewhere."""
        return jnp.dtype(jnp.float32 if self.on_cpu else self.dtype)

    @property
    def cache_bits(self) -> bool:
        """Whether the caches hold their bf16 keys and values as bit patterns (`matmul.to_words`;
        models.decode.as_bits says why): bf16 on a CPU."""
        return self.on_cpu and jnp.dtype(self.dtype) == jnp.bfloat16

    @property
    def one_read_attention(self) -> bool:
        """Whether a decode step reads each side's live cache blocks at once (models.decode
        `_one_read_attention`) instead of walking them: in bf16 on a CPU, where it is faster. f32 on a
        CPU keeps the walk, so its outputs stay those pinned (the read changes the order of the sums)."""
        return self.cache_bits

    @property
    def slots(self) -> int:
        """`batch_size` rounded up so every batch shard gets whole slots."""
        return pad_rows(self.batch_size, self.mesh)


def pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def capacity_for(spec: EngineSpec, need: int, longest_prompt: int) -> int:
    """Cache slots per row for rows that need `need` slots: the next power-of-two number of blocks,
    but never more than any row can use (prompts up to `longest_prompt` tokens)."""
    block = spec.block
    # A row holds at most min(max_model_len, prompt + max_new_tokens) tokens (the stop rules).
    ceiling = min(spec.max_model_len, longest_prompt + spec.max_new_tokens) + spec.segment_steps + 1
    blocks = min(pow2_at_least(-(-need // block)), -(-ceiling // block))
    return block * max(blocks, -(-need // block))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The engine's device state for B slots and R = B * sides rows."""

    cache_k: tuple  # per side [L, B, K, S, E]: row b * sides + s's tokens in cache_k[s][:, b, :, :lengths]
    cache_v: tuple  # per side [L, B, K, S, E]; a token's position = its slot
    lengths_R: jax.Array  # tokens in each row's cache
    last_RxD: jax.Array  # final-norm hidden of each row's last token (the next logits' input)
    keys_Bx2: jax.Array  # uint32: the attempt's key (raw key data, so it can live in a plain array)
    step_B: jax.Array  # tokens generated
    done_B: jax.Array  # stopped (an empty slot is done)
    finish_B: jax.Array  # why it stopped (work.FINISH_NAMES codes)
    longest_B: jax.Array  # the record's longest prompt (the max_model_len rule counts it)
    shared_B: jax.Array  # the first slots that hold the same keys and values on every side (a shared prefix)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentOut:
    """What the host reads after a segment: each slot's tokens of this segment in columns [0, its
    step count here), and copies of the slot counters (the state itself is donated onward)."""

    tokens_BxK: jax.Array
    logprobs_BxK: jax.Array
    naive_BxK: jax.Array
    step_B: jax.Array
    done_B: jax.Array
    finish_B: jax.Array


# Layout of each state field: the row/slot axis over the batch axes, the cache's kv heads over `tensor`.
_LAYOUT = {
    "cache_k": P(None, BATCH_AXES, "tensor", None, None),
    "cache_v": P(None, BATCH_AXES, "tensor", None, None),
    "lengths_R": P(BATCH_AXES),
    "last_RxD": P(BATCH_AXES, None),
    "keys_Bx2": P(BATCH_AXES, None),
    "step_B": P(BATCH_AXES),
    "done_B": P(BATCH_AXES),
    "finish_B": P(BATCH_AXES),
    "longest_B": P(BATCH_AXES),
    "shared_B": P(BATCH_AXES),
}


def state_shardings(state: DecodeState, spec: EngineSpec) -> DecodeState:
    """The sharding of each field of `state` (arrays or their shapes) on the engine's mesh."""
    def field(name):
        return jax.tree.map(lambda x: NamedSharding(spec.mesh, fit_spec(_LAYOUT[name], x.shape, spec.mesh)),
                            getattr(state, name))

    return DecodeState(**{name: field(name) for name in _LAYOUT})


def _constrain(state: DecodeState, spec: EngineSpec) -> DecodeState:
    if spec.mesh is None:
        return state
    return jax.tree.map(jax.lax.with_sharding_constraint, state, state_shardings(state, spec))


@functools.partial(jax.jit, static_argnames=("spec", "batch", "capacity"))
def init_state(*, spec: EngineSpec, batch: int, capacity: int) -> DecodeState:
    """Every slot empty (done), caches of `capacity` slots."""
    cfg, R = spec.cfg, batch * spec.sides
    empty = jnp.zeros((cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim), spec.dtype)
    empty = to_words(empty) if spec.cache_bits else empty
    return _constrain(DecodeState(
        cache_k=tuple(empty for _ in range(spec.sides)),
        cache_v=tuple(empty for _ in range(spec.sides)),
        lengths_R=jnp.zeros((R,), jnp.int32),
        last_RxD=jnp.zeros((R, cfg.hidden_size), spec.activation_dtype),
        keys_Bx2=jnp.zeros((batch, 2), jnp.uint32),
        step_B=jnp.zeros((batch,), jnp.int32),
        done_B=jnp.ones((batch,), bool),
        finish_B=jnp.zeros((batch,), jnp.int32),
        longest_B=jnp.zeros((batch,), jnp.int32),
        shared_B=jnp.zeros((batch,), jnp.int32),
    ), spec)


@functools.partial(jax.jit, static_argnames=("spec", "capacity"))  # a bigger buffer: nothing to donate
def grow(state: DecodeState, *, spec: EngineSpec, capacity: int) -> DecodeState:
    """The same state with caches of `capacity` slots (the live slots copied, the new ones zero)."""
    extra = capacity - state.cache_k[0].shape[3]
    pad = ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0))
    grown = dataclasses.replace(state, cache_k=tuple(jnp.pad(c, pad) for c in state.cache_k),
                                cache_v=tuple(jnp.pad(c, pad) for c in state.cache_v))
    return _constrain(grown, spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def prefill(params, tokens_NxP, lens_N, *, spec: EngineSpec):
    """Keys, values [L, N, P, K, E] and last hidden [N, D] of right-padded prompts."""
    seg_NxP = (jnp.arange(tokens_NxP.shape[1])[None, :] < lens_N[:, None]).astype(jnp.int32)
    hidden_NxPxD, cache = transformer.prefill(params, spec.cfg, tokens_NxP, transformer.padded_positions(seg_NxP),
                                              seg_NxP, tokens_NxP.shape[1], dtype=jnp.dtype(spec.dtype),
                                              activation_dtype=spec.activation_dtype, bf16_as_bits=spec.on_cpu)
    last_NxD = jnp.take_along_axis(hidden_NxPxD, (lens_N - 1)[:, None, None], axis=1)[:, 0]
    return cache["k"], cache["v"], last_NxD


@functools.partial(jax.jit, static_argnames=("spec",))
def prefill_after(params, prefix_k, prefix_v, prefix_lens_N, tokens_NxP, lens_N, *, spec: EngineSpec):
    """`prefill` of right-padded prompt continuations: row n's tokens follow the `prefix_lens_N[n]`
    tokens whose keys and values `prefix_k`, `prefix_v` [L, N, C, K, E] hold (a `prefill` of the
    prefixes). Keys, values [L, N, P, K, E] of the continuations and the last hidden [N, D]."""
    seg_NxP = (jnp.arange(tokens_NxP.shape[1])[None, :] < lens_N[:, None]).astype(jnp.int32)
    hidden_NxPxD, k, v = transformer.extend(params, spec.cfg, prefix_k, prefix_v, prefix_lens_N, tokens_NxP, seg_NxP,
                                            dtype=jnp.dtype(spec.dtype), activation_dtype=spec.activation_dtype,
                                            bf16_as_bits=spec.on_cpu)
    last_NxD = jnp.take_along_axis(hidden_NxPxD, (lens_N - 1)[:, None, None], axis=1)[:, 0]
    return k, v, last_NxD


def _write_rows(cache, slots_N, starts_N, new_LxNxPxKxE):
    """Row slots_N[n]'s slots [starts_N[n], + P) of a side's cache [L, B, K, S, E] set to the new
    keys or values (an index past the cache is dropped)."""
    return jax.lax.platform_dependent(cache, slots_N, starts_N, new_LxNxPxKxE, tpu=_write_rows_per_layer,
                                      default=_write_rows_whole)


def _write_rows_whole(cache, slots_N, starts_N, new_LxNxPxKxE):
    # One scatter; the [n, p] index dimensions come first in the update.
    cols_NxP = starts_N[:, None] + jnp.arange(new_LxNxPxKxE.shape[2])[None, :]
    update = stored(jnp.transpose(new_LxNxPxKxE, (1, 2, 0, 3, 4)), cache)
    return cache.at[:, slots_N[:, None], :, cols_NxP].set(update, mode="drop")


def _write_rows_per_layer(cache, slots_N, starts_N, new_LxNxPxKxE):
    # On a TPU, one layer at a time: a slot may live on any batch shard, so every device gathers
    # every new row before the scatter, and gathered whole that is N prompts of every layer per side
    # (XLA:TPU kept all four at once: 2.5 caches of temporaries for Qwen3-1.7B's 16 pairs on a
    # v5e:2x4); per layer it is 1/L of that, written in place into the donated cache by a scatter
    # that indexes the whole array, layer included (taking the layer's [B, K, S, E] out and putting
    # it back made XLA:TPU copy that layer's cache on chip and write it back). On a CPU the loop
    # costs more than it saves.
    cols_NxP = starts_N[:, None] + jnp.arange(new_LxNxPxKxE.shape[2])[None, :]

    def one_layer(layer, cache):
        new_NxPxKxE = stored(jax.lax.dynamic_index_in_dim(new_LxNxPxKxE, layer, 0, keepdims=False), cache)
        return cache.at[layer, slots_N[:, None], :, cols_NxP].set(new_NxPxKxE, mode="drop")

    return jax.lax.fori_loop(0, cache.shape[0], one_layer, cache)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=0)
def insert(state: DecodeState, sides: tuple, slots_N, ids_Nx3, seed, prefix=None, *, spec: EngineSpec) -> DecodeState:
    """Write prefilled prompts into slots `slots_N` (an entry >= B is padding: dropped) and reset them.

    `sides` holds one (k, v, last, lens) per side, written straight into the rows of the long-lived
    cache: no per-batch cache is built and no sides are stacked. With a `prefix` (k, v, starts): the
    prompts' shared first `starts[n]` tokens, prefilled once, go into every side's row at slots
    [0, starts), each side's (k, v) hold the rest of its prompt and go at [starts, lens). A side
    whose (k, v) are None is all in the prefix (its prompts prefilled whole: `EngineSpec.naive_whole`).
    `ids_Nx3` = (record, generation, attempt); the attempt key is fold_in(key(seed), record,
    generation, attempt).
    """
    cache_k, cache_v, lengths_R, last_RxD = list(state.cache_k), list(state.cache_v), state.lengths_R, state.last_RxD
    zeros_N = jnp.zeros_like(slots_N)
    for side, (k_LxNxPxKxE, v_LxNxPxKxE, last_NxD, lens_N) in enumerate(sides):
        starts_N = zeros_N
        if prefix is not None:  # first, so the prefix's padding slots are overwritten by the rest
            prefix_k, prefix_v, starts_N = prefix
            cache_k[side] = _write_rows(cache_k[side], slots_N, zeros_N, prefix_k)
            cache_v[side] = _write_rows(cache_v[side], slots_N, zeros_N, prefix_v)
        if k_LxNxPxKxE is not None:
            cache_k[side] = _write_rows(cache_k[side], slots_N, starts_N, k_LxNxPxKxE)
            cache_v[side] = _write_rows(cache_v[side], slots_N, starts_N, v_LxNxPxKxE)
        rows_N = slots_N * spec.sides + side
        lengths_R = lengths_R.at[rows_N].set(lens_N, mode="drop")
        last_RxD = last_RxD.at[rows_N].set(last_NxD.astype(last_RxD.dtype), mode="drop")

    def key_of(ids):
        key = jax.random.key(seed)
        for i in range(3):
            key = jax.random.fold_in(key, ids[i])
        return jax.random.key_data(key)

    longest_N = jnp.max(jnp.stack([lens for *_, lens in sides]), axis=0)
    return _constrain(DecodeState(
        cache_k=tuple(cache_k),
        cache_v=tuple(cache_v),
        lengths_R=lengths_R,
        last_RxD=last_RxD,
        keys_Bx2=state.keys_Bx2.at[slots_N].set(jax.vmap(key_of)(ids_Nx3), mode="drop"),
        step_B=state.step_B.at[slots_N].set(0, mode="drop"),
        done_B=state.done_B.at[slots_N].set(False, mode="drop"),
        finish_B=state.finish_B.at[slots_N].set(RUNNING, mode="drop"),
        longest_B=state.longest_B.at[slots_N].set(longest_N, mode="drop"),
        shared_B=state.shared_B.at[slots_N].set(zeros_N if prefix is None else prefix[2], mode="drop"),
    ), spec)


def _draw(params, st: DecodeState, naive_prob, spec: EngineSpec):
    """The mixing step rule: (token, its model log-probability, naive side picked) of every slot."""
    B = st.step_B.shape[0]
    fold = jax.vmap(jax.random.fold_in)
    step_keys = fold(jax.random.wrap_key_data(st.keys_Bx2), st.step_B)
    pick_keys = fold(step_keys, jnp.zeros((B,), jnp.int32))
    draw_keys = fold(step_keys, jnp.ones((B,), jnp.int32))
    last_BxSxD = st.last_RxD.reshape(B, spec.sides, -1)
    if spec.sides == 1:
        naive_B = jnp.zeros((B,), bool)
        chosen_BxD = last_BxSxD[:, 0]
    else:
        naive_B = jax.vmap(jax.random.uniform)(pick_keys) < naive_prob
        chosen_BxD = jnp.where(naive_B[:, None], last_BxSxD[:, NAIVE], last_BxSxD[:, EXPERT])
    # The LM head runs on one row per record, not on both conditionals.
    logits_BxV = transformer.lm_logits(params, spec.cfg, chosen_BxD, dtype=jnp.dtype(spec.dtype))
    token_B, logprob_B = spec.sampler.next_tokens(logits_BxV, draw_keys)
    return token_B, logprob_B, naive_B


def _finish_codes(token_B, n_B, longest_B, stop_ids, spec: EngineSpec):
    """Why a slot stops after its n-th token (RUNNING: it does not); max_model_len counts the
    record's longest prompt."""
    return jnp.where(
        jnp.isin(token_B, stop_ids),
        STOP,
        jnp.where(n_B >= spec.max_new_tokens, MAX_NEW_TOKENS,
                  jnp.where(longest_B + n_B + 1 > spec.max_model_len, MAX_MODEL_LEN, RUNNING)),
    )


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=1)
def decode_segment(params, state: DecodeState, naive_prob, stop_ids, refill_at, *, spec: EngineSpec):
    """Up to `segment_steps` decode steps: fewer when every slot has stopped, or once `refill_at`
    slots have stopped in this segment (the host has work waiting for them; pass B + 1 for never).

    Returns (state, SegmentOut): a slot runs from the segment's start until it stops.
    """
    sides, K = spec.sides, spec.segment_steps
    B = state.step_B.shape[0]
    S = state.cache_k[0].shape[3]

    def body(carry):
        k, st, (tokens_BxK, logprobs_BxK, naive_BxK), freed = carry
        token_B, logprob_B, naive_B = _draw(params, st, naive_prob, spec)
        active_B = ~st.done_B
        n_B = st.step_B + 1
        finish_now_B = _finish_codes(token_B, n_B, st.longest_B, stop_ids, spec)
        out = (tokens_BxK.at[:, k].set(jnp.where(active_B, token_B, 0)),
               logprobs_BxK.at[:, k].set(jnp.where(active_B, logprob_B, 0.0)),
               naive_BxK.at[:, k].set(active_B & naive_B))
        stopping_B = active_B & (finish_now_B != RUNNING)
        done_B = st.done_B | stopping_B
        running_R = jnp.repeat(~done_B, sides)
        lengths_R = st.lengths_R
        # Only records still running feed their token; a stopped row's write is dropped (index S).
        hidden_RxD, cache_k, cache_v = decode_step(
            params, spec.cfg, jnp.repeat(token_B, sides), lengths_R, jnp.where(running_R, lengths_R, S),
            st.cache_k, st.cache_v, jnp.max(jnp.where(running_R, lengths_R, 0).reshape(B, sides), axis=0),
            dtype=jnp.dtype(spec.dtype), block=spec.block, activation_dtype=spec.activation_dtype,
            bf16_as_bits=spec.on_cpu, one_read=spec.one_read_attention, shared_B=st.shared_B,
        )
        st = dataclasses.replace(
            st,
            cache_k=cache_k,
            cache_v=cache_v,
            lengths_R=jnp.where(running_R, lengths_R + 1, lengths_R),
            last_RxD=hidden_RxD.astype(st.last_RxD.dtype),
            step_B=jnp.where(active_B, n_B, st.step_B),
            done_B=done_B,
            finish_B=jnp.where(stopping_B, finish_now_B, st.finish_B),
        )
        return k + 1, st, out, freed + jnp.sum(stopping_B, dtype=jnp.int32)

    def cond(carry):
        k, st, _, freed = carry
        return (k < K) & ~jnp.all(st.done_B) & (freed < refill_at)

    out = (jnp.zeros((B, K), jnp.int32), jnp.zeros((B, K), jnp.float32), jnp.zeros((B, K), bool))
    zero = jnp.zeros((), jnp.int32)
    _, state, (tokens_BxK, logprobs_BxK, naive_BxK), _ = jax.lax.while_loop(cond, body, (zero, state, out, zero))
    # Copies: the host reads them while the state is donated to the next segment.
    out = SegmentOut(tokens_BxK, logprobs_BxK, naive_BxK, step_B=state.step_B + 0, done_B=state.done_B | False,
                     finish_B=state.finish_B + 0)
    return _constrain(state, spec), out
