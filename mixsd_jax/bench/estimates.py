"""Loop-scaled cost figures of the train step and of one decode step: estimates, not measurements.

Each is XLA:TPU's cost model turned into a time by the chip's peaks (bench.chips), scaled to L
layers by layer_scaled from programs whose layer loop is a real loop (LOOPED_LAYERS): the train
step's from its 0-, 3- and 4-layer programs with no other loop, repeated over the micro batches
(train_estimates), one decode step's from its head and its 3- and 4-layer segments
(decode_estimates). The train step's flops are checked against the analytic count:
`flops_analytic` = 6 x matmul parameters x tokens + attention (train.step.flops_per_token), per device.
"""

from __future__ import annotations

import dataclasses
import math

from mixsd_jax.bench import cost, kernels as kernels_lib


def train_estimates(model_cfg, train, mesh, target) -> dict:
    """flops/bytes of the whole step, its roofline, tokens per second and MFU (estimates).

    The step compiled with one micro batch, dense attention and one LM-head chunk has no loop but
    its layers': the forward scan and the backward scan (which, with remat, recomputes the layer's
    forward), each a loop whose body XLA counts once. So, as for decode (decode_estimates), the
    n-layer program counts H + B + n U (H: embedding, LM head, loss and the optimizer's update of
    the non-layer parameters; B: one forward and one backward layer; U: the per-layer work outside
    the loops, mostly the optimizer's update of the stacked layer parameters), and the step is
    A x (H + L (B + U)) over A micro batches. H is the 0-layer program; B and U come from the 3-
    and 4-layer ones (layer_scaled). Not a 1-layer program: XLA removes its 1-trip loops and counts
    its weights' and activations' traffic as unrolled code, not as the loop body the L-layer
    program runs (its flops are the same). The optimizer's update is counted A times, not once: a
    pass over the parameter shards, small against A micro batches of long rows.
    """
    from mixsd_jax.train.step import flops_per_token

    A, M, T = train.grad_accum, train.micro_batch, train.max_seq_len
    head, low, high = (train_step_cost(dataclasses.replace(model_cfg, num_layers=n), train, mesh)
                       for n in (0, *LOOPED_LAYERS))
    flops, accessed = (A * layer_scaled(h, lo, hi, model_cfg.num_layers) for h, lo, hi in zip(head, low, high))
    kernel = fused_attention_cost(model_cfg, train, mesh)
    if kernel is not None:  # XLA's cost analysis does not see inside the Pallas kernel: its analytic count
        flops, accessed = flops + A * model_cfg.num_layers * kernel[0], accessed + A * model_cfg.num_layers * kernel[1]
    devices = mesh.devices.size
    analytic = flops_per_token(model_cfg, T) * A * M * T / devices
    out = {"attention": "xla" if kernel is None else "flash", "flops_est": flops, "bytes_accessed_est": accessed,
           "flops_analytic": analytic,
           "flops_est_over_analytic": round(flops / analytic, 3)}
    roof = cost.roofline(target.chip, flops, accessed)
    if roof:
        out |= {"roofline_s": roof, "tokens_per_s_est": round(A * M * T / roof, 1),
                "mfu_est": round(analytic / (roof * target.chip.peak_flops), 4)}
    return out


def train_step_cost(model_cfg, train, mesh) -> tuple[float, float]:
    """XLA's raw (flops, bytes) of the step with no loop but the layer scans: one micro batch,
    dense attention and one LM-head chunk (the blockwise attention computes every block, masked
    ones too, so its matmuls are the dense ones)."""
    one_micro = dataclasses.replace(train, grad_accum=1, batch_size=train.micro_batch, attention_block=0,
                                    loss_chunk=0)
    return cost.raw_cost(kernels_lib.train_step(model_cfg, one_micro, mesh)["train_step"].compile())


