"""Chunked LM-head loss and rematerialised layer scans: the same loss and gradients as the dense,
save-everything step (f32 round-off), on tiny transformers checkpoints and their real tokenized data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.transformer import REMAT_POLICIES
from mixsd_jax.train import loss as loss_lib
from mixsd_jax.train import step as step_lib

from test_train_step import _plan


def _loss_and_grads(params, cfg, batch_np, options):
    micro = jax.tree.map(lambda x: jnp.asarray(x[0]), batch_np)
    fn = jax.jit(jax.value_and_grad(step_lib.micro_batch_sums, has_aux=True), static_argnums=(1, 3, 4))
    (nll, (count, correct)), grads = fn(params, cfg, micro, jnp.float32, options)
    return float(nll), float(count), float(correct), jax.device_get(grads)


def _assert_same(a, b, tol=1e-5):
    (nll_a, count_a, correct_a, grads_a), (nll_b, count_b, correct_b, grads_b) = a, b
    assert count_a == count_b and correct_a == correct_b
    np.testing.assert_allclose(nll_a, nll_b, rtol=tol)
    # Gradients of the summed NLL: compare relative to each tensor's scale.
    for path, ga in jax.tree_util.tree_flatten_with_path(grads_a)[0]:
        gb = jax.tree_util.tree_flatten_with_path(grads_b)[0]
        gb = dict((jax.tree_util.keystr(p), g) for p, g in gb)[jax.tree_util.keystr(path)]
        scale = max(float(np.abs(gb).max()), 1e-30)
        np.testing.assert_allclose(ga / scale, gb / scale, atol=tol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("chunk", [7, 16, 1000])
def test_chunked_loss_equals_dense(tiny_model_dir, chunk):
    """Chunk sizes that do not divide the row length (7), a few chunks (16) and one chunk longer
    than the rows: the same NLL, token and correct counts, and gradients (tied and untied heads)."""
    cfg, params = load_hf(tiny_model_dir)
    batch = _plan(tiny_model_dir).host_batch(0)
    dense = _loss_and_grads(params, cfg, batch, step_lib.StepOptions(loss_chunk=0))
    chunked = _loss_and_grads(params, cfg, batch, step_lib.StepOptions(loss_chunk=chunk))
    _assert_same(chunked, dense)


def test_chunked_loss_never_forms_the_whole_logits(tiny_llama_dir):
    """The compiled chunked gradient holds no [tokens, vocab] buffer: its temp memory is below one
    f32 copy of the dense logits, which the dense gradient needs several of."""
    cfg, params = load_hf(tiny_llama_dir)
    micro = jax.tree.map(lambda x: jnp.asarray(x[0]), _plan(tiny_llama_dir, max_seq_len=256).host_batch(0))
    N = micro["tokens"].size
    assert micro["tokens"].shape[1] >= 64

    def temp_bytes(chunk):
        fn = jax.jit(jax.grad(lambda p: loss_lib.nll_sums(p, cfg, jnp.ones((*micro["tokens"].shape, cfg.hidden_size)),
                                                          micro, jnp.float32, chunk)[0]))
        return fn.lower(params).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = 4 * N * cfg.vocab_size
    assert temp_bytes(0) >= logits_bytes
    assert temp_bytes(16) < logits_bytes / 2


def test_auto_chunking_only_when_tokens_times_vocab_is_large():
    assert loss_lib.resolve_chunk(-1, 8, 128, 49152) == 0  # 50M logits: dense
    assert loss_lib.resolve_chunk(-1, 1, 10000, 151936) == loss_lib.DEFAULT_CHUNK
    assert loss_lib.resolve_chunk(0, 1, 10000, 151936) == 0
    assert loss_lib.resolve_chunk(512, 1, 10000, 151936) == 512
    assert loss_lib.resolve_chunk(512, 4, 100, 151936) == 0  # one chunk would hold every position


@pytest.mark.parametrize("block", [16, 48])
def test_blockwise_attention_equals_dense(tiny_model_dir, block):
    """Packed rows (several documents per row, padding at the end) with blocks that do not divide
    the row (16 of 256 does; 48 pads): the same loss and gradients as dense attention."""
    cfg, params = load_hf(tiny_model_dir)
    batch = _plan(tiny_model_dir, batch_size=2, packing=True, max_seq_len=256).host_batch(0)
    assert len(set(batch["segment_ids"][0, 0].tolist())) > 2  # documents and padding share the row
    dense = _loss_and_grads(params, cfg, batch, step_lib.StepOptions(attention_block=0))
    _assert_same(_loss_and_grads(params, cfg, batch, step_lib.StepOptions(attention_block=block)), dense)


def test_blockwise_attention_outputs_equal_dense_pad_rows_included():
    from mixsd_jax.models.attention import attention, blockwise_attention

    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 40, 4, 8))
    k, v = (jax.random.normal(key, (2, 40, 2, 8)) for key in keys[1:])
    seg = jnp.array([[1] * 15 + [2] * 20 + [0] * 5, [0] * 40])  # a fully padded row too
    idx = jnp.arange(40)
    mask = (idx[:, None] >= idx[None, :])[None] & (seg[:, :, None] == seg[:, None, :]) & (seg != 0)[:, :, None]
    np.testing.assert_allclose(blockwise_attention(q, k, v, seg, 16), attention(q, k, v, mask), atol=1e-5)


def test_auto_attention_blocks_only_long_rows():
    options = step_lib.StepOptions()
    assert options.attention_block_for(128) == 0 and options.attention_block_for(2048) == 0
    assert options.attention_block_for(10000) == step_lib.AUTO_ATTENTION_BLOCK
    assert step_lib.StepOptions(attention_block=256).attention_block_for(100) == 0


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_every_remat_policy_gives_the_same_loss_and_gradients(tiny_qwen3_dir, policy):
    cfg, params = load_hf(tiny_qwen3_dir)
    batch = _plan(tiny_qwen3_dir).host_batch(0)
    plain = _loss_and_grads(params, cfg, batch, step_lib.StepOptions(remat="none"))
    _assert_same(_loss_and_grads(params, cfg, batch, step_lib.StepOptions(remat=policy)), plain)


def test_full_remat_keeps_less_for_the_backward_pass(tiny_qwen3_dir):
    cfg, params = load_hf(tiny_qwen3_dir)
    micro = jax.tree.map(lambda x: jnp.asarray(x[0]), _plan(tiny_qwen3_dir, max_seq_len=256).host_batch(0))

    def temp_bytes(remat):
        options = step_lib.StepOptions(remat=remat, loss_chunk=0)
        fn = jax.jit(jax.grad(lambda p: step_lib.micro_batch_sums(p, cfg, micro, jnp.float32, options)[0]))
        return fn.lower(params).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("full") < temp_bytes("none")


def test_unknown_remat_policy_is_a_config_error():
    from mixsd_jax.errors import MixsdError
    from mixsd_jax.train.config import TrainConfig

    with pytest.raises(MixsdError, match="remat"):
        TrainConfig(remat="sometimes")
    with pytest.raises(MixsdError, match="loss_chunk"):
        TrainConfig(loss_chunk=-2)
