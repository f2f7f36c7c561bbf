"""The pure train step, the optimizer and the LR schedule.

`TrainState` holds `params` (master weights, `param_dtype`), `opt_state` (Optax AdamW) and `step`
(int32 scalar, the number of updates applied = the data-iterator position). It is a standard
dataclass registered with `jax.tree_util.register_dataclass` rather than a `flax.struct.dataclass`:
one decorator gives the same pytree, and the project does not depend on Flax. All three fields are
leaves (nothing static), so the jitted step donates, shards and returns the whole state, and Orbax
saves it under the field names (`params`, `opt_state`, `step`).

A batch holds `grad_accum` micro batches stacked on a leading axis A: arrays [A, M, T] with
`tokens` (inputs), `targets` (next tokens), `loss_mask` (1 on the target tokens that are
trained), `segment_ids` (0 = padding, one id per packed document) and `positions`. The loss is the
mean token NLL over the *whole* global batch: NLL sums and mask counts are summed over micro
batches and devices first, then divided, so every trained token weighs the same whatever the row,
pack or micro batch it sits in.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixsd_jax.errors import MixsdError
from mixsd_jax.models import flash_attention
from mixsd_jax.models.config import ModelConfig
from mixsd_jax.models.flash_attention import FusedAttention
from mixsd_jax.models.sharding import BATCH_AXES, param_shardings, platform_of, replicated
from mixsd_jax.models.transformer import forward, param_shapes
from mixsd_jax.train import loss as loss_lib

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")

Batch = dict[str, jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """The training state; the same type holds its shardings (`state_shardings`) and its abstract
    shapes (`abstract_state`)."""

    params: Any
    opt_state: Any
    step: Any  # int32 scalar


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer part of TrainConfig (hashable, so the schedule can be rebuilt anywhere)."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    schedule: str = "constant"  # or "cosine" (to 0 at total_steps)
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0

    @classmethod
    def from_train_config(cls, cfg, total_steps: int) -> "OptimConfig":
        return cls(
            lr=cfg.lr,
            # Only a cosine schedule depends on the run length; leaving it out otherwise lets runs
            # of different lengths share one compiled step.
            total_steps=total_steps if cfg.schedule == "cosine" else 0,
            warmup_steps=cfg.warmup_steps,
            schedule=cfg.schedule,
            weight_decay=cfg.weight_decay,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            clip_norm=cfg.clip_norm,
        )


def lr_schedule(opt: OptimConfig) -> optax.Schedule:
    """Linear warmup over `warmup_steps` (the first update already uses lr/warmup, the last one lr),
    then constant or cosine decay from lr at step `warmup_steps` to zero at `total_steps`."""
    if opt.schedule == "cosine":
        decay_steps = max(opt.total_steps - opt.warmup_steps, 1)
        main = optax.cosine_decay_schedule(init_value=opt.lr, decay_steps=decay_steps, alpha=0.0)
    else:
        main = optax.constant_schedule(opt.lr)
    if not opt.warmup_steps:
        return main
    warmup = optax.linear_schedule(
        init_value=opt.lr / opt.warmup_steps, end_value=opt.lr, transition_steps=opt.warmup_steps - 1
    )
    return optax.join_schedules([warmup, main], boundaries=[opt.warmup_steps])


def _decay_mask(params):
    # Decoupled weight decay on weight matrices only; norms and biases are left alone, as usual.
    def decays(path, _):
        name = path[-1].key
        return not (name.endswith("norm") or name in ("bq", "bk", "bv"))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt: OptimConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(
        lr_schedule(opt), b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=_decay_mask
    )
    if opt.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt.clip_norm), adamw)
    return adamw


# ----------------------------------------------------------------------------- shardings


def batch_shardings(mesh: Mesh, keys=BATCH_KEYS) -> dict[str, NamedSharding]:
    """[A, M, T] arrays: micro-batch rows over data x fsdp, the accumulation axis unsharded."""
    sharding = NamedSharding(mesh, P(None, BATCH_AXES, None))
    return {key: sharding for key in keys}


def state_shardings(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Optimizer moments are sharded like their parameters; counters are replicated."""
    p_shardings = param_shardings(model_cfg, mesh)
    abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), _shape_tree(model_cfg))
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_opt,
        p_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return TrainState(params=p_shardings, opt_state=opt_shardings, step=replicated(mesh))


