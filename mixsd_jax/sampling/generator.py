"""`mixsd generate`: MixSD mixed targets for a record file, streamed, verified, resumable.

Work is a queue of attempts (record, generation, attempt) run by the continuous-batching decode
engine (sampling/engine.py, `batch_size` slots): a finished attempt is decoded, verified and
streamed while the device runs on, and a failed one goes back to the end of the queue with
attempt+1, taking the next free slot. Every attempt's randomness is a function of
its ids alone, hence the files do not depend on batch size, device count or resume history.

Results stream to `<final>.partial` (one flushed line per finished (record, generation)), next to
`<final>.partial.meta.json` holding the config fingerprint; a rerun resumes, and refuses a partial
written with other settings. Finalize writes accepted records (input order) to the final file and
the others to `.rejected.jsonl` (keep_rejected: only empty answers), both by atomic rename.

Multi-host (`distributed` section or MIXSD_* environment): every process reads the same input and
resume state (checked: they must agree), runs the same queue, and process 0 alone writes the
`.partial`, its meta, the final, rejected and summary files; the others wait for it and read the
summary back. So the bytes do not depend on the process count, and a run killed with N processes
resumes with any other number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter, deque
from pathlib import Path

from mixsd_jax import config as config_lib
from mixsd_jax import multihost, storage
from mixsd_jax.errors import MixsdError
from mixsd_jax.files import (JsonlAppender, atomic_write_json, atomic_write_jsonl, read_partial_jsonl, remove_partial,
                             sha256_file)
from mixsd_jax.models.registry import EMBEDDED_DEFAULT
from mixsd_jax.models.sharding import MeshConfig
from mixsd_jax.multihost import DistributedConfig
from mixsd_jax.storage import StorageConfig


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    input: str = ""
    out_dir: str = "outputs/mixsd"
    model: str = EMBEDDED_DEFAULT
    lambda_mix: float = 0.3  # probability of a naive (prior) token; 0 = pure expert
    temperature: float = 0.0
    topk: int = 64
    num_generations: int = 1
    seed: int = 42
    preset: str = "knowledge"  # knowledge | math_operations | simpleqa | custom
    prefix: str | None = None  # custom GT-guidance strings (override the preset's)
    transition: str | None = None
    extract_mode: str | None = None  # None: the preset's default
    criterion: str | None = None  # a mixsd_jax.answers.criteria name: the run's answer criterion (then extract_mode is unused)
    normalized_compare: bool = False
    max_retries: int | None = None  # None: the preset's default
    keep_rejected: bool = False  # the reference writes failures into the training file
    max_new_tokens: int = 8192
    max_model_len: int = 10000
    batch_size: int = 32
    enable_thinking: bool = False
    limit: int | None = None
    variant_tag: str | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    storage: StorageConfig = StorageConfig()

    def __post_init__(self):
        config_lib.check_range("lambda_mix", self.lambda_mix, 0.0, 1.0)
        config_lib.check_range("temperature", self.temperature, 0.0)
        for key in ("topk", "num_generations", "batch_size", "max_new_tokens", "max_model_len"):
            config_lib.check_range(key, getattr(self, key), 1)
        if self.max_retries is not None:
            config_lib.check_range("max_retries", self.max_retries, 0)
        if self.limit is not None:
            config_lib.check_range("limit", self.limit, 1)
        if self.criterion is not None:
            from mixsd_jax.answers.criteria import check_criterion

            check_criterion(self.criterion)


# Settings that change *how fast*, never *what*, is generated: left out of the resume fingerprint;
# and `input`, a path, which the fingerprint holds as its content's hash instead (the same
# experiment in another folder or on another host resumes the same partial).
NOT_IN_FINGERPRINT = ("input", "out_dir", "batch_size", "mesh", "distributed", "storage")


def _fmt(x: float) -> str:
    return f"{x:g}".replace(".", "p")


def model_slug(model: str) -> str:
    return Path(model.rstrip("/")).name.lower().replace(".", "_").replace("-", "_")


def output_name(cfg: GenerateConfig) -> str:
    """The reference's file name: train_messages_mix{_tag}_{slug}_l{λ}_t{T}_n{n}_topk{k}.jsonl."""
    tag = f"_{cfg.variant_tag}" if cfg.variant_tag else ""
    return (
        f"train_messages_mix{tag}_{model_slug(cfg.model)}_l{_fmt(cfg.lambda_mix)}_t{_fmt(cfg.temperature)}"
        f"_n{cfg.num_generations}_topk{cfg.topk}.jsonl"
    )


