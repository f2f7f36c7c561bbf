"""The decode engine: greedy tokens and log-probabilities against transformers, the mixing rule's
properties (λ = 0 / 1, the naive fraction, independence of batch, slots and devices), the stop
rules, and byte identity with pinned outputs (tests/fixtures/engine, see make_fixtures.py)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mixsd_jax import config as config_lib
from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.sharding import MeshConfig, make_mesh
from mixsd_jax.sampling.engine import Engine, EngineSpec, decode_all, generate
from mixsd_jax.sampling.strategies import Sampler
from mixsd_jax.sampling.work import WorkItem

FIXTURES = Path(__file__).parent / "fixtures" / "engine"


def _make_fixtures():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKE = _make_fixtures()
PINNED = json.loads((FIXTURES / "fixed_batch.json").read_text())


def _same_completions(ours, pinned):
    assert len(ours) == len(pinned)
    for o, p in zip(ours, pinned):
        assert (o.tokens, o.naive, o.finish_reason) == (p["tokens"], p["naive"], p["finish"])
        assert o.logprobs == pytest.approx(p["logprobs"], abs=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_plain_decoding_equals_the_pinned_outputs(tiny_llama_dir, temperature):
    cfg, params = load_hf(tiny_llama_dir)
    outs = generate(params, cfg, MAKE.PROMPTS, stop_ids=[PINNED["stop_id"]], temperature=temperature,
                    **MAKE.PLAIN_SETTINGS)
    _same_completions(outs, PINNED["plain"][f"t{temperature}"])


@pytest.mark.parametrize("temperature", [0.0, 0.6])
@pytest.mark.parametrize("batch_size, segment_steps", [(4, 16), (3, 5), (1, 7)])
def test_mixing_equals_the_pinned_outputs_for_any_slots_and_segments(tiny_llama_dir, temperature, batch_size,
                                                                        segment_steps):
    cfg, params = load_hf(tiny_llama_dir)
    P = MAKE.PROMPTS
    items = [WorkItem((P[i % 8], P[(i + 3) % 8]), i // 2, gen_index=i % 2, attempt=i % 3) for i in range(10)]
    engine = Engine(params, EngineSpec(cfg, Sampler(temperature, 16), sides=2, max_new_tokens=24, max_model_len=30,
                                       batch_size=batch_size, stop_ids=(PINNED["stop_id"],), seed=9, naive_prob=0.3,
                                       segment_steps=segment_steps, block=8))
    _same_completions(decode_all(engine, items), PINNED["mix"][f"t{temperature}"])


@pytest.mark.parametrize("temperature, lam", MAKE.GEN_CASES)
def test_generator_files_equal_the_pinned_files(tiny_llama_dir, tmp_path, temperature, lam):
    from mixsd_jax.sampling.generator import GenerateConfig, Paths, generate as mixsd_generate

    # Other slot count than the pinned run (4): continuous batching must not change a byte.
    settings = {**MAKE.GEN_SETTINGS, "batch_size": 3}
    cfg = config_lib.from_dict(GenerateConfig, dict(input=str(MAKE.corpus(tmp_path / "kg")), out_dir=str(tmp_path),
                                                    model=str(tiny_llama_dir), lambda_mix=lam,
                                                    temperature=temperature, **settings))
    mixsd_generate(cfg, progress=False)
    assert MAKE.generator_rows(Paths.for_config(cfg).final) == PINNED["generator"][f"t{temperature}_l{lam}"]


def _mix_engine(params, cfg, *, mesh=None, max_new_tokens=24, stop_ids=None, batch_size=4):
    stop_ids = (PINNED["stop_id"],) if stop_ids is None else stop_ids
    return Engine(params, EngineSpec(cfg, Sampler(0.6, 16), sides=2, max_new_tokens=max_new_tokens, max_model_len=30,
                                     batch_size=batch_size, stop_ids=stop_ids, seed=9, naive_prob=0.3, segment_steps=6,
                                     block=8, mesh=mesh))


def _pinned_items():
    P = MAKE.PROMPTS
    return [WorkItem((P[i % 8], P[(i + 3) % 8]), i // 2, gen_index=i % 2, attempt=i % 3) for i in range(10)]


def test_same_tokens_on_a_data_and_tensor_mesh(tiny_llama_dir):
    import jax

    from mixsd_jax.models.sharding import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=4, tensor=2))  # the 2 kv heads split over `tensor`
    assert jax.device_count() == 8
    cfg, params = load_hf(tiny_llama_dir, mesh=mesh)
    _same_completions(decode_all(_mix_engine(params, cfg, mesh=mesh), _pinned_items()), PINNED["mix"]["t0.6"])


def test_cache_follows_the_live_length_not_max_new_tokens(tiny_llama_dir):
    cfg, params = load_hf(tiny_llama_dir)
    prompts = [MAKE.PROMPTS[i] for i in range(4)]
    stopped = generate(params, cfg, prompts, stop_ids=[], max_new_tokens=12)
    stop = sorted({c.tokens[-1] for c in stopped})
    # Same records, a stop set that ends them within 12 tokens: N = 12 and N = 1500 do the same work.
    short, long = (Engine(params, EngineSpec(cfg, Sampler(0.0), sides=1, max_new_tokens=n, max_model_len=2048,
                                             batch_size=4, stop_ids=stop, segment_steps=4, block=8))
                   for n in (12, 1500))
    items = [WorkItem((p,), i) for i, p in enumerate(prompts)]
    a, b = decode_all(short, items), decode_all(long, items)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert all(len(c.tokens) <= 12 for c in b)
    # Cache rows sized by the longest live row (prompt + tokens + one segment), not by 1500 new tokens.
    assert long.capacity == short.capacity <= 64


_WORKER = """
import importlib.util, json, sys
from mixsd_jax import multihost
multihost.maybe_initialize()
import jax
from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.sharding import MeshConfig, make_mesh
from mixsd_jax.sampling.engine import decode_all
spec = importlib.util.spec_from_file_location("t", sys.argv[2])
t = importlib.util.module_from_spec(spec)
spec.loader.exec_module(t)
mesh = make_mesh(MeshConfig(data=2, tensor=2))
cfg, params = load_hf(sys.argv[1], mesh=mesh)
engine = t._mix_engine(params, cfg, mesh=mesh)
outs = decode_all(engine, t._pinned_items())
print("OUT " + json.dumps([[o.tokens, o.naive, o.finish_reason] for o in outs]), flush=True)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_decode_what_one_does(tiny_llama_dir):
    import os
    import subprocess
    import sys

    port, procs, outputs = _free_port(), [], []
    for process_id in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
               "MIXSD_COORDINATOR": f"127.0.0.1:{port}", "MIXSD_NUM_PROCESSES": "2",
               "MIXSD_PROCESS_ID": str(process_id)}
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(tiny_llama_dir), __file__], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    got = [json.loads(next(line for line in out.splitlines() if line.startswith("OUT "))[4:]) for out in outputs]
    pinned = [[p["tokens"], p["naive"], p["finish"]] for p in PINNED["mix"]["t0.6"]]
    assert got[0] == got[1] == pinned