def _shape_tree(model_cfg: ModelConfig):
    return jax.tree.map(
        lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32),
        param_shapes(model_cfg),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def init_state(params, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """A fresh state around loaded parameters (already placed by the model's sharding rules)."""
    init = jax.jit(
        lambda p: TrainState(params=p, opt_state=tx.init(p), step=jnp.zeros((), jnp.int32)),
        out_shardings=shardings,
    )
    return init(params)


def abstract_state(model_cfg: ModelConfig, tx, shardings: TrainState, param_dtype: str) -> TrainState:
    """Shapes, dtypes and target shardings of a state: what a checkpoint restores into."""
    dtype = jnp.dtype(param_dtype)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), _shape_tree(model_cfg))
    shapes = TrainState(params=params, opt_state=jax.eval_shape(tx.init, params), step=jax.ShapeDtypeStruct((), jnp.int32))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


# ----------------------------------------------------------------------------- loss and step


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How the step computes (not what): the same loss and gradients for every setting, to f32
    round-off. Hashable, so it is part of the compiled step's cache key.

    `remat`: rematerialisation of the layer scan (models.transformer.REMAT_POLICIES).
    `loss_chunk`: tokens per LM-head chunk of the loss (train.loss): -1 auto, 0 dense.
    `attention_block`: query/key block of blockwise attention (models.transformer): -1 auto
    (blocks of AUTO_ATTENTION_BLOCK above AUTO_ATTENTION_FROM tokens per row), 0 dense.
    `attention`: "auto" (the fused Pallas kernel, models.flash_attention, on a TPU mesh; the XLA
    attentions elsewhere), "flash" (the kernel everywhere: on a CPU in Pallas's interpreter, slow)
    or "xla" (dense / blockwise by `attention_block`).
    `loss`: the name of the token loss in LOSSES (the seam for other objectives).
    `activations`, `fused_attention`: the sharding of [M, T, D] activations (rows over data x fsdp)
    and the fused kernel `attention` selects; set by `jit_train_step` from its mesh.
    `f32_activations`: keep the residual stream and elementwise work in f32 and cast only the
    matmuls' operands to the compute dtype (as PyTorch's autocast); set by `jit_train_step` on
    CPU meshes, whose bf16 matmul units have no bf16 elementwise counterpart (XLA:CPU emulates
    bf16 elementwise work through f32 converts, slower than f32 itself).
    """

    remat: str = "none"
    loss_chunk: int = -1
    attention_block: int = -1
    attention: str = "auto"
    loss: str = "nll"
    activations: NamedSharding | None = None
    fused_attention: FusedAttention | None = None
    f32_activations: bool = False

    @classmethod
    def from_train_config(cls, cfg) -> "StepOptions":
        return cls(remat=cfg.remat, loss_chunk=cfg.loss_chunk, attention_block=cfg.attention_block,
                   attention=getattr(cfg, "attention", "auto"))

    def attention_block_for(self, seq_len: int) -> int:
        if self.attention_block == -1:
            return AUTO_ATTENTION_BLOCK if seq_len > AUTO_ATTENTION_FROM else 0
        return 0 if self.attention_block >= seq_len else self.attention_block


# Dense attention holds [heads, T, T] f32 scores per row and layer: 1.6 GB for Qwen3-8B at T = 2048,
# 16 GB per layer at 10k tokens. Up to 2048 tokens dense is faster (one big matmul); above, blocks.
AUTO_ATTENTION_FROM = 2048
AUTO_ATTENTION_BLOCK = 512


def nll_loss(params, model_cfg: ModelConfig, micro: Batch, compute_dtype, options: StepOptions):
    """Masked target NLL: (sum, (mask count, correct count)) over one micro batch [M, T]."""
    hidden_MxTxD, _ = forward(
        params, model_cfg, micro["tokens"], micro["positions"], micro["segment_ids"], dtype=compute_dtype,
        remat=options.remat, attention_block=options.attention_block_for(micro["tokens"].shape[-1]),
        activation_sharding=options.activations, fused_attention=options.fused_attention,
        activation_dtype=jnp.float32 if options.f32_activations else None,
    )
    return loss_lib.nll_sums(params, model_cfg, hidden_MxTxD, micro, compute_dtype, options.loss_chunk)


# Token losses by name. A loss maps (params, model_cfg, micro batch, compute dtype, options) to
# (sum over the micro batch, (token count, correct count)); the step divides both sums by the
# global token count, so any loss that is a sum over tokens fits the accumulation and sharding.
LOSSES: dict[str, Callable] = {"nll": nll_loss}


def micro_batch_sums(params, model_cfg: ModelConfig, micro: Batch, compute_dtype,
                     options: StepOptions = StepOptions()) -> tuple[jax.Array, tuple]:
    """(sum of the configured token loss, (mask count, correct count)) over one micro batch [M, T]."""
    return LOSSES[options.loss](params, model_cfg, micro, compute_dtype, options)


def train_step(
    state: TrainState,
    batch: Batch,
    *loss_args,
    model_cfg: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: Callable,
    compute_dtype,
    loss_fn: Callable = micro_batch_sums,
    options: StepOptions = StepOptions(),
) -> tuple[TrainState, dict]:
    """One update. `loss_fn(params, model_cfg, micro, compute_dtype, options, *loss_args)` returns (sum of
    per-token losses, (token count, correct count)): the SFT NLL by default, OPSD's divergence
    (mixsd_jax.train.opsd.OpsdLoss, with the frozen teacher's parameters as `loss_args`)."""
    params = state.params
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, micro):
        grads_sum, nll_sum, tokens, correct = carry
        (nll, (count, right)), grads = grad_fn(params, model_cfg, micro, compute_dtype, options, *loss_args)
        grads_sum = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads_sum, grads)
        return (grads_sum, nll_sum + nll, tokens + count, correct + right), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
    num_micro = batch["tokens"].shape[0]
    if num_micro == 1:
        carry, _ = accumulate(init, jax.tree.map(lambda x: x[0], batch))
    else:
        carry, _ = jax.lax.scan(accumulate, init, batch)
    grads_sum, nll_sum, tokens, correct = carry
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads_sum, params)
    updates, opt_state = tx.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    metrics = {
        "loss": nll_sum / denom,
        "accuracy": correct / denom,
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state.step),
        "loss_tokens": tokens,
        "tokens": jnp.sum((batch["segment_ids"] != 0).astype(jnp.float32)),
    }
    return TrainState(params=new_params, opt_state=opt_state, step=state.step + 1), metrics


