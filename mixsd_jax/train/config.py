"""`TrainConfig`: everything a training run depends on, validated once at the edge.

Defaults follow the reference recipe (docs/reference.md, SFT and MixSD): AdamW lr 1e-5, weight decay 0.01,
betas 0.9/0.95, eps 1e-8, global-norm clip 1.0, global batch 16, constant LR.

Resume compatibility: `resume_fingerprint(cfg)` hashes every key that changes what a step
computes, so it leaves out the run length (`steps`, `epochs`: extending a finished run continues
it), where outputs go and how often they are logged, saved or exported, and how processes find
each other.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from mixsd_jax import config as config_lib
from mixsd_jax.errors import MixsdError
from mixsd_jax.multihost import DistributedConfig
from mixsd_jax.models.registry import EMBEDDED_DEFAULT
from mixsd_jax.storage import StorageConfig
from mixsd_jax.models.sharding import MeshConfig
from mixsd_jax.models.transformer import REMAT_POLICIES

METHODS = ("sft", "opsd")

# Keys that do not change the trained parameters: excluded from the resume fingerprint.
NOT_FINGERPRINTED = (
    "steps",
    "epochs",
    "out",
    "save_every",
    "keep",
    "export_every",
    "export_dtype",
    "log_every",
    "distributed",
    "storage",
    "async_checkpoints",
    # How the step computes, not what (the same loss and gradients to f32 round-off): a run that
    # ran out of memory may resume with more rematerialisation or smaller loss chunks.
    "remat",
    "loss_chunk",
    "attention_block",
    "attention",
)


@dataclasses.dataclass(frozen=True)
class OpsdConfig:
    """On-policy self-distillation (docs/reference.md, OPSD): per step, `batch_size` prompts get
    `num_rollouts` responses each from the current parameters; the loss is the divergence between
    the teacher (the same model with the ground truth in its user turn) and the student on those
    response tokens, over the teacher's top-`topk` tokens. Defaults are the reference's settings
    (T=1.0, top-p 1, max 8,192 new tokens, top-k 64), with forward KL, as its reported runs."""

    divergence: str = "forward"  # forward | reverse | mixed
    mixed_kl_weight: float = 0.5  # w in w*forward + (1-w)*reverse
    topk: int = 64
    teacher: Literal["base", "live"] = "base"  # frozen base weights, or the student's current ones
    prompt: str = "knowledge_base_answer"  # GT-text variant (mixsd_jax.train.teacher.TEACHER_PROMPTS)
    num_rollouts: int = 1  # responses per prompt
    temperature: float = 1.0  # 0 = greedy
    rollout_topk: int = 0  # 0 = the whole vocabulary (top-p 1, as the reference); k > 0 = top-k
    max_new_tokens: int = 8192
    rollout_batch_size: int = 64  # decode slots per kernel call
    loss_chunk: int = 1024  # response positions per LM-head chunk (bounds the [tokens, vocab] buffer)

    def __post_init__(self):
        from mixsd_jax.train.divergence import check_divergence
        from mixsd_jax.train.teacher import get_teacher_prompt

        check_divergence(self.divergence)
        get_teacher_prompt(self.prompt)
        config_lib.check_range("opsd.mixed_kl_weight", self.mixed_kl_weight, 0, 1)
        config_lib.check_range("opsd.topk", self.topk, 1)
        config_lib.check_range("opsd.num_rollouts", self.num_rollouts, 1)
        config_lib.check_range("opsd.temperature", self.temperature, 0)
        config_lib.check_range("opsd.rollout_topk", self.rollout_topk, 0)
        config_lib.check_range("opsd.max_new_tokens", self.max_new_tokens, 1)
        config_lib.check_range("opsd.rollout_batch_size", self.rollout_batch_size, 1)
        config_lib.check_range("opsd.loss_chunk", self.loss_chunk, 1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: str = ""  # messages / alpaca JSONL (ground truth for SFT, mixed targets for MixSD)
    model: str = EMBEDDED_DEFAULT  # registry name or HF-format directory
    out: str = "runs/train"
    # sft: masked NLL on the records' assistant turns (SFT on ground truth, or MixSD on mixed
    # targets); opsd: on-policy self-distillation on their prompts (the `opsd` section).
    method: Literal["sft", "opsd"] = "sft"
    opsd: OpsdConfig = OpsdConfig()
    # Run length: `steps` if > 0, else `epochs` passes over the data.
    steps: int = 0
    epochs: int = 1
    # Optimisation.
    batch_size: int = 16  # global, in sequences (or packed rows with `packing`)
    grad_accum: int = 1  # micro batches per step; batch_size must divide by it
    lr: float = 1e-5
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm clipping; 0 disables
    seed: int = 42
    # Data.
    max_seq_len: int = 1024
    overlong: Literal["drop", "truncate"] = "drop"
    packing: bool = False
    pad_to_max_len: bool = False  # every batch max_seq_len long: one compiled shape instead of a few buckets
    enable_thinking: bool = False
    system_prompt: str | None = None  # used for records without their own system turn
    # Numerics.
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights and optimizer state
    # auto: bfloat16 on accelerators and on CPUs where it was measured faster, else float32
    # (train.precision; `compute_dtype_on`).
    compute_dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    # Memory: rematerialisation of the layer scan (none | dots | full, or a jax.checkpoint_policies
    # name), tokens per LM-head chunk of the loss (-1: chunked when tokens x vocab is large, 0: dense)
    # and the block of blockwise attention (-1: blocks of 512 above 2048 tokens per row, 0: dense).
    remat: str = "none"
    loss_chunk: int = -1
    attention_block: int = -1
    # The cache-less attention's kernel: auto (Pallas splash attention on a TPU, models.flash_attention;
    # dense / blockwise elsewhere), flash (the kernel everywhere; on a CPU only in its slow interpreter) or xla.
    attention: Literal["auto", "flash", "xla"] = "auto"
    # Outputs.
    save_every: int = 0  # 0: only at the end
    keep: int = 3
    async_checkpoints: bool = True
    export_every: bool = False  # also export every saved checkpoint to out/exports/step_N
    export_dtype: Literal["float32", "bfloat16"] = "float32"
    log_every: int = 1
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    storage: StorageConfig = StorageConfig()

    def __post_init__(self):
        config_lib.check_range("steps", self.steps, 0)
        config_lib.check_range("epochs", self.epochs, 1)
        config_lib.check_range("batch_size", self.batch_size, 1)
        config_lib.check_range("grad_accum", self.grad_accum, 1)
        if self.batch_size % self.grad_accum:
            raise MixsdError(
                f"config key 'grad_accum': batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )
        config_lib.check_range("lr", self.lr, 0)
        config_lib.check_range("warmup_steps", self.warmup_steps, 0)
        config_lib.check_range("weight_decay", self.weight_decay, 0)
        config_lib.check_range("b1", self.b1, 0, 1)
        config_lib.check_range("b2", self.b2, 0, 1)
        config_lib.check_range("eps", self.eps, 0)
        config_lib.check_range("clip_norm", self.clip_norm, 0)
        config_lib.check_range("max_seq_len", self.max_seq_len, 2)
        config_lib.check_range("loss_chunk", self.loss_chunk, -1)
        config_lib.check_range("attention_block", self.attention_block, -1)
        if self.remat not in REMAT_POLICIES:
            raise MixsdError(f"config key 'remat': unknown policy {self.remat!r} (known: {', '.join(REMAT_POLICIES)})")
        config_lib.check_range("save_every", self.save_every, 0)
        config_lib.check_range("keep", self.keep, 1)
        config_lib.check_range("log_every", self.log_every, 1)

    def compute_dtype_on(self, platform: str) -> str:
        """`compute_dtype` for a mesh of `platform` devices ("auto" resolved by train.precision)."""
        from mixsd_jax.train.precision import resolve_compute_dtype

        return resolve_compute_dtype(self.compute_dtype, platform)

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


def load_train_config(path=None, overrides=()) -> TrainConfig:
    return config_lib.load(TrainConfig, path, overrides)


def not_fingerprinted(cfg: TrainConfig) -> tuple[str, ...]:
    # An SFT run does not read `method`/`opsd`: leaving them out keeps the fingerprints that SFT
    # runs (and pipeline stages) had before OPSD existed.
    return NOT_FINGERPRINTED + (("method", "opsd") if cfg.method == "sft" else ())


def resume_fingerprint(cfg: TrainConfig) -> str:
    return config_lib.fingerprint(cfg, exclude=not_fingerprinted(cfg))


def fingerprinted_dict(cfg: TrainConfig) -> dict:
    data = config_lib.to_dict(cfg)
    return {k: v for k, v in data.items() if k not in not_fingerprinted(cfg)}


def differing_keys(stored: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two fingerprinted config dicts."""
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{sub}" for sub in differing_keys(a, b)]
        elif a != b:
            out.append(key)
    return out
