"""The continuous-batching decode engine against the fixed-batch path it replaced (pinned fixtures)."""

import json
from pathlib import Path

import pytest

from mixsd_jax import config as config_lib
from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.sampling.engine import Engine, decode_all
from mixsd_jax.sampling.runner import WorkItem, generate
from mixsd_jax.sampling.strategies import Sampler

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
def test_plain_decoding_equals_the_fixed_batch_path(tiny_llama_dir, temperature):
    cfg, params = load_hf(tiny_llama_dir)
    outs = generate(params, cfg, MAKE.PROMPTS, stop_ids=[PINNED["stop_id"]], temperature=temperature,
                    **MAKE.PLAIN_SETTINGS)
    _same_completions(outs, PINNED["plain"][f"t{temperature}"])


@pytest.mark.parametrize("temperature", [0.0, 0.6])
@pytest.mark.parametrize("batch_size, segment_steps", [(4, 16), (3, 5), (1, 7)])
def test_mixing_equals_the_fixed_batch_path_for_any_slots_and_segments(tiny_llama_dir, temperature, batch_size,
                                                                        segment_steps):
    cfg, params = load_hf(tiny_llama_dir)
    P = MAKE.PROMPTS
    items = [WorkItem((P[i % 8], P[(i + 3) % 8]), i // 2, gen_index=i % 2, attempt=i % 3) for i in range(10)]
    engine = Engine(params, cfg, sampler=Sampler(temperature, 16), sides=2, stop_ids=[PINNED["stop_id"]],
                    max_new_tokens=24, max_model_len=30, batch_size=batch_size, seed=9, naive_prob=0.3,
                    segment_steps=segment_steps, block=8)
    _same_completions(decode_all(engine, items), PINNED["mix"][f"t{temperature}"])


@pytest.mark.parametrize("temperature, lam", MAKE.GEN_CASES)
def test_generator_files_equal_the_fixed_batch_path(tiny_llama_dir, tmp_path, temperature, lam):
    from mixsd_jax.sampling.generator import GenerateConfig, Paths, generate as mixsd_generate

    # Other slot count than the pinned run (4): continuous batching must not change a byte.
    settings = {**MAKE.GEN_SETTINGS, "batch_size": 3}
    cfg = config_lib.from_dict(GenerateConfig, dict(input=str(MAKE.corpus(tmp_path / "kg")), out_dir=str(tmp_path),
                                                    model=str(tiny_llama_dir), lambda_mix=lam,
                                                    temperature=temperature, **settings))
    mixsd_generate(cfg, progress=False)
    assert MAKE.generator_rows(Paths.for_config(cfg).final) == PINNED["generator"][f"t{temperature}_l{lam}"]


def _mix_engine(params, cfg, *, mesh=None, max_new_tokens=24, stop_ids=None, batch_size=4):
    return Engine(params, cfg, sampler=Sampler(0.6, 16), sides=2,
                  stop_ids=[PINNED["stop_id"]] if stop_ids is None else stop_ids, max_new_tokens=max_new_tokens,
                  max_model_len=30, batch_size=batch_size, seed=9, naive_prob=0.3, segment_steps=6, block=8, mesh=mesh)


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
    short, long = (Engine(params, cfg, sampler=Sampler(0.0), sides=1, stop_ids=stop, max_new_tokens=n,
                          max_model_len=2048, batch_size=4, seed=0, segment_steps=4, block=8) for n in (12, 1500))
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
from mixsd_jax.sampling.engine import Engine, decode_all
from mixsd_jax.sampling.runner import WorkItem
from mixsd_jax.sampling.strategies import Sampler
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