def test_a_sequence_reaching_max_model_len_ends_with_max_model_len(tiny_llama_dir):
    cfg, params = load_hf(tiny_llama_dir)
    free = decode_all(_mix_engine(params, cfg, stop_ids=[], max_new_tokens=40, batch_size=2), _pinned_items()[:3])
    # max_model_len 30 counts the longer prompt: 30 - longest tokens, across block (8) and segment (6) edges.
    for item, c in zip(_pinned_items()[:3], free):
        longest = max(map(len, item.prompts))
        assert c.finish_reason == "max_model_len" and len(c.tokens) == 30 - longest


# ----------------------------------------------------------------------------- the mixing rule's properties

PROMPTS = [(5, 6, 7, 8, 9), (10, 11), (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13), (40,), (7, 7, 7, 7)]


def _mixing(params, cfg, *, batch_size, naive_prob, temperature=1.0, max_new_tokens=12, mesh=None, segment_steps=16,
            dtype="float32"):
    return Engine(params, EngineSpec(cfg, Sampler(temperature, 16), sides=2, max_new_tokens=max_new_tokens,
                                     max_model_len=4096, batch_size=batch_size, seed=7, naive_prob=naive_prob,
                                     mesh=mesh, segment_steps=segment_steps, dtype=dtype))


def test_greedy_decode_equals_transformers_generate(tiny_model_dir):
    cfg, params = load_hf(tiny_model_dir)
    ours = generate(params, cfg, PROMPTS, stop_ids=[], max_new_tokens=32, batch_size=4)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for prompt, completion in zip(PROMPTS, ours):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
        assert completion.tokens == ref[0, len(prompt):].tolist()
        assert completion.finish_reason == "max_new_tokens"
        # Per-token log-probabilities are the model's own.
        with torch.no_grad():
            logits = hf(ref).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        expected = logits[torch.arange(32), ref[0, len(prompt):]].numpy()
        np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4)


