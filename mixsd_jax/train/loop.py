"""The host loop: data, state, the jitted step, metrics, checkpoints, export and the run summary.

Output directory:
  checkpoints/   Orbax (state + meta), every `save_every` steps and at the end, last `keep` kept
  metrics.jsonl  one line per logged step (trimmed back to the checkpoint on resume)
  tb/            TensorBoard event files
  summary.json   steps, tokens, final loss, dropped/truncated counts, time, tokens/s, fingerprint
  hf/            the final parameters as an HF-format directory with the tokenizer files
  exports/       step_N HF directories when `export_every` is set
Only process 0 writes files other than checkpoints (Orbax coordinates those itself).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

from mixsd_jax import config as config_lib
from mixsd_jax.errors import MixsdError
from mixsd_jax import storage
from mixsd_jax.files import JsonlAppender, atomic_write_json, atomic_write_jsonl, read_partial_jsonl, remove_partial
from mixsd_jax import multihost as distributed
from mixsd_jax.train.config import TrainConfig, fingerprinted_dict, resume_fingerprint

METRIC_KEYS = ("loss", "accuracy", "grad_norm", "lr", "tokens", "loss_tokens")
# OPSD rows also log their rollouts (`loss` is then the divergence, `accuracy` the share of
# response tokens where student and teacher argmax agree).
OPSD_METRIC_KEYS = ("rollout_tokens", "rollout_s", "rollout_tokens_per_s", "teacher_tokens", "mean_response_tokens",
                    "stopped")


def prepare_data(cfg: TrainConfig, tokenizer):
    """Records of `cfg.data` tokenized into a BatchPlan; bad or unusable data is a MixsdError."""
    from mixsd_jax.data.grain_source import training_records
    from mixsd_jax.data.tokenize import tokenize_records
    from mixsd_jax.train.batches import BatchPlan

    if not cfg.data:
        raise MixsdError("config key 'data': required (a messages/alpaca JSONL file or a TFDS dataset directory)")
    records = training_records(cfg.data)
    data = tokenize_records(
        tokenizer,
        records,
        max_seq_len=cfg.max_seq_len,
        overlong=cfg.overlong,
        enable_thinking=cfg.enable_thinking,
        system_prompt=cfg.system_prompt,
    )
    if not data.examples:
        raise MixsdError(
            f"{cfg.data}: all {data.num_records} records are longer than max_seq_len={cfg.max_seq_len} tokens "
            f"(overlong={cfg.overlong}); raise max_seq_len or set overlong=truncate"
        )
    plan = BatchPlan(
        data.examples,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        seed=cfg.seed,
        max_seq_len=cfg.max_seq_len,
        packing=cfg.packing,
        pad_to_max=cfg.pad_to_max_len,
    )
    return data, plan


def train(cfg: TrainConfig, *, progress: bool = True, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train (or resume, or extend) the run in `cfg.out`; returns the run summary it also writes.

    `on_step(step, metrics)` is called on every process after each step with host floats.
    """
    distributed.join_writing_to(cfg.distributed, cfg.out, "out", cfg.storage.shared_local)

    import jax

    from mixsd_jax.models.checkpoint import export_hf, export_is_complete
    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.models.registry import resolve_model
    from mixsd_jax.models.sharding import make_mesh
    from mixsd_jax.models.tokenizer import load_tokenizer
    from mixsd_jax.train import step as step_lib
    from mixsd_jax.train.checkpoints import Checkpoints

    started = time.time()
    primary = jax.process_index() == 0
    out = storage.path(cfg.out)
    model_dir = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    if cfg.method == "opsd":  # prompts only: the targets are rolled out during training
        from mixsd_jax.train import opsd

        data, plan, opsd_prompts = opsd.prepare(cfg, tokenizer)
    else:
        data, plan = prepare_data(cfg, tokenizer)
    model_cfg = ModelConfig.from_hf_dir(model_dir)
    largest_id = max(int(ex.ids.max()) for ex in data.examples)
    if largest_id >= model_cfg.vocab_size:
        raise MixsdError(
            f"{model_dir}: the tokenizer produced id {largest_id} but the model's vocab_size is {model_cfg.vocab_size}"
        )
    total_steps = cfg.steps or plan.total_steps(cfg.epochs)

    mesh = make_mesh(cfg.mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rollouts = cfg.opsd.num_rollouts if cfg.method == "opsd" else 1  # OPSD rows: prompts x rollouts
    if cfg.micro_batch * rollouts % shards:
        raise MixsdError(
            f"config key 'batch_size': the micro batch ({cfg.batch_size} / grad_accum {cfg.grad_accum} = "
            f"{cfg.micro_batch}{f' x {rollouts} rollouts' if rollouts > 1 else ''}) must be divisible by the "
            f"mesh's data x fsdp = {shards} devices"
        )
    opt = step_lib.OptimConfig.from_train_config(cfg, total_steps)
    tx = step_lib.make_optimizer(opt)
    shardings = step_lib.state_shardings(model_cfg, tx, mesh)
    fingerprint = resume_fingerprint(cfg)

    def meta_for(step: int, tokens_seen: int, loss: float) -> dict:
        epoch, index = plan.locate(step)
        return {
            "step": step,
            "total_steps": total_steps,
            "fingerprint": fingerprint,
            "config": config_lib.to_dict(cfg),
            "config_fingerprinted": fingerprinted_dict(cfg),
            "data_position": {"next_step": step, "epoch": epoch, "batch_in_epoch": index},
            "tokens_seen": tokens_seen,
            "loss": loss,
        }

    # The method: which loss the shared step minimises and what a step's batch is.
    if cfg.method == "opsd":
        step_fn, next_batch, batch_stats = opsd.method(cfg, tokenizer, opsd_prompts, plan, model_dir, model_cfg,
                                                       mesh, opt)
    else:
        step_fn = step_lib.jit_train_step(model_cfg, opt, mesh, cfg.compute_dtype,
                                          step_lib.StepOptions.from_train_config(cfg))
        next_batch = lambda step, state: step_lib.device_batch(plan.host_batch(step), mesh)  # noqa: E731
        batch_stats = dict
    tokens_run = loss_tokens_run = 0
    timed_tokens, timed_seconds = 0.0, 0.0
    ckpt = Checkpoints(out / "checkpoints", save_every=cfg.save_every, keep=cfg.keep, async_save=cfg.async_checkpoints)
    log = None
    try:
        state, start, tokens_before, last = _restore_or_init(cfg, ckpt, model_dir, model_cfg, tx, shardings, mesh)
        if start > total_steps:
            raise MixsdError(
                f"{ckpt.directory}: the latest checkpoint is at step {start}, past this run's {total_steps} steps; "
                "raise steps/epochs or use another `out` directory"
            )
        log = RunLog(out, start, total_steps, primary=primary, progress=progress)
        batch = next_batch(start, state) if start < total_steps else None
        previous = time.time()
        for index in range(start, total_steps):
            stats = batch_stats()  # of this step's batch (OPSD: its rollouts)
            state, metrics = step_fn(state, batch)
            if index + 1 < total_steps:  # build the next batch while the device works
                batch = next_batch(index + 1, state)
            values = {k: float(v) for k, v in jax.device_get(metrics).items()} | stats
            now = time.time()
            done = index + 1
            if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
                ckpt.wait()
                good = ckpt.latest_step()
                kept = "no checkpoint was saved" if good is None else f"last good checkpoint: step {good} in {ckpt.directory}"
                raise MixsdError(
                    f"non-finite loss {values['loss']} (grad norm {values['grad_norm']}) at step {done}: stopped "
                    f"without saving that step; {kept} (try a lower lr)"
                )
            if index > start:  # the first step of a run includes compilation
                timed_tokens += values["tokens"]
                timed_seconds += now - previous
            values["tokens_per_s"] = values["tokens"] / max(now - previous, 1e-9)
            previous = now
            tokens_run += int(values["tokens"])
            loss_tokens_run += int(values["loss_tokens"])
            last = values
            if done % cfg.log_every == 0 or done == total_steps:
                log.write(done, plan.locate(index)[0], values)
            log.advance(values["loss"])
            if on_step is not None:
                on_step(done, values)
            meta = meta_for(done, tokens_before + tokens_run, values["loss"])
            saved = ckpt.save(done, state, meta, force=done == total_steps)
            if saved and cfg.export_every:
                export_hf(state.params, model_cfg, out / "exports" / f"step_{done}", tokenizer_dir=model_dir,
                          dtype=cfg.export_dtype)
        hf_dir = out / "hf"
        if start < total_steps or not export_is_complete(hf_dir):  # while the last save is written
            export_hf(state.params, model_cfg, hf_dir, tokenizer_dir=model_dir, dtype=cfg.export_dtype)
        ckpt.wait()
    finally:
        if log is not None:
            log.close()
        ckpt.close()

    summary = {
        "steps": total_steps,
        "start_step": start,
        "steps_this_run": total_steps - start,
        "records": data.num_records,
        "examples": len(data.examples),
        "dropped_overlong": data.dropped_overlong,
        "truncated": data.truncated,
        "epochs": cfg.epochs if not cfg.steps else None,
        "steps_per_epoch": plan.steps_in_epoch(0),
        "tokens": tokens_run,
        "loss_tokens": loss_tokens_run,
        "tokens_seen": tokens_before + tokens_run,
        "final_loss": last.get("loss"),
        "final_accuracy": last.get("accuracy"),
        "time_s": round(time.time() - started, 3),
        "train_time_s": round(timed_seconds, 3),
        "tokens_per_s": round(timed_tokens / timed_seconds, 2) if timed_seconds > 0 else None,
        "fingerprint": fingerprint,
        "processes": jax.process_count(),
        "devices": mesh.size,
        "model": str(cfg.model),
        "model_dir": str(model_dir),
        "data": str(cfg.data),
        "checkpoints": str(out / "checkpoints"),
        "hf": str(out / "hf"),
    }
    if primary:
        atomic_write_json(out / "summary.json", summary)
    return summary


def _restore_or_init(cfg, ckpt, model_dir, model_cfg, tx, shardings, mesh):
    """(state, start step, tokens seen before, last metrics) from the latest checkpoint of a
    compatible run, else from the base model's weights."""
    from mixsd_jax.models.checkpoint import load_hf
    from mixsd_jax.train import step as step_lib
    from mixsd_jax.train.checkpoints import check_compatible

    latest = ckpt.latest_step()
    if latest is None:
        _, params = load_hf(model_dir, param_dtype=cfg.param_dtype, mesh=mesh)
        return step_lib.init_state(params, tx, shardings), 0, 0, {}
    check_compatible(ckpt, latest, cfg)
    target = step_lib.abstract_state(model_cfg, tx, shardings, cfg.param_dtype)
    state, meta = ckpt.restore(latest, target)
    return state, latest, int(meta.get("tokens_seen", 0)), {"loss": meta.get("loss")}


class RunLog:
    """metrics.jsonl, TensorBoard scalars and the progress bar; only process 0 writes files."""

    def __init__(self, out: Path, start: int, total: int, *, primary: bool, progress: bool):
        self.metrics = self.tb = None
        if primary:
            self.metrics = _metrics_appender(out / "metrics.jsonl", start)
            if not storage.is_url(out):  # tensorboardX's bucket writer needs google-cloud-storage: metrics.jsonl only
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
        self.bar = None
        if progress and primary:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def write(self, step: int, epoch: int, values: dict) -> None:
        if self.metrics is None:
            return
        row = {"step": step, "epoch": epoch, **{k: values[k] for k in (*METRIC_KEYS, "tokens_per_s")},
               **{k: values[k] for k in OPSD_METRIC_KEYS if k in values}}
        self.metrics.write(row)
        for key, value in row.items():
            if key != "step" and self.tb is not None:
                self.tb.add_scalar(f"train/{key}", value, step)

    def advance(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        for item in (self.bar, self.metrics, self.tb):
            if item is not None:
                item.close()


def _metrics_appender(path: Path, start: int) -> JsonlAppender:
    """An appender positioned after `start`: lines a killed run wrote past its last checkpoint are
    dropped, so the file tells the history of the parameters actually kept."""
    if not path.exists():
        return JsonlAppender(path)
    kept = [row for row in read_partial_jsonl(path) if row.get("step", 0) <= start]
    if not storage.is_url(path):
        atomic_write_jsonl(path, kept)
        return JsonlAppender(path)
    remove_partial(path)  # a bucket stream is rewritten as one chunk of the kept rows
    appender = JsonlAppender(path)
    for row in kept:
        appender.write(row)
    appender.flush()
    return appender