def fused_attention_for(attention: str, model_cfg: ModelConfig, mesh: Mesh) -> FusedAttention | None:
    """The fused attention kernel a step on `mesh` uses for `attention` (StepOptions), or None."""
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r} (known: {', '.join(ATTENTIONS)})")
    on_tpu = mesh.devices.flat[0].platform == "tpu"
    if attention == "xla" or (attention == "auto" and not on_tpu):
        return None
    if not flash_attention.supported(model_cfg, mesh):
        if attention == "auto":
            return None
        raise MixsdError("config key 'attention': flash needs a model without sliding-window layers and heads and "
                         f"kv heads divisible by mesh.tensor={mesh.shape['tensor']}")
    return FusedAttention(mesh=mesh, interpret=not on_tpu)


ATTENTIONS = ("auto", "flash", "xla")


@functools.lru_cache(maxsize=8)
def jit_train_step(model_cfg: ModelConfig, opt: OptimConfig, mesh: Mesh, compute_dtype: str,
                   options: StepOptions = StepOptions(), loss=None):
    """The train step with explicit shardings and the state donated; cached, so runs in one process
    (a pipeline, a resume, the tests) with the same model, optimizer and mesh compile each batch
    shape once. `options`: how the step computes (remat, chunks, blocks). `loss`: None for the
    configured token loss (`options.loss`, the SFT NLL), or a hashable loss with `batch_keys` (OPSD's, which
    with `frozen_teacher` takes the teacher's parameters as a third argument)."""
    tx = make_optimizer(opt)
    shardings = state_shardings(model_cfg, tx, mesh)
    options = dataclasses.replace(options, activations=NamedSharding(mesh, P(BATCH_AXES, None, None)),
                                  fused_attention=fused_attention_for(options.attention, model_cfg, mesh),
                                  f32_activations=platform_of(mesh) == "cpu")
    fn = functools.partial(
        train_step, model_cfg=model_cfg, tx=tx, schedule=lr_schedule(opt), compute_dtype=jnp.dtype(compute_dtype),
        options=options,
        **({} if loss is None else {"loss_fn": loss}),
    )
    extra_in = (param_shardings(model_cfg, mesh),) if getattr(loss, "frozen_teacher", False) else ()
    return jax.jit(
        fn,
        in_shardings=(shardings, batch_shardings(mesh, BATCH_KEYS if loss is None else loss.batch_keys), *extra_in),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


def device_batch(batch_np: dict, mesh: Mesh) -> Batch:
    """Host arrays (the same global batch on every process) -> global arrays; each process
    only copies the slices its own devices hold."""
    shardings = batch_shardings(mesh, tuple(batch_np))
    return {
        key: jax.make_array_from_callback(batch_np[key].shape, shardings[key], lambda idx, a=batch_np[key]: a[idx])
        for key in batch_np
    }


def flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters plus causal attention (forward + backward)."""
    D, F, L = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_layers
    per_layer = D * model_cfg.q_dim + 2 * D * model_cfg.kv_dim + model_cfg.q_dim * D + 3 * D * F
    matmul_params = L * per_layer + D * model_cfg.vocab_size
    attention = 2 * 2 * L * model_cfg.q_dim * seq_len  # QK^T and PV, forward, full square
    return 6.0 * matmul_params + 3.0 * attention