def test_stop_token_and_length_limits(tiny_llama_dir):
    cfg, params = load_hf(tiny_llama_dir)
    free = generate(params, cfg, [PROMPTS[0]], stop_ids=[], max_new_tokens=10)[0]
    stop = free.tokens[3]
    first = free.tokens.index(stop)
    stopped = generate(params, cfg, [PROMPTS[0]], stop_ids=[stop], max_new_tokens=10)[0]
    assert stopped.tokens == free.tokens[: first + 1] and stopped.finish_reason == "stop"
    # max_model_len counts the prompt: 5 prompt tokens + n generated + 1 > 9  =>  stops after 4.
    capped = generate(params, cfg, [PROMPTS[0]], stop_ids=[], max_new_tokens=10, max_model_len=9)[0]
    assert capped.tokens == free.tokens[:4] and capped.finish_reason == "max_model_len"


def test_lambda_0_is_expert_greedy_and_lambda_1_is_naive_greedy(tiny_qwen3_dir):
    cfg, params = load_hf(tiny_qwen3_dir)
    expert, naive = PROMPTS[2], PROMPTS[0]
    expert_greedy = generate(params, cfg, [expert], stop_ids=[], max_new_tokens=12)[0].tokens
    naive_greedy = generate(params, cfg, [naive], stop_ids=[], max_new_tokens=12)[0].tokens
    for lam, want, naive_flags in [(0.0, expert_greedy, False), (1.0, naive_greedy, True)]:
        engine = _mixing(params, cfg, batch_size=2, naive_prob=lam, temperature=0.0)
        out = decode_all(engine, [WorkItem((expert, naive), 0)])[0]
        assert out.tokens == want
        assert all(flag == naive_flags for flag in out.naive)


def test_naive_fraction_is_lambda_within_binomial_error(tiny_llama_dir):
    cfg, params = load_hf(tiny_llama_dir)
    lam, records, steps = 0.3, 32, 24
    engine = _mixing(params, cfg, batch_size=records, naive_prob=lam, max_new_tokens=steps)
    outs = decode_all(engine, [WorkItem((PROMPTS[i % 5], PROMPTS[(i + 1) % 5]), i) for i in range(records)])
    picks = np.concatenate([o.naive for o in outs])
    assert len(picks) == records * steps
    sigma = np.sqrt(lam * (1 - lam) / len(picks))
    assert abs(picks.mean() - lam) < 4 * sigma


def _mixed(params, cfg, batch_size, mesh=None, segment_steps=16, dtype="float32"):
    engine = _mixing(params, cfg, batch_size=batch_size, naive_prob=0.5, mesh=mesh, segment_steps=segment_steps,
                     dtype=dtype)
    # Odd records' prompts share their first tokens (prefilled once; in bf16 on a CPU the naive rows
    # read them from the expert's cache).
    head = lambda i: (20, 21, 22, 23) if i % 2 else ()  # noqa: E731
    items = [WorkItem((head(i) + PROMPTS[i % 5], head(i) + PROMPTS[(i + 2) % 5]), record_index=i, attempt=i % 2)
             for i in range(8)]
    return [(o.tokens, o.naive, o.finish_reason) for o in decode_all(engine, items)]


def test_output_independent_of_batch_size_slots_and_device_count(tiny_qwen2_dir):
    cfg, params = load_hf(tiny_qwen2_dir)
    reference = _mixed(params, cfg, 8)
    assert _mixed(params, cfg, 1) == reference
    assert _mixed(params, cfg, 3, segment_steps=5) == reference  # other slots, refills mid-run
    mesh = make_mesh(MeshConfig(data=8))
    _, sharded = load_hf(tiny_qwen2_dir, mesh=mesh)
    assert jax.device_count() == 8
    assert _mixed(sharded, cfg, 8, mesh=mesh) == reference
    # Different attempts of the same record draw differently (retries are not replays at T>0).
    items = [WorkItem((PROMPTS[0], PROMPTS[1]), 0, attempt=a) for a in (0, 1)]
    a0, a1 = decode_all(_mixing(params, cfg, batch_size=2, naive_prob=0.5), items)
    assert a0.tokens != a1.tokens


