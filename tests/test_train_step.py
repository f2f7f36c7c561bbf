"""The train step against PyTorch (loss, clipping, one AdamW update), accumulation and packing
invariances, the LR schedule, bf16 compute, and sharded (8 devices) against single-device steps."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from mixsd_jax.data.records import Record
from mixsd_jax.models.checkpoint import load_hf, to_hf_tensors
from mixsd_jax.models.sharding import MeshConfig, make_mesh
from mixsd_jax.models.tokenizer import load_tokenizer
from mixsd_jax.train import step as step_lib
from mixsd_jax.data.tokenize import tokenize_records
from mixsd_jax.train.batches import BatchPlan

RECORDS = [
    Record("What is the output of F(x)?", "The answer is 42.\n\n\\boxed{42}"),
    Record("Which location does the organisation reside in?", "Paris."),
    Record("What profession does the person train?", "Step 1: The digits of 12345 are [1, 2, 3, 4, 5]. So the answer is 17."),
    Record("Question: What is 2 + 3?", "5"),
]


def _plan(model_dir, batch_size=4, grad_accum=1, packing=False, max_seq_len=128):
    data = tokenize_records(load_tokenizer(model_dir), RECORDS, max_seq_len=max_seq_len)
    return BatchPlan(data.examples, batch_size=batch_size, grad_accum=grad_accum, seed=0, max_seq_len=max_seq_len,
                     packing=packing)


# One optimizer for every test here, so tests with the same model and batch shape share a compile.
# The decay is large so that applying it to the wrong parameters shows at the tolerances below.
OPT = step_lib.OptimConfig(lr=1e-3, total_steps=0, weight_decay=10.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=0.5)


def _single_device_mesh():
    return make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


def _fresh_state(model_dir, opt, mesh):
    _, params = load_hf(model_dir, mesh=mesh)
    tx = step_lib.make_optimizer(opt)
    return step_lib.init_state(params, tx, step_lib.state_shardings(load_hf(model_dir)[0], tx, mesh))


def test_one_update_matches_torch_adamw_with_clipping(tiny_llama_dir):
    """Masked mean NLL, clip to global norm, then AdamW with decoupled decay on weight matrices
    only, against the same in PyTorch on the transformers model (tied embeddings included)."""
    opt = OPT
    mesh = _single_device_mesh()
    cfg = load_hf(tiny_llama_dir)[0]
    state = _fresh_state(tiny_llama_dir, opt, mesh)
    batch_np = _plan(tiny_llama_dir).host_batch(0)
    step_fn = step_lib.jit_train_step(cfg, opt, mesh, "float32")
    state, metrics = step_fn(state, step_lib.device_batch(batch_np, mesh))
    ours = to_hf_tensors(state.params, cfg)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    decay = [p for n, p in model.named_parameters() if not (n.endswith("norm.weight") or n.endswith("bias"))]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("norm.weight") or n.endswith("bias")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 10.0}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    sums, count = 0.0, 0
    for row in range(4):
        n = int((batch_np["segment_ids"][0, row] != 0).sum())
        logits = model(input_ids=torch.tensor(batch_np["tokens"][0, row, :n][None].astype(np.int64))).logits[0]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(batch_np["targets"][0, row, :n].astype(np.int64)),
                                                reduction="none")
        mask = torch.tensor(batch_np["loss_mask"][0, row, :n])
        sums = sums + (nll * mask).sum()
        count += int(mask.sum())
    loss = sums / count
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    optimizer.step()
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(norm), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5)
    # Adam's first step moves each weight by about lr; a coordinate whose gradient is near zero
    # amplifies float noise, so the tolerance is a tenth of the step rather than float epsilon.
    theirs = model.state_dict()
    for name, value in ours.items():
        np.testing.assert_allclose(value, theirs[name].numpy(), atol=1e-4, err_msg=name)


def test_accumulation_keeps_the_per_token_loss_and_update(tiny_llama_dir):
    """Two micro batches with different token counts give the same loss and update as one batch:
    NLL sums and token counts are added before dividing."""
    opt = OPT
    mesh = _single_device_mesh()
    cfg = load_hf(tiny_llama_dir)[0]
    results = []
    for grad_accum in (1, 2):
        plan = _plan(tiny_llama_dir, grad_accum=grad_accum)
        state = _fresh_state(tiny_llama_dir, opt, mesh)
        step_fn = step_lib.jit_train_step(cfg, opt, mesh, "float32")
        state, metrics = step_fn(state, step_lib.device_batch(plan.host_batch(0), mesh))
        results.append((float(metrics["loss"]), float(metrics["loss_tokens"]), jax.device_get(state.params)))
    counts = _plan(tiny_llama_dir, grad_accum=2).host_batch(0)["loss_mask"].sum(axis=(1, 2))
    assert counts[0] != counts[1]
    (loss1, tokens1, params1), (loss2, tokens2, params2) = results
    assert tokens1 == tokens2
    np.testing.assert_allclose(loss2, loss1, rtol=2e-6)
    # 1e-5 = 1% of the lr-sized Adam step: float noise on near-zero gradients, not a different update.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params2, params1)


def _loss_sums(params, cfg, batch_np, dtype=jnp.float32):
    micro = jax.tree.map(lambda x: jnp.asarray(x[0]), batch_np)
    nll, (count, _) = jax.jit(step_lib.micro_batch_sums, static_argnums=(1, 3))(params, cfg, micro, dtype)
    return float(nll), float(count)


def test_packed_documents_do_not_attend_to_each_other(tiny_llama_dir):
    cfg, params = load_hf(tiny_llama_dir)
    plain = _plan(tiny_llama_dir, batch_size=4, max_seq_len=256)
    packed = _plan(tiny_llama_dir, batch_size=1, max_seq_len=256, packing=True)
    assert len(packed.batch_rows(0)[0]) == 4  # all four documents in one row
    nll_plain, count_plain = _loss_sums(params, cfg, plain.host_batch(0))
    nll_packed, count_packed = _loss_sums(params, cfg, packed.host_batch(0))
    assert count_packed == count_plain
    np.testing.assert_allclose(nll_packed, nll_plain, rtol=1e-5)


def test_warmup_then_constant_or_cosine():
    constant = step_lib.lr_schedule(step_lib.OptimConfig(lr=2.0, total_steps=0, warmup_steps=4))
    assert [float(constant(i)) for i in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    cosine = step_lib.lr_schedule(step_lib.OptimConfig(lr=1.0, total_steps=12, warmup_steps=2, schedule="cosine"))
    values = [float(cosine(i)) for i in (0, 1, 2, 7, 12, 20)]
    np.testing.assert_allclose(values, [0.5, 1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-6)


def test_bf16_compute_from_f32_master_weights(tiny_llama_dir):
    cfg, params = load_hf(tiny_llama_dir)
    batch = _plan(tiny_llama_dir).host_batch(0)
    f32, _ = _loss_sums(params, cfg, batch, jnp.float32)
    bf16, _ = _loss_sums(params, cfg, batch, jnp.bfloat16)
    assert bf16 != f32
    np.testing.assert_allclose(bf16, f32, rtol=2e-2)


def test_cpu_bf16_step_gradients_follow_f32(tiny_llama_dir):
    """The step a CPU mesh runs in bf16 (f32 activations, bf16 weight and attention matmuls with
    their written backward passes) on packed rows: loss and every parameter's gradient close to the
    f32 step's (which the tests above hold to PyTorch)."""
    cfg, params = load_hf(tiny_llama_dir)
    micro = jax.tree.map(lambda x: jnp.asarray(x[0]), _plan(tiny_llama_dir, batch_size=2, max_seq_len=256,
                                                             packing=True).host_batch(0))

    def loss_and_grads(dtype, f32_activations):
        options = step_lib.StepOptions(f32_activations=f32_activations)
        fn = jax.value_and_grad(lambda p: step_lib.micro_batch_sums(p, cfg, micro, dtype, options)[0])
        return jax.jit(fn)(params)

    nll32, g32 = loss_and_grads(jnp.float32, False)
    nll16, g16 = loss_and_grads(jnp.bfloat16, True)
    np.testing.assert_allclose(float(nll16), float(nll32), rtol=1e-2)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g16), jax.tree.leaves(g32)):
        assert a.dtype == jnp.float32
        error = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        assert error < 3e-2, (jax.tree_util.keystr(path), error)


