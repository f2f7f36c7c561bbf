"""Fused causal attention for training on a TPU: JAX's Pallas splash attention kernel
(`jax.experimental.pallas.ops.tpu.splash_attention`), called, not copied.

At 10,000-token rows the XLA attentions (models.attention: dense, or blockwise with an online
softmax) move every [T, T] score through HBM, forward, again in the rematerialised forward and in
the backward: that traffic, not the matrix units, sets the train step's time on a TPU. The kernel
keeps each score tile in VMEM and skips the tiles the causal mask hides.

`FusedAttention` is what the layer stack's `attend` calls in place of `blockwise_attention` when
the train step selects it (train.step.StepOptions, `attention: flash`, or `auto` on a TPU mesh).
Each kv head is one MQA call of the kernel over its G query heads; rows and kv heads are mapped
with vmap, and across a mesh the call runs per device in a shard_map (rows over data x fsdp,
heads over tensor), since a Pallas call cannot be partitioned by XLA. Rows are padded to whole
kernel blocks with segment 0.

Masking differs from models.attention's only on padding: a real token attends causally within its
segment in both, but a padding query (segment 0) here attends to the padding keys before it rather
than to nothing. Padding positions carry no loss, so the step's loss and gradients are the same.
On a CPU the kernel runs only in Pallas's interpreter (`interpret=True`, for tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

BLOCK = 512  # the kernel's query and key tile at long rows (a multiple of the TPU's 128 lanes)
LANES = 128


@dataclasses.dataclass(frozen=True)
class FusedAttention:
    """Splash attention over a mesh (None: one device). Hashable: part of the train step's options."""

    mesh: jax.sharding.Mesh | None = None
    block: int = BLOCK
    interpret: bool = False

    def tile(self, seq_len: int) -> int:
        """The kernel's block for a row of `seq_len` tokens: BLOCK, or the row rounded up to 128."""
        return min(self.block, -(-seq_len // LANES) * LANES)

    def __call__(self, q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT, divisor: float) -> jax.Array:
        call = functools.partial(splash, divisor=divisor, block=self.tile(q_BxTxHxE.shape[1]),
                                 interpret=self.interpret)
        if self.mesh is None:
            return call(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT)
        from jax.sharding import PartitionSpec as P

        from mixsd_jax.models.sharding import BATCH_AXES

        heads = P(BATCH_AXES, None, "tensor", None)
        return jax.shard_map(call, mesh=self.mesh, in_specs=(heads, heads, heads, P(BATCH_AXES, None)),
                             out_specs=P(BATCH_AXES, None, "tensor"), check_vma=False)(
            q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT)


def supported(model_cfg, mesh, micro_batch: int | None = None) -> bool:
    """Whether the kernel can run this model on this mesh: no sliding-window layers (the kernel's
    mask is static per call, a layer scan's window is not), heads and rows split evenly."""
    from mixsd_jax.models.block import layer_variants

    if layer_variants(model_cfg) is not None:
        return False
    if mesh is None:
        return True
    tensor, shards = mesh.shape["tensor"], mesh.shape["data"] * mesh.shape["fsdp"]
    return (model_cfg.num_heads % tensor == 0 and model_cfg.num_kv_heads % tensor == 0
            and (micro_batch is None or micro_batch % shards == 0))


def splash(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT, *, divisor: float, block: int,
           interpret: bool = False) -> jax.Array:
    """Causal, same-segment attention of one device's rows and heads: [B, T, H*E]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, T, H, E = q_BxTxHxE.shape
    K = k_BxTxKxE.shape[2]
    G = H // K
    pad = -T % block
    if pad:  # padding is segment 0: no real token attends to it
        q_BxTxHxE, k_BxTxKxE, v_BxTxKxE = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
                                           for a in (q_BxTxHxE, k_BxTxKxE, v_BxTxKxE))
        segment_ids_BxT = jnp.pad(segment_ids_BxT, ((0, 0), (0, pad)))
    S = T + pad
    mask = sm.MultiHeadMask([sm.CausalMask((S, S)) for _ in range(G)])
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    # The kernel does not scale the scores: the queries are scaled instead.
    q_BxKxGxSxE = (q_BxTxHxE * (1.0 / divisor)).astype(q_BxTxHxE.dtype).reshape(B, S, K, G, E).transpose(0, 2, 3, 1, 4)
    k_BxKxSxE, v_BxKxSxE = (a.transpose(0, 2, 1, 3) for a in (k_BxTxKxE, v_BxTxKxE))
    per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    per_row = jax.vmap(per_kv_head, in_axes=(0, 0, 0, 0))
    segments = sk.SegmentIds(q=segment_ids_BxT, kv=segment_ids_BxT)
    out_BxKxGxSxE = per_row(q_BxKxGxSxE, k_BxKxSxE, v_BxKxSxE, segments)
    out_BxSxHE = out_BxKxGxSxE.transpose(0, 3, 1, 2, 4).reshape(B, S, H * E)
    return out_BxSxHE[:, :T].astype(v_BxTxKxE.dtype)


def kernel_cost(rows: int, seq_len: int, heads: int, kv_heads: int, head_dim: int, *, block: int = BLOCK,
                itemsize: int = 2, recompute: bool = True) -> tuple[float, float]:
    """(flops, HBM bytes) of one layer's splash attention, forward and backward (and the forward
    again when the layer is rematerialised), for `rows` rows of `seq_len` tokens on one device.

    XLA's cost analysis does not see inside a Pallas call, so the train step's estimates add this
    analytic count. Per computed tile (the causal mask skips the tiles above the diagonal): the
    forward's two [block, block, E] matmuls, the fused backward's five; bytes: each tile reads its
    key and value blocks (once per query head: the kernel's grid runs heads outermost), the
    backward also its query and output-gradient blocks; q, o, do, dq, dk, dv cross HBM once each.
    An estimate, not a measurement."""
    tile = min(block, -(-seq_len // LANES) * LANES)
    n = -(-seq_len // tile)
    tiles = n * (n + 1) // 2
    forwards = 2 if recompute else 1
    matmul = 2 * tile * tile * head_dim  # flops of one [tile, E] x [E, tile] product
    flops = rows * heads * tiles * matmul * (2 * forwards + 5)
    block_bytes = tile * head_dim * itemsize
    fwd_bytes = heads * tiles * 2 * block_bytes + 2 * heads * n * block_bytes
    bwd_bytes = heads * tiles * 4 * block_bytes + (3 * heads + 2 * kv_heads) * n * block_bytes
    return float(flops), float(rows * (forwards * fwd_bytes + bwd_bytes))