def fused_attention_cost(model_cfg, train, mesh) -> tuple[float, float] | None:
    """(flops, bytes) per device of one layer's fused attention in one micro batch of the step
    (models.flash_attention.kernel_cost), or None when the step attends with XLA's attention."""
    import jax.numpy as jnp

    from mixsd_jax.models.flash_attention import kernel_cost
    from mixsd_jax.train.step import fused_attention_for

    fused = fused_attention_for(train.attention, model_cfg, mesh)
    if fused is None:
        return None
    tensor, shards = mesh.shape["tensor"], mesh.shape["data"] * mesh.shape["fsdp"]
    return kernel_cost(-(-train.micro_batch // shards), train.max_seq_len, model_cfg.num_heads // tensor,
                       model_cfg.num_kv_heads // tensor, model_cfg.head_dim, block=fused.block,
                       itemsize=jnp.dtype(train.compute_dtype_on(mesh.devices.flat[0].platform)).itemsize,
                       recompute=train.remat != "none")


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded abstract arrays."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def kv_bytes_per_device(model_cfg, mesh, rows: int, slots: int, dtype: str) -> int:
    """K and V of `rows` rows x `slots` slots on one device (rows over the batch axes, kv heads over
    `tensor` where it divides them, as the engine lays its cache)."""
    import jax.numpy as jnp

    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    heads = model_cfg.num_kv_heads
    heads_here = heads // mesh.shape["tensor"] if heads % mesh.shape["tensor"] == 0 else heads
    return (2 * model_cfg.num_layers * -(-rows // batch_shards) * slots * heads_here * model_cfg.head_dim
            * jnp.dtype(dtype).itemsize)


# The layer counts of the programs an estimate is scaled from (layer_scaled): the fewest whose
# layer loop XLA:TPU keeps a loop (decode_estimates says why not 1 or 2).
LOOPED_LAYERS = (3, 4)


def decode_estimates(model_cfg, mesh, shapes, target, *, dtype: str, param_dtype: str, topk: int = 64,
                     live: int | None = None) -> dict:
    """One decode step of a full batch whose rows hold `live` tokens (default: their ceiling).

    XLA counts a loop body once, whatever its trip count: the segment's step loop, its layer loop
    and the attention's block loop. With n layers the segment's one step costs
    program(n) = H + B + n * U: H outside the layer loop (the step's head: LM head and draw), B the
    layer loop's body counted once (a layer, one KV block of its attention, the cache writes, which
    on a TPU are loops over the layers of their own), U any per-layer work XLA unrolls (on a CPU the
    step's cache write is one scatter of every layer's rows). The real step is H + L * (B + U).
    H is the head compiled alone; B and U come from the segment compiled with 3 and 4 layers
    (U = their difference, B = program(4) - H - 4U): programs whose layer loop is a real loop, as
    in the L-layer one. Not 1 or 2: XLA removes a 1-trip loop, and then materialises each weight's
    layer slice and prefetches it on chip, counting each weight byte about 5 times; with 2 layers
    XLA:TPU prefetches the whole 2-layer weight stack on chip before the loop, which it cannot do
    with 36. From 3 layers on a Qwen3-8B step on v5e costs the same with 3, 4, 5, 6 or all 36 layers
    (U = 0 within 0.1%). Two programs also differ in which small buffers XLA places on chip, so a
    negative difference is that noise, not unrolled work, and counts as U = 0.

    The live rows' other KV blocks are added at one read of their K and V each.
    `bytes_per_step_ideal` = this device's weight shard + its live KV rows, read once; the ratio is
    what the cache layout and the kernels waste. XLA's cost analysis does not tell memory spaces
    apart (its keys are per operand and output, not per memory): an on-chip prefetch's copy is
    counted as bytes accessed like an HBM read.
    """
    live = live or min(shapes.max_model_len, shapes.prompt_len + shapes.max_new_tokens)
    kw = dict(dtype=dtype, param_dtype=param_dtype, topk=topk)
    head = cost.raw_cost(kernels_lib.decode_head(dataclasses.replace(model_cfg, num_layers=1), mesh, shapes,
                                                 **kw).compile())
    low, high = (cost.raw_cost(kernels_lib.decode_segment(dataclasses.replace(model_cfg, num_layers=n), mesh,
                                                          shapes, **kw).compile()) for n in LOOPED_LAYERS)
    flops, accessed = (layer_scaled(h, lo, hi, model_cfg.num_layers) for h, lo, hi in zip(head, low, high))
    rows = shapes.batch * shapes.sides
    blocks = -(-live // shapes.block)
    accessed += (blocks - 1) * kv_bytes_per_device(model_cfg, mesh, rows, shapes.block, dtype)
    ideal = (shard_bytes(kernels_lib.abstract_params(model_cfg, mesh, param_dtype))
             + kv_bytes_per_device(model_cfg, mesh, rows, live, dtype))
    out = {"live_tokens": live, "flops_per_step_est": flops, "bytes_per_step_est": accessed,
           "bytes_per_step_ideal": ideal, "bytes_over_ideal_est": round(accessed / ideal, 3)}
    roof = cost.roofline(target.chip, flops, accessed)
    if roof:
        out |= {"step_roofline_s": roof, "tokens_per_s_est": round(shapes.batch / roof, 1)}
    return out


def layer_scaled(head: float, low: float, high: float, layers: int, looped: tuple[int, int] = LOOPED_LAYERS) -> float:
    """H + L * (B + U) from the cost of the head alone (H) and of the programs with `looped` layers
    (low, high), each H + B + n U: B the layer loops' bodies counted once, U the per-layer work
    outside them (their difference per layer; a negative one is placement noise and counts as 0)."""
    n_low, n_high = looped
    unrolled = max(0.0, (high - low) / (n_high - n_low))
    body = high - head - n_high * unrolled
    return head + layers * (body + unrolled)
