"""OPSD (on-policy self-distillation, docs/reference.md, OPSD) as a loss and a batch source of the
one training loop.

Per step k: the step's prompts (the same seed-determined order as SFT's records) get
`num_rollouts` responses each from the *current* parameters, through the sampling package's
decode engine (`sampling.engine`); rollout r of prompt i uses the key fold_in(seed, i, r, k), so a
rollout does not depend on batch slots, devices or resumes. Each (prompt, response) becomes two
rows: the student's (prompt + response) and the teacher's (the prompt with the ground truth in
its user turn, `teacher.teacher_ids`, + the same response). The loss (`OpsdLoss`) is the top-k
divergence between the teacher's and the student's next-token distributions at the response
tokens, a masked token mean over the global batch; the teacher is the frozen base model (its own
parameters, passed to the step unchanged) or, with `teacher: live`, the student's current
parameters under stop_gradient.

Batch arrays [A, M, ...] (A accumulation micro batches of M rows):
  tokens, positions, segment_ids                      [A, M, Ts]  student inputs
  teacher_tokens, teacher_positions, teacher_segment_ids [A, M, Tt]  teacher inputs
  student_index, teacher_index                        [A, M, R]   input position predicting response token j
  loss_mask                                           [A, M, R]   1 on real response tokens
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixsd_jax.errors import MixsdError
from mixsd_jax.models.config import ModelConfig
from mixsd_jax.models.transformer import forward, lm_logits
from mixsd_jax.train.divergence import topk_divergence
from mixsd_jax.train import teacher as teacher_lib
from mixsd_jax.train import step as step_lib

OPSD_KEYS = (
    "tokens",
    "positions",
    "segment_ids",
    "teacher_tokens",
    "teacher_positions",
    "teacher_segment_ids",
    "student_index",
    "teacher_index",
    "loss_mask",
)


# ----------------------------------------------------------------------------- the loss


@dataclasses.dataclass(frozen=True)
class OpsdLoss:
    """The OPSD micro-batch loss for the shared train step (hashable: part of the jit cache key).

    Called as `loss(params, model_cfg, micro, compute_dtype, options, teacher_params=None)` and returns
    (sum of per-token divergences, (response tokens, tokens where student and teacher argmax
    agree)), like the SFT NLL's (sum, (count, correct)).
    """

    divergence: str = "forward"
    topk: int = 64
    mixed_weight: float = 0.5
    frozen_teacher: bool = True  # False: teacher = the live student parameters
    chunk: int = 1024

    batch_keys = OPSD_KEYS

    def __call__(self, params, model_cfg: ModelConfig, micro, compute_dtype, options, teacher_params=None):
        teacher = jax.lax.stop_gradient(params if teacher_params is None else teacher_params)

        def hidden(p, tokens, positions, segment_ids):  # the step's remat, attention blocks and layout
            return forward(p, model_cfg, tokens, positions, segment_ids, dtype=compute_dtype, remat=options.remat,
                           attention_block=options.attention_block_for(tokens.shape[-1]),
                           activation_sharding=options.activations, fused_attention=options.fused_attention)[0]

        hidden_s = hidden(params, micro["tokens"], micro["positions"], micro["segment_ids"])
        hidden_t = hidden(teacher, micro["teacher_tokens"], micro["teacher_positions"], micro["teacher_segment_ids"])
        # Only the response positions reach the LM head: [M, R, D], not [M, T, D].
        hs_MxRxD = jnp.take_along_axis(hidden_s, micro["student_index"][..., None], axis=1)
        ht_MxRxD = jax.lax.stop_gradient(jnp.take_along_axis(hidden_t, micro["teacher_index"][..., None], axis=1))
        mask_MxR = micro["loss_mask"].astype(jnp.float32)
        M, R, D = hs_MxRxD.shape
        chunk = min(self.chunk, R)
        if R % chunk:
            raise ValueError(f"response width {R} is not a multiple of the loss chunk {chunk}")

        # The [rows, chunk, vocab] logits exist one chunk at a time, recomputed in the backward pass.
        @jax.checkpoint
        def chunk_sums(hs, ht, mask):
            logits_s = lm_logits(params, model_cfg, hs, dtype=compute_dtype)
            logits_t = lm_logits(teacher, model_cfg, ht, dtype=compute_dtype)
            per = topk_divergence(logits_s, logits_t, kind=self.divergence, k=self.topk, mixed_weight=self.mixed_weight)
            agree = jnp.argmax(logits_s, axis=-1) == jnp.argmax(logits_t, axis=-1)
            return jnp.sum(per * mask), jnp.sum(agree * mask)

        if chunk == R:
            div_sum, agree = chunk_sums(hs_MxRxD, ht_MxRxD, mask_MxR)
        else:
            split = lambda x: jnp.moveaxis(x.reshape(M, R // chunk, chunk, *x.shape[2:]), 1, 0)

            def body(carry, xs):
                d, a = chunk_sums(*xs)
                return (carry[0] + d, carry[1] + a), None

            (div_sum, agree), _ = jax.lax.scan(
                body, (jnp.float32(0), jnp.float32(0)), (split(hs_MxRxD), split(ht_MxRxD), split(mask_MxR))
            )
        return div_sum, (jnp.sum(mask_MxR), agree)


def loss_for(cfg) -> OpsdLoss:
    o = cfg.opsd
    return OpsdLoss(o.divergence, o.topk, o.mixed_kl_weight, frozen_teacher=o.teacher == "base", chunk=o.loss_chunk)


def mean_divergence(params, teacher_params, model_cfg: ModelConfig, batch, loss: OpsdLoss, compute_dtype="float32"):
    """(mean divergence, response tokens) of a host batch without an update: the measure that
    OPSD lowers, for tests and analyses."""
    total, count = divergence_fn(loss, model_cfg, compute_dtype)(
        params, teacher_params, {k: jnp.asarray(v) for k, v in batch.items()})
    return float(total) / max(float(count), 1.0), float(count)


@functools.lru_cache(maxsize=8)
def divergence_fn(loss: OpsdLoss, model_cfg: ModelConfig, compute_dtype: str = "float32"):
    """jit(params, teacher_params, batch [A, M, ...]) -> (divergence sum, response tokens): both
    forwards and the loss, no gradient (`teacher_params=None`: the student is its own teacher)."""

    def run(params, teacher, batch):
        total, count = jnp.float32(0), jnp.float32(0)
        for a in range(batch["tokens"].shape[0]):
            micro = jax.tree.map(lambda x: x[a], batch)
            d, (n, _) = loss(params, model_cfg, micro, jnp.dtype(compute_dtype), step_lib.StepOptions(), teacher)
            total, count = total + d, count + n
        return total, count

    return jax.jit(run)


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class OpsdPrompt:
    ids: tuple[int, ...]  # the student prompt (chat template + generation prompt)
    gt: str  # the GT text for the teacher
    record_index: int
    where: str


# Teacher tokens every rollout leaves free under max_seq_len besides the omission marker: a rollout
# that runs to the length limit still leaves room for a cut GT text, so one long response cannot
# stop a long run (the reference's teacher would have nothing left to add).
MIN_GT_TOKENS = 32


def rollout_limit(cfg, tokenizer) -> int:
    """The longest student sequence (prompt + response) a rollout may reach."""
    return cfg.max_seq_len - len(tokenizer.encode(teacher_lib.OMISSION_MARKER)) - MIN_GT_TOKENS


def prepare_prompts(cfg, tokenizer, records, source: str):
    """Student prompts and GT texts of the records, plus a TokenizedData of prompt examples for
    the shared BatchPlan (its `.length` is what packing or ordering would read). A prompt that
    leaves no room for a response and a cut GT text under max_seq_len is dropped (and counted)."""
    from mixsd_jax.data.tokenize import Example, TokenizedData, conversation

    prompt_style = teacher_lib.get_teacher_prompt(cfg.opsd.prompt)
    end_ids = teacher_lib.end_of_user_ids(tokenizer)
    prompts, examples, dropped = [], [], 0
    limit = rollout_limit(cfg, tokenizer)
    texts = [tokenizer.render(conversation(r, cfg.system_prompt), add_generation_prompt=True,
                              enable_thinking=cfg.enable_thinking) for r in records]
    for index, (record, text) in enumerate(zip(records, texts)):
        where = f"{source}: record {index + 1}"
        gt = teacher_lib.gt_text(prompt_style, record.assistant, record.clear_answer, where=where)
        ids = tokenizer.encode(text)
        teacher_lib.split_prompt(ids, end_ids)  # fails early for a template without the marker
        if len(ids) + 1 > limit:  # not even one response token (and the GT text) fits
            dropped += 1
            continue
        prompts.append(OpsdPrompt(tuple(ids), gt, index, where))
        examples.append(Example(np.asarray(ids + [0], np.int32), np.zeros(len(ids) + 1, bool), index))
    return prompts, TokenizedData(examples, len(records), dropped, 0)


def _bucket(n: int, cap: int, multiple: int = 1) -> int:
    from mixsd_jax.train.batches import batch_width

    width = batch_width(max(n, 1), cap)
    return -(-width // multiple) * multiple if width > multiple else width


class RolloutBatches:
    """Step k's OPSD batch from the current parameters: rollouts, teacher inputs, host arrays."""

    def __init__(self, cfg, tokenizer, prompts: Sequence[OpsdPrompt], plan, model_cfg: ModelConfig, mesh):
        self.cfg, self.tokenizer, self.prompts, self.plan = cfg, tokenizer, list(prompts), plan
        self.model_cfg, self.mesh = model_cfg, mesh
        self.end_ids = teacher_lib.end_of_user_ids(tokenizer)
        self.stats: dict = {}

    def rollouts(self, step: int, params) -> list[tuple[OpsdPrompt, list[int], str]]:
        """(prompt, response ids with the stop token, finish reason) for every rollout of step k."""
        # The decode engine (continuous batching). Rollout (prompt, r) at step k draws from the key
        # fold_in(seed, record, r, k), whatever its slot, so the rollouts do not depend on
        # `rollout_batch_size` (test_rollouts_depend_only_on_...).
        from mixsd_jax.sampling.engine import Engine, EngineSpec, decode_all
        from mixsd_jax.sampling.strategies import Sampler
        from mixsd_jax.sampling.work import WorkItem

        o = self.cfg.opsd
        rows = self.plan.batch_rows(step)
        work = [(self.prompts[row[0]], r) for row in rows if row for r in range(o.num_rollouts)]
        items = [WorkItem((p.ids,), record_index=p.record_index, gen_index=r, attempt=step) for p, r in work]
        engine = Engine(params, EngineSpec(
            self.model_cfg,
            Sampler(o.temperature, o.rollout_topk or self.model_cfg.vocab_size),
            sides=1,
            max_new_tokens=o.max_new_tokens,
            max_model_len=rollout_limit(self.cfg, self.tokenizer),
            batch_size=min(o.rollout_batch_size, len(items)),
            stop_ids=tuple(self.tokenizer.stop_ids),
            seed=self.cfg.seed,
            dtype=self.cfg.compute_dtype_on(step_lib.platform_of(self.mesh)),
            mesh=self.mesh,
        ))
        return [(prompt, list(done.tokens), done.finish_reason) for (prompt, _), done in zip(work, decode_all(engine, items))]

    def host_batch(self, step: int, params) -> dict[str, np.ndarray]:
        jax.block_until_ready(params)  # the previous update: not part of the rollout time
        started = time.perf_counter()
        rolled = self.rollouts(step, params)
        rollout_s = time.perf_counter() - started
        budget = self.cfg.max_seq_len
        students, teachers, responses = [], [], []
        for prompt, response, _ in rolled:
            students.append(list(prompt.ids) + response)
            teachers.append(teacher_lib.teacher_ids(self.tokenizer, prompt.ids, response, prompt.gt, budget,
                                                    self.end_ids, where=prompt.where))
            responses.append(len(response))
        o = self.cfg.opsd
        rows = self.cfg.batch_size * o.num_rollouts
        if self.cfg.pad_to_max_len:
            Ts = Tt = budget
            R = min(o.max_new_tokens, budget)
            R = -(-R // min(o.loss_chunk, R)) * min(o.loss_chunk, R)
        else:
            Ts = _bucket(max(len(s) - 1 for s in students), budget)
            Tt = _bucket(max(len(t) - 1 for t in teachers), budget)
            R = _bucket(max(responses), budget, o.loss_chunk)
        widths = dict.fromkeys(OPSD_KEYS[:3], Ts) | dict.fromkeys(OPSD_KEYS[3:6], Tt) | dict.fromkeys(OPSD_KEYS[6:], R)
        arrays = {key: np.zeros((rows, width), np.float32 if key == "loss_mask" else np.int32)
                  for key, width in widths.items()}
        for b, (s, t, n) in enumerate(zip(students, teachers, responses)):
            for prefix, seq in (("", s), ("teacher_", t)):
                L = len(seq) - 1
                arrays[f"{prefix}tokens"][b, :L] = seq[:-1]
                arrays[f"{prefix}positions"][b, :L] = np.arange(L)
                arrays[f"{prefix}segment_ids"][b, :L] = 1
            arrays["student_index"][b, :n] = np.arange(len(s) - n - 1, len(s) - 1)
            arrays["teacher_index"][b, :n] = np.arange(len(t) - n - 1, len(t) - 1)
            arrays["loss_mask"][b, :n] = 1.0
        generated = int(sum(responses))
        self.stats = {
            "rollout_s": rollout_s,
            "rollout_tokens": generated,
            "rollout_tokens_per_s": generated / max(rollout_s, 1e-9),
            "teacher_tokens": int(sum(len(t) - 1 for t in teachers)),
            "mean_response_tokens": generated / max(len(responses), 1),
            "stopped": sum(reason == "stop" for _, _, reason in rolled) / max(len(rolled), 1),
        }
        A = self.cfg.grad_accum
        return {key: value.reshape(A, rows // A, *value.shape[1:]) for key, value in arrays.items()}


# ----------------------------------------------------------------------------- the loop's hooks


def prepare(cfg, tokenizer):
    """(TokenizedData of prompts, BatchPlan over them, the prompts) of `cfg.data`."""
    from mixsd_jax.data.grain_source import training_records
    from mixsd_jax.train.batches import BatchPlan

    if not cfg.data:
        raise MixsdError("config key 'data': required (a messages/alpaca JSONL file with ground-truth answers)")
    records = training_records(cfg.data)
    prompts, data = prepare_prompts(cfg, tokenizer, records, str(cfg.data))
    if not prompts:
        raise MixsdError(
            f"{cfg.data}: the OPSD teacher input cannot fit: all {data.num_records} prompts leave no room for a "
            f"response and the ground truth (at least {MIN_GT_TOKENS} tokens and the omission marker) in "
            f"max_seq_len={cfg.max_seq_len}; raise max_seq_len"
        )
    plan = BatchPlan(data.examples, batch_size=cfg.batch_size, grad_accum=1, seed=cfg.seed,
                     max_seq_len=cfg.max_seq_len)
    return data, plan, prompts


def method(cfg, tokenizer, prompts, plan, model_dir, model_cfg, mesh, opt):
    """(step_fn(state, batch), next_batch(step, state), stats()) for the shared loop."""
    from mixsd_jax.models.checkpoint import load_hf

    loss = loss_for(cfg)
    dtype = cfg.compute_dtype_on(step_lib.platform_of(mesh))
    jitted = step_lib.jit_train_step(model_cfg, opt, mesh, dtype,
                                     step_lib.StepOptions.from_train_config(cfg), loss=loss)
    if loss.frozen_teacher:
        # The base weights stay as loaded (not part of the state: a resume reloads the same bytes).
        _, teacher = load_hf(model_dir, param_dtype=cfg.param_dtype, mesh=mesh)
        step_fn = lambda state, batch: jitted(state, batch, teacher)  # noqa: E731
    else:
        step_fn = jitted
    batches = RolloutBatches(cfg, tokenizer, prompts, plan, model_cfg, mesh)

    def next_batch(step, state):
        return step_lib.device_batch(batches.host_batch(step, state.params), mesh)

    return step_fn, next_batch, lambda: dict(batches.stats)