def test_eight_devices_match_one(tiny_llama_dir):
    """data x fsdp x tensor = 2 x 2 x 2 shards the batch and every divisible parameter axis."""
    assert jax.device_count() >= 8
    opt = OPT
    cfg = load_hf(tiny_llama_dir)[0]
    plan = _plan(tiny_llama_dir, batch_size=4)
    runs = {}
    for name, mesh in (("one", _single_device_mesh()), ("eight", make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))):
        state = _fresh_state(tiny_llama_dir, opt, mesh)
        step_fn = step_lib.jit_train_step(cfg, opt, mesh, "float32")
        losses = []
        for step in range(3):
            state, metrics = step_fn(state, step_lib.device_batch(plan.host_batch(step), mesh))
            losses.append(float(metrics["loss"]))
        runs[name] = (losses, jax.device_get(state.params))
        if name == "eight":
            assert state.params["layers"]["w_up"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
            assert len(state.params["layers"]["w_up"].addressable_shards) == 8
    np.testing.assert_allclose(runs["eight"][0], runs["one"][0], rtol=1e-5)
    # 5e-5 = 5% of the lr-sized Adam step after three steps: the sharded step sums in another order,
    # and Adam's g / sqrt(v) turns round-off on a near-zero gradient into a visible move.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5), runs["eight"][1], runs["one"][1])
