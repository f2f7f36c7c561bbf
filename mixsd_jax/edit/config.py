"""`EditConfig`: one model edit (MEMIT) of a corpus's facts, and its per-model defaults.

The defaults are the reference's MEMIT settings (REFERENCE.md §3.5): rewrite the MLP down-projection
of a band of early-middle layers, the fact token is the subject's last, 25 Adam steps at lr 0.5 for
each target value with a KL term of weight 0.0625, second moments weighted 15000, the loss read at
the last layer. The edited band comes from the paper's model when the model is one of them, else
from the depth (the same fractions of the stack: about 11% to 39%).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from mixsd_jax import config as config_lib
from mixsd_jax.errors import MixsdError
from mixsd_jax.models.sharding import MeshConfig

# Families whose layers our MEMIT knows (the MLP down-projection is `layers.w_down`).
MEMIT_FAMILIES = ("llama", "qwen2", "qwen3", "gemma3_text")

# The paper's models, told apart by (family, layers, hidden size) so a local directory of any name
# gets its reference band: first and last edited layer, inclusive.
REFERENCE_LAYERS = {
    ("qwen3", 36, 4096): (4, 14),  # Qwen3-8B
    ("qwen3", 36, 2560): (4, 14),  # Qwen3-4B-Instruct-2507
    ("qwen3", 28, 2048): (3, 11),  # Qwen3-1.7B
    ("qwen3", 28, 1024): (3, 11),  # Qwen3-0.6B
    ("llama", 28, 3072): (3, 11),  # Llama-3.2-3B
    ("llama", 16, 2048): (2, 8),  # Llama-3.2-1B
}

# Models narrower than the paper's (hidden < 1024) take these instead of the reference's 25 steps
# and 15000 (measured on SmolLM2-135M, docs/memit.md).
SMALL_HIDDEN = 1024
SMALL_V_STEPS = 60
SMALL_MOM2_WEIGHT = 500.0
# Gemma-3-270M with its requests' other tokens kept (keep_other_tokens): 50 edits 10 of 12 facts,
# 500 edits 3 (docs/memit.md).
SANDWICH_MOM2_WEIGHT = 50.0

# Fixed context prefixes for the keys and targets (MEMIT samples short texts from the model; fixed
# ones keep an edit deterministic). Used with `prompt: plain`; chat prompts use none, as the
# authors' chat-prompt runs disabled them.
CONTEXT_PREFIXES = ("The following is true. ", "Here is a fact. ", "I read this today. ", "Note that ", "Yes. ")


@dataclasses.dataclass(frozen=True)
class EditConfig:
    data: str = ""  # messages/alpaca JSONL with a `subject` per record
    model: str = "smollm2-135m-instruct"
    out: str = ""
    method: Literal["memit"] = "memit"
    # chat: the chat-wrapped question with the CoT instruction, target " The answer is X." (the
    # authors' scripts); plain: the question's first paragraph, target " X".
    prompt: Literal["chat", "plain"] = "chat"
    layers: tuple[int, ...] = ()  # edited layers; empty: the model's default band
    v_steps: int | None = None  # None: 25 (the reference's), 60 for a model narrower than the paper's
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    mom2_update_weight: float | None = None  # None: 15000 (the reference's), SMALL_MOM2_WEIGHT if narrower
    stats_tokens: int = 100_000  # at most this many corpus tokens for E[k kᵀ]
    stats_seq_len: int = 512  # the reference's position cap; texts are packed into rows this long
    context_prefixes: tuple[str, ...] = CONTEXT_PREFIXES
    batch_size: int = 8  # requests per target-value optimisation (memory: rows x length x vocab logits)
    solve_dtype: Literal["float64", "float32"] = "float64"  # the closed-form step (float64 as the reference)
    # Keep the outputs of the requests' own other tokens (prompt and target, every context) in the
    # closed-form step, each weighing as much as a fact's key. None: on for a model that norms its MLP
    # output before the residual add (Gemma 3), where a small write at a token whose MLP output is
    # small turns its normed output around (0/12 facts edited without it on Gemma-3-270M, 10/12
    # with it: docs/memit.md); off otherwise, as the reference.
    keep_other_tokens: bool | None = None
    export_dtype: str = "float32"
    # Parameters placed by the training sharding rules; the edit's kernels run on the sharded arrays
    # (rows and statistics are small next to the model: replicated), the float64 solve on the host.
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        if self.method != "memit":
            raise MixsdError(f"config key 'method': unknown edit method {self.method!r} (known: memit)")
        if self.v_steps is not None:
            config_lib.check_range("v_steps", self.v_steps, 1)
        config_lib.check_range("v_lr", self.v_lr, 0.0)
        config_lib.check_range("kl_factor", self.kl_factor, 0.0)
        config_lib.check_range("v_weight_decay", self.v_weight_decay, 0.0)
        config_lib.check_range("clamp_norm_factor", self.clamp_norm_factor, 0.0)
        if self.mom2_update_weight is not None:
            config_lib.check_range("mom2_update_weight", self.mom2_update_weight, 0.0)
        config_lib.check_range("stats_tokens", self.stats_tokens, 1)
        config_lib.check_range("stats_seq_len", self.stats_seq_len, 8)
        config_lib.check_range("batch_size", self.batch_size, 1)
        if len(set(self.layers)) != len(self.layers) or list(self.layers) != sorted(self.layers):
            raise MixsdError(f"config key 'layers': {list(self.layers)} must be increasing without repeats")


def load_edit_config(path=None, overrides=(), flags=None) -> EditConfig:
    return config_lib.load(EditConfig, path, overrides, flags=flags)


def for_model(cfg: EditConfig, model_cfg) -> EditConfig:
    """The config with its per-model defaults filled in. The paper's models (and any as wide) take the
    reference's settings. A model narrower than the narrowest of them (hidden < 1024: SmolLM2-135M,
    Gemma-3-270M) needs more δ steps, since Adam at lr 0.5 moves δ by about lr·√D per step against a
    z-layer output of similar norm, and a smaller update weight, since its keys' kᵀC⁻¹k (of the order of
    the MLP width F) is an order of magnitude smaller than in the wide MLPs 15000 was set for."""
    small = model_cfg.hidden_size < SMALL_HIDDEN
    sandwich = bool(model_cfg.sandwich_norms)
    weight = 15000.0 if not small else SANDWICH_MOM2_WEIGHT if sandwich else SMALL_MOM2_WEIGHT
    return dataclasses.replace(
        cfg,
        v_steps=cfg.v_steps if cfg.v_steps is not None else (SMALL_V_STEPS if small else 25),
        mom2_update_weight=cfg.mom2_update_weight if cfg.mom2_update_weight is not None else weight,
        keep_other_tokens=cfg.keep_other_tokens if cfg.keep_other_tokens is not None else sandwich,
    )


def edit_layers(cfg: EditConfig, model_cfg) -> tuple[int, ...]:
    """The layers to rewrite: the config's, else the model's reference band, else one by depth."""
    if model_cfg.model_type not in MEMIT_FAMILIES:
        raise MixsdError(f"model family {model_cfg.model_type!r} has no MEMIT support (supported: "
                         f"{', '.join(MEMIT_FAMILIES)})")
    L = model_cfg.num_layers
    if cfg.layers:
        for layer in cfg.layers:
            if not 0 <= layer < L:
                raise MixsdError(f"config key 'layers': layer {layer} is out of range for a {L}-layer model (0..{L - 1})")
        return tuple(cfg.layers)
    first, last = REFERENCE_LAYERS.get((model_cfg.model_type, L, model_cfg.hidden_size), default_band(L))
    return tuple(range(first, last + 1))


def default_band(num_layers: int) -> tuple[int, int]:
    """About 11% to 39% of the depth (the reference bands' share), at least one layer."""
    first = round(0.11 * num_layers)
    return first, max(first, round(0.39 * num_layers))