@dataclasses.dataclass
class Paths:
    final: Path
    rejected: Path
    summary: Path
    partial: Path
    meta: Path

    @classmethod
    def for_config(cls, cfg: GenerateConfig) -> "Paths":
        final = storage.path(cfg.out_dir) / output_name(cfg)
        stem = final.with_suffix("")
        return cls(
            final=final,
            rejected=stem.with_suffix(".rejected.jsonl"),
            summary=stem.with_suffix(".summary.json"),
            partial=final.with_name(final.name + ".partial"),
            meta=final.with_name(final.name + ".partial.meta.json"),
        )


def run_fingerprint(cfg: GenerateConfig, model_dir: Path) -> str:
    """Config (minus speed-only keys) + input bytes + model config: what determines the output."""
    parts = {
        "config": config_lib.fingerprint(cfg, exclude=NOT_IN_FINGERPRINT),
        "input": sha256_file(cfg.input),
        "model_config": sha256_file(model_dir / "config.json"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _finished_summary(paths: Paths, fingerprint: str) -> dict | None:
    """The summary of a finished run of these settings (None if unfinished); a finished run of other
    settings is an error."""
    finished = paths.final.exists() and paths.summary.exists()
    multihost.agree(f"{paths.final}: finished", f"{fingerprint}:{finished}")
    if not finished:
        return None
    summary = json.loads(paths.summary.read_text())
    if summary.get("fingerprint") != fingerprint:
        raise MixsdError(
            f"{paths.final}: exists from different settings (fingerprint {summary.get('fingerprint')}, now"
            f" {fingerprint}); use another out_dir or variant_tag, or delete it"
        )
    return {**summary, "skipped_existing": True}


def _expert_naive_prompts(cfg: GenerateConfig, tokenizer, records, preset) -> list[tuple[tuple[int, ...], ...]]:
    """Each record's (expert, naive) prompt ids: the expert's user turn carries the GT guidance."""
    from mixsd_jax.sampling.presets import expert_user_text

    return [
        (
            tuple(tokenizer.prompt_ids(expert_user_text(r.user, r.assistant, preset), enable_thinking=cfg.enable_thinking)),
            tuple(tokenizer.prompt_ids(r.user, enable_thinking=cfg.enable_thinking)),
        )
        for r in records
    ]


def generate(cfg: GenerateConfig, *, progress: bool = True) -> dict:
    """Run (or resume, or skip if finished) one MixSD generation; returns the summary dict."""
    from mixsd_jax.data.records import read_records
    from mixsd_jax.models.registry import resolve_model
    from mixsd_jax.answers.verifier import generation_verifier
    from mixsd_jax.sampling.presets import resolve_preset

    if not cfg.input:
        raise MixsdError("generate: no input file (set --input or input=...)")
    multihost.join_writing_to(cfg.distributed, cfg.out_dir, "out_dir", cfg.storage.shared_local)
    paths = Paths.for_config(cfg)
    model_dir = resolve_model(cfg.model)
    fingerprint = run_fingerprint(cfg, model_dir)
    finished = _finished_summary(paths, fingerprint)
    if finished is not None:
        return finished

    records = read_records(cfg.input)
    if cfg.limit is not None:
        records = records[: cfg.limit]
    if not records:
        raise MixsdError(f"{cfg.input}: no records to generate from")
    preset = resolve_preset(cfg.preset, cfg.prefix, cfg.transition)
    extract_mode = cfg.extract_mode or preset.default_extract_mode
    max_retries = preset.default_max_retries if cfg.max_retries is None else cfg.max_retries
    if cfg.temperature == 0 and cfg.lambda_mix in (0.0, 1.0):
        max_retries = 0  # greedy with no Bernoulli draws: a retry would replay the same tokens
    verifier = generation_verifier(cfg.criterion, extract_mode, cfg.normalized_compare, records)

    done = _load_partial(paths, fingerprint)
    # Every process must resume from the same state, or the queues (and collectives) diverge.
    multihost.agree(f"{paths.partial}: resume state", json.dumps(sorted(done)))
    primary = multihost.is_primary()

    from mixsd_jax.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    gt_answers = [verifier.gt_answer(r.assistant, r.user) for r in records]
    prompts = _expert_naive_prompts(cfg, tokenizer, records, preset)

    def result(index: int, gen: int, text: str, meta: dict) -> dict:
        record = records[index]
        out = record.with_assistant(text).to_json()
        out.pop("mix_meta", None)
        out["mix_meta"] = {
            "lambda": cfg.lambda_mix,
            "temperature": cfg.temperature,
            "topk": cfg.topk,
            "num_generations_per_query": cfg.num_generations,
            "gen_index": gen,
            **meta,
            "max_retries": max_retries,
            "extract_mode": extract_mode,
            "criterion": cfg.criterion,
            "ground_truth_assistant": record.assistant,
            "seed": cfg.seed,
            "model": cfg.model,
            "prompt_preset": preset.name,
            "fingerprint": fingerprint,
            "record_index": index,
        }
        return out

    if primary:
        paths.final.parent.mkdir(parents=True, exist_ok=True)
        if not paths.meta.exists():
            atomic_write_json(paths.meta, {"fingerprint": fingerprint, "config": config_lib.to_dict(cfg)})
    stats = {"tokens": 0, "naive": 0, "kernel_s": 0.0, "batches": 0}
    started = time.time()
    with (JsonlAppender(paths.partial) if primary else _NoSink()) as sink:
        queue = _first_attempts(cfg, done, prompts, gt_answers, sink, result)
        if queue:
            _run_queue(cfg, model_dir, tokenizer, prompts, gt_answers, verifier, max_retries, queue, sink, result,
                       stats, progress)
    if primary:
        summary = _finalize(cfg, paths, len(records), stats, time.time() - started, fingerprint)
    multihost.barrier(f"generate finalized {paths.final}")
    return multihost.broadcast_json(summary if primary else None, f"generate summary {paths.final}")


def _first_attempts(cfg: GenerateConfig, done: set, prompts, gt_answers, sink, result) -> deque:
    """The (record, generation, attempt 0) queue of what is not done, shortest expert prompts first;
    a prompt that cannot fit or a record without a gold answer is written at once as failed."""
    queue: deque = deque()
    for index in sorted(range(len(prompts)), key=lambda i: len(prompts[i][0])):
        for gen in range(cfg.num_generations):
            if (index, gen) in done:
                continue
            if max(len(p) for p in prompts[index]) >= cfg.max_model_len:
                sink.write(result(index, gen, "", _meta(0, 0, "prompt_too_long", False, 0)))
            elif gt_answers[index] is None:
                sink.write(result(index, gen, "", _meta(0, 0, "no_gt_answer", False, 0)))
            else:
                queue.append((index, gen, 0))
    return queue


class _NoSink:
    """What a non-primary process writes its results to: nothing (process 0 writes the files)."""

    def write(self, obj: dict) -> None:
        pass

    def __enter__(self) -> "_NoSink":
        return self

    def __exit__(self, *exc) -> None:
        pass


def _meta(fraction: float, num_tokens: int, finish: str, correct: bool, attempts: int) -> dict:
    return {
        "student_token_fraction": fraction,
        "num_tokens": num_tokens,
        "finish_reason": finish,
        "correct": correct,
        "num_attempts": attempts,
    }


def _load_partial(paths: Paths, fingerprint: str) -> set[tuple[int, int]]:
    if not paths.partial.exists():
        if multihost.is_primary():
            paths.meta.unlink(missing_ok=True)
        return set()
    previous = json.loads(paths.meta.read_text()).get("fingerprint") if paths.meta.exists() else None
    if previous != fingerprint:
        raise MixsdError(
            f"{paths.partial}: partial output from different settings (fingerprint {previous}, now {fingerprint});"
            " rerun with the original settings or delete the .partial file"
        )
    return {(r["mix_meta"]["record_index"], r["mix_meta"]["gen_index"]) for r in read_partial_jsonl(paths.partial)}


def _run_queue(cfg, model_dir, tokenizer, prompts, gt_answers, verifier, max_retries, queue, sink, result, stats, progress):
    from tqdm import tqdm

    from mixsd_jax.models.checkpoint import load_hf
    from mixsd_jax.models.sharding import make_mesh
    from mixsd_jax.sampling.engine import Engine, EngineSpec
    from mixsd_jax.sampling.strategies import Sampler
    from mixsd_jax.sampling.work import WorkItem

    mesh = make_mesh(cfg.mesh)
    stats["devices"] = mesh.devices.size
    model_cfg, params = load_hf(model_dir, cfg.param_dtype, mesh=mesh)
    engine = Engine(params, EngineSpec(
        model_cfg,
        Sampler(cfg.temperature, cfg.topk),
        sides=2,
        max_new_tokens=cfg.max_new_tokens,
        max_model_len=cfg.max_model_len,
        batch_size=cfg.batch_size,
        stop_ids=tuple(tokenizer.stop_ids),
        seed=cfg.seed,
        naive_prob=cfg.lambda_mix,
        dtype=cfg.dtype,
        mesh=mesh,
    ))
    counts = {"accepted": 0, "finished": 0, "retrying": 0}
    bar = tqdm(total=len(queue), desc="mixsd generate", unit="rec", disable=not progress or not multihost.is_primary())

    # Called by the engine for each finished attempt while the device decodes the next segment.
    def on_finish(item: WorkItem, c) -> list[WorkItem]:
        index, gen, attempt = item.record_index, item.gen_index, item.attempt
        stats["tokens"] += len(c.tokens)
        stats["naive"] += sum(c.naive)
        text = tokenizer.decode(c.tokens)
        correct = verifier.check(text, gt_answers[index])
        counts["retrying"] -= attempt > 0
        if correct or attempt >= max_retries:
            fraction = sum(c.naive) / max(1, len(c.tokens))
            sink.write(result(index, gen, text, _meta(fraction, len(c.tokens), c.finish_reason, correct, attempt + 1)))
            counts["accepted"] += correct
            counts["finished"] += 1
            bar.update(1)
            bar.set_postfix(pass_rate=f"{counts['accepted'] / counts['finished']:.2f}", retry_queue=counts["retrying"])
            return []
        counts["retrying"] += 1
        return [WorkItem(prompts[index], index, gen, attempt + 1)]  # a retry takes the next free slot

    t0 = time.time()
    engine.run([WorkItem(prompts[i], i, g, a) for i, g, a in queue], on_finish)
    stats["kernel_s"] += time.time() - t0
    stats["batches"] += engine.segments_run
    bar.close()


def _finalize(cfg, paths: Paths, num_records: int, stats: dict, wall_s: float, fingerprint: str) -> dict:
    rows = read_partial_jsonl(paths.partial)
    rows.sort(key=lambda r: (r["mix_meta"]["record_index"], r["mix_meta"]["gen_index"]))
    accepted, rejected = [r for r in rows if r["mix_meta"]["correct"]], [r for r in rows if not r["mix_meta"]["correct"]]
    # keep_rejected never trains on an empty answer (prompt too long, no ground truth, instant stop).
    empty = [r for r in rejected if not r["messages"][-1]["content"].strip()]
    trainable = [r for r in rows if r["mix_meta"]["correct"] or r["messages"][-1]["content"].strip()]
    atomic_write_jsonl(paths.final, trainable if cfg.keep_rejected else accepted)
    atomic_write_jsonl(paths.rejected, empty if cfg.keep_rejected else rejected)
    generated = [r for r in rows if r["mix_meta"]["num_attempts"] > 0]
    finish = dict(Counter(r["mix_meta"]["finish_reason"] for r in rows))  # in order of first appearance
    summary = {
        "output": str(paths.final),
        "rejected_output": str(paths.rejected),
        "records": num_records,
        "generations": len(rows),
        "accepted": len(accepted),
        "rejected": len(rejected),
        "empty_answers": len(empty),  # rejected rows with no answer text: never in the training file
        "pass_rate": len(accepted) / max(1, len(rows)),
        "prompt_too_long": sum(r["mix_meta"]["finish_reason"] == "prompt_too_long" for r in rows),
        "no_gt_answer": sum(r["mix_meta"]["finish_reason"] == "no_gt_answer" for r in rows),
        "finish_reasons": finish,
        "mean_attempts": sum(r["mix_meta"]["num_attempts"] for r in generated) / max(1, len(generated)),
        "mean_naive_token_fraction": (
            sum(r["mix_meta"]["student_token_fraction"] for r in generated) / max(1, len(generated))
        ),
        "this_run": {
            "tokens_generated": stats["tokens"],
            "naive_tokens": stats["naive"],
            "kernel_seconds": round(stats["kernel_s"], 3),
            "wall_seconds": round(wall_s, 3),
            "tokens_per_s": round(stats["tokens"] / stats["kernel_s"], 2) if stats["kernel_s"] else None,
            "processes": multihost.process_count(),  # how this run was spread (not what it wrote)
            "devices": stats.get("devices"),
        },
        "fingerprint": fingerprint,
        "lambda": cfg.lambda_mix,
        "temperature": cfg.temperature,
    }
    atomic_write_json(paths.summary, summary)
    remove_partial(paths.partial)
    paths.meta.unlink(missing_ok=True)
    return summary
