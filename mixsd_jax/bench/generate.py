"""`mixsd bench generate`: the decode engine against its peers, as A/B pairs repeated and interleaved.

Workloads (each prints one JSON line; ratios as median with `_min`/`_max` over the repeats):
- `default`: B records x N tokens, no stop tokens, so every contender does exactly the same work:
  our MixSD mix, our plain decode, the same MixSD job written the way a PyTorch user would
  (transformers, two live DynamicCaches, one Python loop per token, LM head on the chosen side
  only) and transformers' plain `generate`, PyTorch's in each of `torch_dtypes`. Keys:
  mix_step_over_plain_step (whole jobs, prefill included: the expert prompts are the longer),
  mix_decode_step_over_plain_decode_step (decode steps alone: each job less the same job stopped
  after its first segment), mix_over_torch_mix, mix_over_hf (throughput ratios against PyTorch's
  faster dtype in each round: > 1 means ours is faster).
- `capacity`: 16 records decoded with max_new_tokens 64 and 8192, a stop set that ends every
  record within 48 tokens (mostly after 24), so both do the same steps. Key: capacity_ratio (time 8192 / time 64).
- `longtail`: KGFunc records (answers of very different lengths) with retries, continuous batching
  against fixed batches on the same engine (each batch of `batch_size` runs to its slowest record,
  retries wait for the next batch), same outputs checked. Key: longtail_speedup.

Timings exclude compilation (a warm-up round runs first). Every JSON line carries the load before
and after, the cores, and `busy` when the load before was above half the cores (bench/machine.py).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections import deque

from mixsd_jax.bench import machine


def _stats(name: str, values: list[float]) -> dict:
    return {name: round(statistics.median(values), 3), f"{name}_min": round(min(values), 3),
            f"{name}_max": round(max(values), 3)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each function per round, rounds A B C A B C ... after one untimed warm-up round."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
        # Each round as it ends, so a long or killed run still shows what it measured.
        print(f"round {i + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()), file=sys.stderr,
              flush=True)
    return times


def _kgfact_records(n: int):
    from mixsd_jax.data.kgfact import build_kgfact
    from mixsd_jax.data.layout import KGFACT_TRAIN
    from mixsd_jax.data.records import read_records

    with tempfile.TemporaryDirectory() as tmp:
        build_kgfact(tmp, preset="small", seed=0)
        records = read_records(f"{tmp}/{KGFACT_TRAIN}")
    return [records[i % len(records)] for i in range(n)]


def _kgfunc_records(n: int):
    from mixsd_jax.data.kgfunc import build_kgfunc
    from mixsd_jax.data.layout import KGFUNC_TRAIN
    from mixsd_jax.data.records import read_records

    with tempfile.TemporaryDirectory() as tmp:
        build_kgfunc(tmp, preset="small", seed=0)
        records = read_records(f"{tmp}/{KGFUNC_TRAIN}")
    step = max(1, len(records) // n)  # spread over the operations
    return [records[(i * step) % len(records)] for i in range(n)]


def _load(model: str, param_dtype: str, mesh):
    from mixsd_jax.models.checkpoint import load_hf
    from mixsd_jax.models.registry import resolve_model
    from mixsd_jax.models.tokenizer import load_tokenizer

    model_dir = resolve_model(model)
    cfg, params = load_hf(model_dir, param_dtype, mesh=mesh)
    return model_dir, cfg, params, load_tokenizer(model_dir)


def _prompts(tok, records, preset_name: str):
    from mixsd_jax.sampling.presets import expert_user_text, get_preset

    preset = get_preset(preset_name)
    naive = [tuple(tok.prompt_ids(r.user)) for r in records]
    expert = [tuple(tok.prompt_ids(expert_user_text(r.user, r.assistant, preset))) for r in records]
    return expert, naive


def _engine(params, cfg, **kw):
    from mixsd_jax.sampling.engine import Engine, EngineSpec
    from mixsd_jax.sampling.strategies import Sampler

    temperature = kw.pop("temperature", 0.0)
    if kw.get("block") is None:  # the engine's default for the backend
        kw.pop("block", None)
    kw["stop_ids"] = tuple(kw.get("stop_ids", ()))
    return Engine(params, EngineSpec(cfg, Sampler(temperature), seed=0, **kw))


def bench_generate(model: str, workload: str = "default", batch_size: int = 32, max_new_tokens: int = 64,
                   lambda_mix: float = 0.3, dtype: str = "float32", repeats: int = 5, with_torch: bool = True,
                   records: int | None = None, mesh_cfg=None, param_dtype: str = "float32",
                   block: int | None = None, blocks: list[int] | None = None,
                   torch_dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> dict:
    """One workload's JSON dict. `mesh_cfg` (a MeshConfig): our side runs on that mesh (records over
    data x fsdp, parameters and KV heads over `tensor`); `param_dtype`: our weights' storage dtype;
    `torch_dtypes`: the dtypes PyTorch's side runs in (the ratios take its faster one per round);
    `block`: the engine's attention block (None: its default for the backend); `blocks`: the block
    sizes the `blocks` workload compares."""
    import jax

    from mixsd_jax.models.sharding import make_mesh
    from mixsd_jax.sampling.segments import default_block

    load_before = machine.load()
    mesh = None if mesh_cfg is None else make_mesh(mesh_cfg)
    loaded = _load(model, param_dtype, mesh)
    if workload == "capacity":
        result = _capacity(loaded, model, batch_size if records is None else records, lambda_mix, dtype, repeats, mesh,
                           block)
    elif workload == "blocks":
        result = _blocks(loaded, model, batch_size, max_new_tokens, lambda_mix, dtype, repeats, mesh,
                         blocks or [default_block(dtype, mesh)])
    elif workload == "longtail":
        result = _longtail(loaded, model, records or 32, batch_size, max_new_tokens, lambda_mix, dtype, repeats, mesh,
                           block)
    else:
        result = _default(loaded, model, batch_size, max_new_tokens, lambda_mix, dtype, repeats,
                          torch_dtypes if with_torch else (), mesh, block)
    where = {"param_dtype": param_dtype, "block": default_block(dtype, mesh) if block is None else block,
             "default_block": default_block(dtype, mesh),
             "mesh": None if mesh is None else dict(mesh.shape), "processes": jax.process_count(),
             "devices": jax.device_count(), "platform": jax.devices()[0].platform}
    return {**result, **where, **machine.report(load_before)}


def _mix_and_plain(params, cfg, expert, naive, max_new_tokens, lambda_mix, dtype, mesh, block, outs=None,
                   first_segment: bool = False) -> dict:
    """Our MixSD mix and our plain decode of the default workload (no stop tokens), as two timed
    functions; each leaves its tokens in `outs` (by "mix" / "plain") when given. `first_segment`
    adds the same two jobs stopped after their first decode segment ("mix_first", "plain_first":
    prefill and K steps), so that the difference times the remaining decode steps alone."""
    from mixsd_jax.sampling.engine import decode_all
    from mixsd_jax.sampling.work import WorkItem

    common = dict(stop_ids=[], max_new_tokens=max_new_tokens, max_model_len=1 << 20, batch_size=len(naive),
                  dtype=dtype, mesh=mesh, block=block)
    mix = _engine(params, cfg, sides=2, naive_prob=lambda_mix, **common)
    plain = _engine(params, cfg, sides=1, **common)
    mix_items = [WorkItem((e, n), i) for i, (e, n) in enumerate(zip(expert, naive))]
    plain_items = [WorkItem((n,), i) for i, n in enumerate(naive)]
    outs = {} if outs is None else outs

    def run(name, engine, items):
        outs[name] = [c.tokens for c in decode_all(engine, items)]

    fns = {"mix": lambda: run("mix", mix, mix_items), "plain": lambda: run("plain", plain, plain_items)}
    K = mix.spec.segment_steps
    if first_segment and max_new_tokens > K:
        short = dict(common, max_new_tokens=K)
        mix_first = _engine(params, cfg, sides=2, naive_prob=lambda_mix, **short)
        plain_first = _engine(params, cfg, sides=1, **short)
        fns["mix_first"] = lambda: run("mix_first", mix_first, mix_items)
        fns["plain_first"] = lambda: run("plain_first", plain_first, plain_items)
    return fns


def _mix_and_plain_keys(mix: list[float], plain: list[float], tokens: int, suffix: str = "") -> dict:
    """Tokens/s of our mix and plain decode and their per-round time ratio, keys ending in `suffix`."""
    return {f"mix_tokens_per_s{suffix}": round(tokens / statistics.median(mix), 2),
            f"plain_tokens_per_s{suffix}": round(tokens / statistics.median(plain), 2),
            **_stats(f"mix_step_over_plain_step{suffix}", [m / p for m, p in zip(mix, plain)])}


def _default(loaded, model, batch_size, max_new_tokens, lambda_mix, dtype, repeats, torch_dtypes, mesh, block) -> dict:
    model_dir, cfg, params, tok = loaded
    expert, naive = _prompts(tok, _kgfact_records(batch_size), "knowledge")
    fns = _mix_and_plain(params, cfg, expert, naive, max_new_tokens, lambda_mix, dtype, mesh, block,
                         first_segment=True)
    for torch_dtype in torch_dtypes:
        peer = _TorchPeer(model_dir, tok.pad_id, torch_dtype)
        fns[f"torch_mix_{torch_dtype}"] = lambda peer=peer: peer.mix(expert, naive, max_new_tokens, lambda_mix)
        fns[f"hf_{torch_dtype}"] = lambda peer=peer: peer.generate(naive, max_new_tokens)
    times = _interleaved(fns, repeats)
    tokens = batch_size * max_new_tokens
    result = {
        "workload": "default", "model": model, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
        "lambda": lambda_mix, "dtype": dtype, "repeats": repeats,
        "mean_expert_prompt_tokens": sum(map(len, expert)) / batch_size,
        "mean_naive_prompt_tokens": sum(map(len, naive)) / batch_size,
        **_mix_and_plain_keys(times["mix"], times["plain"], tokens),
    }
    if "mix_first" in times:  # decode steps alone: the whole jobs less their prefill and first segment
        result.update(_stats("mix_decode_step_over_plain_decode_step", [
            (m - mf) / (p - pf) for m, mf, p, pf in zip(times["mix"], times["mix_first"], times["plain"],
                                                        times["plain_first"])]))
    if torch_dtypes:
        result["torch_dtypes"] = list(torch_dtypes)
        for peer_job in ("torch_mix", "hf"):
            for torch_dtype in torch_dtypes:
                result[f"{peer_job}_tokens_per_s_{torch_dtype}"] = round(
                    tokens / statistics.median(times[f"{peer_job}_{torch_dtype}"]), 2)
            # PyTorch's best: its faster dtype in each round.
            best = [min(round_times) for round_times in zip(*(times[f"{peer_job}_{d}"] for d in torch_dtypes))]
            result[f"{peer_job}_tokens_per_s"] = round(tokens / statistics.median(best), 2)
            result.update(_stats(f"mix_over_{peer_job}", [t / m for m, t in zip(times["mix"], best)]))
    return result


def _blocks(loaded, model, batch_size, max_new_tokens, lambda_mix, dtype, repeats, mesh, blocks) -> dict:
    """The default workload's mix and plain decode under each attention block size, all interleaved
    (mix@a plain@a mix@b plain@b ...), so a block default is chosen on one machine state, not on
    commands run at different loads. Ratios against the first block: > 1 means that block is slower."""
    _, cfg, params, tok = loaded
    expert, naive = _prompts(tok, _kgfact_records(batch_size), "knowledge")
    fns, outs = {}, {b: {} for b in blocks}
    for b in blocks:
        pair = _mix_and_plain(params, cfg, expert, naive, max_new_tokens, lambda_mix, dtype, mesh, b, outs[b])
        fns.update({f"{name}_b{b}": fn for name, fn in pair.items()})
    times = _interleaved(fns, repeats)
    tokens = batch_size * max_new_tokens
    result = {"workload": "blocks", "model": model, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
              "lambda": lambda_mix, "dtype": dtype, "repeats": repeats, "blocks": list(blocks),
              # Blocks change only the order of attention's sums: tokens may differ where two logits tie closely.
              "same_tokens_across_blocks": all(outs[b] == outs[blocks[0]] for b in blocks)}
    first = blocks[0]
    for b in blocks:
        mix, plain = times[f"mix_b{b}"], times[f"plain_b{b}"]
        result.update(_mix_and_plain_keys(mix, plain, tokens, suffix=f"_b{b}"))
        if b != first:
            result.update(_stats(f"mix_b{b}_over_mix_b{first}", [m / f for m, f in zip(mix, times[f"mix_b{first}"])]))
            result.update(_stats(f"plain_b{b}_over_plain_b{first}",
                                 [p / f for p, f in zip(plain, times[f"plain_b{first}"])]))
    return result


def _capacity(loaded, model, records, lambda_mix, dtype, repeats, mesh, block, calibrate_steps: int = 48) -> dict:
    from mixsd_jax.sampling.engine import decode_all
    from mixsd_jax.sampling.work import WorkItem

    _, cfg, params, tok = loaded
    expert, naive = _prompts(tok, _kgfact_records(records), "knowledge")
    items = [WorkItem((e, n), i) for i, (e, n) in enumerate(zip(expert, naive))]
    common = dict(sides=2, naive_prob=lambda_mix, max_model_len=1 << 20, batch_size=records, dtype=dtype, mesh=mesh,
                  block=block)
    free = decode_all(_engine(params, cfg, stop_ids=[], max_new_tokens=calibrate_steps, **common), items)
    stop_ids = _stop_set(free, calibrate_steps)
    engines = {n: _engine(params, cfg, stop_ids=stop_ids, max_new_tokens=n, **common) for n in (64, 8192)}
    outs = {}

    def run(n):
        outs[n] = decode_all(engines[n], items)

    times = _interleaved({"n64": lambda: run(64), "n8192": lambda: run(8192)}, repeats)
    steps = sorted(len(c.tokens) for c in outs[64])
    return {
        "workload": "capacity", "model": model, "records": records, "lambda": lambda_mix, "dtype": dtype,
        "repeats": repeats, "decode_steps": steps[-1], "decode_steps_min": steps[0], "stop_ids": len(stop_ids),
        "same_outputs": [c.tokens for c in outs[64]] == [c.tokens for c in outs[8192]],
        "n64_s": round(statistics.median(times["n64"]), 3), "n8192_s": round(statistics.median(times["n8192"]), 3),
        **_stats("capacity_ratio", [b / a for a, b in zip(times["n64"], times["n8192"])]),
    }


def _stop_set(free, last: int, first: int = 24) -> list[int]:
    """Stop ids that end every record between steps `first` and `last` where its own tokens allow.

    Per record: its first token at a step in [first, last) that no record emits before `first`, else
    its token at step `last` - 1. So every record stops by `last` (N = 64 and N = 8192 then decode the
    same steps), and mostly not before `first` (decode, not prefill, dominates the timing).
    """
    early = {t for c in free for t in c.tokens[:first]}
    stops = set()
    for c in free:
        late = [t for t in c.tokens[first:last] if t not in early]
        stops.add(late[0] if late else c.tokens[last - 1])
    return sorted(stops)


def _longtail(loaded, model, records, batch_size, max_new_tokens, lambda_mix, dtype, repeats, mesh, block,
              max_retries: int = 2, temperature: float = 0.6) -> dict:
    from mixsd_jax.answers.verifier import Verifier
    from mixsd_jax.sampling.engine import decode_all
    from mixsd_jax.sampling.work import WorkItem

    _, cfg, params, tok = loaded
    recs = _kgfunc_records(records)
    expert, naive = _prompts(tok, recs, "math_operations")
    verifier = Verifier("boxed_or_last_number")
    gts = [verifier.gt_answer(r.assistant) for r in recs]
    common = dict(stop_ids=tok.stop_ids, max_new_tokens=max_new_tokens, max_model_len=1 << 20,
                  batch_size=batch_size, dtype=dtype, naive_prob=lambda_mix, sides=2, mesh=mesh)
    engine = _engine(params, cfg, temperature=temperature, block=block, **common)
    items = [WorkItem((expert[i], naive[i]), i) for i in range(records)]

    def verdict(item, c, final):
        text = tok.decode(c.tokens)
        if verifier.check(text, gts[item.record_index]) or item.attempt >= max_retries:
            final[item.record_index] = (item.attempt, tuple(c.tokens))
            return []
        return [WorkItem(item.prompts, item.record_index, item.gen_index, item.attempt + 1)]

    finals = {}

    def run_new():
        final = finals["new"] = {}
        engine.run(items, lambda item, c: verdict(item, c, final))

    def run_old():  # fixed batches: each runs to its slowest record, retries wait for the next one
        final = finals["old"] = {}
        queue = deque(items)
        while queue:
            batch = [queue.popleft() for _ in range(min(engine.batch_size, len(queue)))]
            for item, c in zip(batch, decode_all(engine, batch)):
                queue.extend(verdict(item, c, final))

    times = _interleaved({"old": run_old, "new": run_new}, repeats)
    lengths = sorted(len(t) for _, t in finals["new"].values())
    return {
        "workload": "longtail", "model": model, "records": records, "batch_size": batch_size,
        "max_new_tokens": max_new_tokens, "lambda": lambda_mix, "temperature": temperature,
        "max_retries": max_retries, "dtype": dtype, "repeats": repeats,
        "same_outputs": finals["new"] == finals["old"],
        "attempts": sum(a + 1 for a, _ in finals["new"].values()),
        "final_lengths_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]],
        "old_s": round(statistics.median(times["old"]), 3), "new_s": round(statistics.median(times["new"]), 3),
        **_stats("longtail_speedup", [o / n for o, n in zip(times["old"], times["new"])]),
    }


class _TorchPeer:
    """transformers on PyTorch, written as a PyTorch user would: eager modules, one Python loop per token."""

    def __init__(self, model_dir, pad_id: int, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.pad = pad_id
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

    def _left_pad(self, prompts):
        width = max(map(len, prompts))
        ids = self.torch.tensor([[self.pad] * (width - len(p)) + list(p) for p in prompts])
        mask = self.torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return ids, mask

    def generate(self, prompts, max_new_tokens: int):
        ids, mask = self._left_pad(prompts)
        with self.torch.no_grad():
            return self.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                       min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad,
                                       eos_token_id=None)

    def mix(self, expert, naive, max_new_tokens: int, lambda_mix: float, seed: int = 0):
        """Greedy MixSD: both conditionals live in their own DynamicCache, the same token feeds both."""
        torch = self.torch
        from transformers import DynamicCache

        g = torch.Generator().manual_seed(seed)
        sides = []
        with torch.no_grad():
            for prompts in (expert, naive):
                ids, mask = self._left_pad(prompts)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                cache = DynamicCache()
                out = self.model.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                       cache=cache, use_cache=True)
                sides.append({"mask": mask, "next_pos": positions[:, -1:] + 1, "cache": cache,
                              "last": out.last_hidden_state[:, -1]})
            generated = []
            for _ in range(max_new_tokens):
                pick_naive = torch.rand(len(expert), generator=g) < lambda_mix
                hidden = torch.where(pick_naive[:, None], sides[1]["last"], sides[0]["last"])
                token = self.model.lm_head(hidden).argmax(-1)  # LM head on the chosen side only
                generated.append(token)
                for side in sides:
                    side["mask"] = torch.cat([side["mask"], torch.ones_like(side["mask"][:, :1])], dim=1)
                    out = self.model.model(input_ids=token[:, None], attention_mask=side["mask"],
                                           position_ids=side["next_pos"], cache=side["cache"],
                                           use_cache=True)
                    side["next_pos"] = side["next_pos"] + 1
                    side["last"] = out.last_hidden_state[:, -1]
        return torch.stack(generated, dim=1)
