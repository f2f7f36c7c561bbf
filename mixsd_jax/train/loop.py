"""The host loop: data, state, the jitted step, metrics, checkpoints, export and the run summary.

Output directory:
  checkpoints/   Orbax (state + meta), every `save_every` steps and at the end, last `keep` kept
  metrics.jsonl  one line per logged step (trimmed back to the checkpoint on resume)
  tb/            TensorBoard event files
  summary.json   steps, tokens, final loss, dropped/truncated counts, time, tokens/s, fingerprint
  hf/            the final parameters as an HF-format directory with the tokenizer files (with
                 `export_every`: the last step's export, hard-linked, or copied in a bucket)
  exports/       step_N HF directories when `export_every` is set
Only process 0 writes files other than checkpoints (Orbax coordinates those itself).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

from etils import epath

from mixsd_jax import config as config_lib
from mixsd_jax.errors import MixsdError
from mixsd_jax import storage
from mixsd_jax.files import atomic_write_json
from mixsd_jax import multihost as distributed
from mixsd_jax.train.config import TrainConfig, fingerprinted_dict, resume_fingerprint
from mixsd_jax.train.run_log import RunLog

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


@dataclasses.dataclass(frozen=True)
class Run:
    """What a training run is made of, fixed before its first step."""

    cfg: TrainConfig
    out: epath.Path
    model_dir: Path
    model_cfg: object  # models.config.ModelConfig
    data: object  # data.tokenize.TokenizedData
    plan: object  # train.batches.BatchPlan
    total_steps: int
    mesh: object  # jax.sharding.Mesh
    tx: object  # the optax optimizer
    shardings: object  # the train state's shardings
    fingerprint: str
    step_fn: Callable  # (state, batch) -> (state, metrics)
    next_batch: Callable  # (step, state) -> the step's device batch
    batch_stats: Callable[[], dict]  # host statistics of the batch just stepped on (OPSD: its rollouts)

    def meta(self, step: int, tokens_seen: int, loss: float) -> dict:
        """What a checkpoint remembers beside the state: where the data stands, and the config."""
        epoch, index = self.plan.locate(step)
        return {
            "step": step,
            "total_steps": self.total_steps,
            "fingerprint": self.fingerprint,
            "config": config_lib.to_dict(self.cfg),
            "config_fingerprinted": fingerprinted_dict(self.cfg),
            "data_position": {"next_step": step, "epoch": epoch, "batch_in_epoch": index},
            "tokens_seen": tokens_seen,
            "loss": loss,
        }


@dataclasses.dataclass
class LoopState:
    """What the loop carries from step to step (the train state itself travels beside it)."""

    start: int  # the first step this run takes (a resumed run's checkpoint step)
    tokens_before: int  # tokens seen by the runs this one resumes
    last: dict  # the latest step's metrics
    tokens: int = 0
    loss_tokens: int = 0
    timed_tokens: float = 0.0
    timed_seconds: float = 0.0
    previous: float = dataclasses.field(default_factory=time.time)

    def record(self, index: int, values: dict, now: float) -> None:
        """Counts step `index`'s tokens and time, and adds its `tokens_per_s` to `values`."""
        if index > self.start:  # the first step of a run includes compilation
            self.timed_tokens += values["tokens"]
            self.timed_seconds += now - self.previous
        values["tokens_per_s"] = values["tokens"] / max(now - self.previous, 1e-9)
        self.previous = now
        self.tokens += int(values["tokens"])
        self.loss_tokens += int(values["loss_tokens"])
        self.last = values