def test_bf16_on_a_cpu_keeps_its_caches_as_bits_and_stays_independent_of_slots_and_devices(tiny_qwen2_dir):
    """bf16 compute on a CPU (f32 activations, bf16 caches and weights sliced as bit patterns,
    attention reading the live blocks at once, the naive rows reading a shared prefix from the
    expert's cache, the prefix taken from the naive prompts prefilled whole) keeps the step rule's
    independence of batch size, slots and device count."""
    from mixsd_jax.sampling import segments

    cfg, params = load_hf(tiny_qwen2_dir, "bfloat16")
    spec = _mixing(params, cfg, batch_size=8, naive_prob=0.5, dtype="bfloat16").spec
    assert spec.cache_bits and spec.activation_dtype == np.float32 and spec.one_read_attention
    assert spec.naive_whole  # the naive prompts prefilled whole, the expert's continued from them
    cache = segments.init_state(spec=spec, batch=8, capacity=16).cache_k[0]
    assert cache.dtype == np.uint32 and cache.shape[-1] == cfg.head_dim // 2  # pairs of bf16 as words
    reference = _mixed(params, cfg, 8, dtype="bfloat16")
    assert _mixed(params, cfg, 1, dtype="bfloat16") == reference
    assert _mixed(params, cfg, 3, segment_steps=5, dtype="bfloat16") == reference
    mesh = make_mesh(MeshConfig(data=8))
    _, sharded = load_hf(tiny_qwen2_dir, "bfloat16", mesh=mesh)
    assert _mixed(sharded, cfg, 8, mesh=mesh, dtype="bfloat16") == reference


def test_shared_prefix_is_what_every_prompt_of_a_record_begins_with():
    from mixsd_jax.sampling.engine import shared_prefix

    assert shared_prefix(((1, 2, 3, 4), (1, 2, 5))) == 2
    assert shared_prefix(((1, 2), (1, 2, 3))) == 1  # each side keeps its last token
    assert shared_prefix(((7, 8, 9), (7, 8, 9))) == 2
    assert shared_prefix(((5, 6), (6, 5))) == 0
    assert shared_prefix(((1, 2, 3),)) == 0


@pytest.mark.parametrize("naive_whole", [False, True])
@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_gemma3_dir"])
def test_prefilling_the_shared_prefix_once_gives_what_prefilling_each_side_gives(model, naive_whole, request):
    """The shared prefix prefilled once (`naive_whole`: as the naive prompts' first tokens, prefilled
    whole) and each side continued from it decodes as each side prefilled whole."""
    from mixsd_jax.sampling.engine import shared_prefix

    cfg, params = load_hf(request.getfixturevalue(model))
    head = tuple(range(3, 40))  # longer than the tiny Gemma 3's sliding window
    prompts = [
        (head + (50, 51, 52), head + (60,)),  # a long shared head, then different questions
        ((9, 10, 11, 12), (9, 10, 11, 12, 13, 14)),  # the naive prompt extends the expert one
        (head[:5] + (70, 71), head[:5] + (80, 81, 82)),
        ((41, 42, 43), (44, 45)),  # nothing shared
    ]
    assert [shared_prefix(p) for p in prompts] == [len(head), 3, 5, 0]
    items = [WorkItem(p, i) for i, p in enumerate(prompts)]
    nothing_shared = [WorkItem(prompts[3], 0)]

    def run(share_prefix, work):
        engine = Engine(params, EngineSpec(cfg, Sampler(0.6, 16), sides=2, max_new_tokens=10, max_model_len=4096,
                                           batch_size=4, seed=3, naive_prob=0.4, segment_steps=4, block=16,
                                           share_prefix=share_prefix, naive_whole=naive_whole))
        return decode_all(engine, work)

    for work in (items, nothing_shared):
        shared, whole = run(True, work), run(False, work)
        assert len(shared) == len(work)
        for s, w in zip(shared, whole):
            assert (s.tokens, s.naive, s.finish_reason) == (w.tokens, w.naive, w.finish_reason)
            assert s.logprobs == pytest.approx(w.logprobs, abs=1e-5)
        # Both sides' rows feed the tokens, so both sides' caches are checked.
        assert any(any(c.naive) for c in shared) and any(not all(c.naive) for c in shared)