def train(cfg: TrainConfig, *, progress: bool = True, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train (or resume, or extend) the run in `cfg.out`; returns the run summary it also writes.

    `on_step(step, metrics)` is called on every process after each step with host floats.
    """
    distributed.join_writing_to(cfg.distributed, cfg.out, "out", cfg.storage.shared_local)

    import jax

    from mixsd_jax.train.checkpoints import Checkpoints

    started = time.time()
    primary = jax.process_index() == 0
    run = _build_run(cfg)
    ckpt = Checkpoints(run.out / "checkpoints", save_every=cfg.save_every, keep=cfg.keep,
                       async_save=cfg.async_checkpoints)
    log = None
    try:
        state, loop = _start(run, ckpt)
        log = RunLog(run.out, loop.start, run.total_steps, primary=primary, progress=progress)
        state = _run_steps(run, state, loop, ckpt, log, on_step)
        _export_final(run, state, loop.start)  # while the last save is written
        ckpt.wait()
    finally:
        if log is not None:
            log.close()
        ckpt.close()
    summary = _summary(run, loop, started)
    if primary:
        atomic_write_json(run.out / "summary.json", summary)
    return summary


def _build_run(cfg: TrainConfig) -> Run:
    """The data, model, mesh, optimizer and step of `cfg`; settings that cannot work are errors."""
    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.models.registry import resolve_model
    from mixsd_jax.models.sharding import make_mesh
    from mixsd_jax.models.tokenizer import load_tokenizer
    from mixsd_jax.train import step as step_lib

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
    # `auto` resolved before the fingerprint, so a checkpoint names the dtype its steps ran in: a
    # resume where `auto` picks another (another CPU kind) is refused, not continued in a mix.
    cfg = dataclasses.replace(cfg, compute_dtype=cfg.compute_dtype_on(step_lib.platform_of(mesh)))
    _check_micro_batch(cfg, mesh)
    opt = step_lib.OptimConfig.from_train_config(cfg, total_steps)
    tx = step_lib.make_optimizer(opt)
    shardings = step_lib.state_shardings(model_cfg, tx, mesh)
    fingerprint = resume_fingerprint(cfg)
    # The method: which loss the shared step minimises and what a step's batch is.
    if cfg.method == "opsd":
        step_fn, next_batch, batch_stats = opsd.method(cfg, tokenizer, opsd_prompts, plan, model_dir, model_cfg,
                                                       mesh, opt)
    else:
        step_fn = step_lib.jit_train_step(model_cfg, opt, mesh, cfg.compute_dtype,
                                          step_lib.StepOptions.from_train_config(cfg))
        next_batch = lambda step, state: step_lib.device_batch(plan.host_batch(step), mesh)  # noqa: E731
        batch_stats = dict
    return Run(cfg, storage.path(cfg.out), model_dir, model_cfg, data, plan, total_steps, mesh, tx, shardings,
               fingerprint, step_fn, next_batch, batch_stats)


def _check_micro_batch(cfg: TrainConfig, mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rollouts = cfg.opsd.num_rollouts if cfg.method == "opsd" else 1  # OPSD rows: prompts x rollouts
    if cfg.micro_batch * rollouts % shards:
        raise MixsdError(
            f"config key 'batch_size': the micro batch ({cfg.batch_size} / grad_accum {cfg.grad_accum} = "
            f"{cfg.micro_batch}{f' x {rollouts} rollouts' if rollouts > 1 else ''}) must be divisible by the "
            f"mesh's data x fsdp = {shards} devices"
        )


def _start(run: Run, ckpt):
    """(state, loop state) at the latest compatible checkpoint, else at the base model."""
    state, start, tokens_before, last = _restore_or_init(run.cfg, ckpt, run.model_dir, run.model_cfg, run.tx,
                                                         run.shardings, run.mesh)
    if start > run.total_steps:
        raise MixsdError(
            f"{ckpt.directory}: the latest checkpoint is at step {start}, past this run's {run.total_steps} steps; "
            "raise steps/epochs or use another `out` directory"
        )
    return state, LoopState(start, tokens_before, last)


def _run_steps(run: Run, state, loop: LoopState, ckpt, log: "RunLog", on_step):
    """Steps `loop.start` .. `total_steps`: each logged, checkpointed (and exported) on schedule."""
    import jax

    total = run.total_steps
    batch = run.next_batch(loop.start, state) if loop.start < total else None
    loop.previous = time.time()
    for index in range(loop.start, total):
        stats = run.batch_stats()  # of this step's batch (OPSD: its rollouts)
        state, metrics = run.step_fn(state, batch)
        if index + 1 < total:  # build the next batch while the device works
            batch = run.next_batch(index + 1, state)
        values = {k: float(v) for k, v in jax.device_get(metrics).items()} | stats
        now = time.time()
        done = index + 1
        _check_finite(values, done, ckpt)
        loop.record(index, values, now)
        if done % run.cfg.log_every == 0 or done == total:
            log.write(done, run.plan.locate(index)[0], values)
        log.advance(values["loss"])
        if on_step is not None:
            on_step(done, values)
        _save(run, state, done, loop.tokens_before + loop.tokens, values["loss"], ckpt)
    return state


def _check_finite(values: dict, done: int, ckpt) -> None:
    """A non-finite loss or gradient stops the run before that step is saved."""
    if math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"]):
        return
    ckpt.wait()
    good = ckpt.latest_step()
    kept = "no checkpoint was saved" if good is None else f"last good checkpoint: step {good} in {ckpt.directory}"
    raise MixsdError(
        f"non-finite loss {values['loss']} (grad norm {values['grad_norm']}) at step {done}: stopped "
        f"without saving that step; {kept} (try a lower lr)"
    )


def _save(run: Run, state, done: int, tokens_seen: int, loss: float, ckpt) -> None:
    """The checkpoint of step `done` when it is due (always the last), and its HF export when
    `export_every` asks for one."""
    from mixsd_jax.models.checkpoint import export_hf

    saved = ckpt.save(done, state, run.meta(done, tokens_seen, loss), force=done == run.total_steps)
    if saved and run.cfg.export_every:
        export_hf(state.params, run.model_cfg, run.out / "exports" / f"step_{done}", tokenizer_dir=run.model_dir,
                  dtype=run.cfg.export_dtype)


def _export_final(run: Run, state, start: int) -> None:
    """`out/hf`: written after steps were taken, or when a finished run's export is missing. When
    this run's steps ended in an export of the last step (`export_every`: the last save always
    exports), `hf` is a copy of it: the same bytes without gathering and serializing the weights
    again (a local copy is hard links). The choice follows from the config and the steps alone, so
    every process makes the same one (an export's gathers are collectives)."""
    import jax

    from mixsd_jax.models.checkpoint import copy_export, export_hf, export_is_complete

    hf_dir = run.out / "hf"
    if start < run.total_steps and run.cfg.export_every:
        if jax.process_index() == 0:
            copy_export(run.out / "exports" / f"step_{run.total_steps}", hf_dir)
    elif start < run.total_steps or not export_is_complete(hf_dir):
        export_hf(state.params, run.model_cfg, hf_dir, tokenizer_dir=run.model_dir, dtype=run.cfg.export_dtype)


def _summary(run: Run, loop: LoopState, started: float) -> dict:
    import jax

    cfg, data, plan = run.cfg, run.data, run.plan
    return {
        "steps": run.total_steps,
        "start_step": loop.start,
        "steps_this_run": run.total_steps - loop.start,
        "records": data.num_records,
        "examples": len(data.examples),
        "dropped_overlong": data.dropped_overlong,
        "truncated": data.truncated,
        "epochs": cfg.epochs if not cfg.steps else None,
        "steps_per_epoch": plan.steps_in_epoch(0),
        "tokens": loop.tokens,
        "loss_tokens": loop.loss_tokens,
        "tokens_seen": loop.tokens_before + loop.tokens,
        "final_loss": loop.last.get("loss"),
        "final_accuracy": loop.last.get("accuracy"),
        "time_s": round(time.time() - started, 3),
        "train_time_s": round(loop.timed_seconds, 3),
        "tokens_per_s": round(loop.timed_tokens / loop.timed_seconds, 2) if loop.timed_seconds > 0 else None,
        "fingerprint": run.fingerprint,
        "processes": jax.process_count(),
        "devices": run.mesh.size,
        "model": str(cfg.model),
        "model_dir": str(run.model_dir),
        "data": str(cfg.data),
        "checkpoints": str(run.out / "checkpoints"),
        "hf": str(run.out / "hf"),
    }


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
