"""Our model against transformers (PyTorch) on the same checkpoint: the logits checks.

Two checks on a fixed set of chat prompts (plus, for models with sliding-window layers, one longer
than the window): logits of a padded batch (full forward), and logits of 8 cached decoding steps (prefill, then one token at a time through the KV cache, fed transformers'
own greedy tokens). The third check of `mixsd models parity`, our compiled greedy decoder against
transformers' `generate`, needs the decoder and so lives with it (`sampling/parity.py`); this
module hands it what it needs (`LogitParity`).

The prompt longer than a sliding window is held to a bar set by the reference itself: XLA's and
PyTorch's float32 sin/cos differ in the last bit at some positions, and a long Gemma 3 prompt
amplifies that (its residual stream reaches 1e5). So the check also runs transformers with its
RoPE tables correctly rounded (its own float32 angles, cos/sin in float64): how far an equally
accurate table moves the reference's logits is what any float32 implementation can be asked to
match there (`long_prompt_rope_rounding_spread`), not 1e-3.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "What is 12 plus 30?",
    "Name three colours.",
    "Who wrote Hamlet?",
    "Explain in one line what a transformer model is.",
)
CACHED_STEPS = 8
GREEDY_TOKENS = 16
# Models with sliding-window layers are also checked on a prompt longer than their window, for
# more tokens, so the windows bind in every check.
WINDOWED_GREEDY_TOKENS = 32


def long_prompt(min_tokens: int) -> str:
    """A fixed user text of at least `min_tokens` words, asking about one of its lines."""
    lines = [f"Fact {i}: the number {i} squared is {i * i}." for i in range(min_tokens // 8 + 1)]
    return "Read these facts.\n" + "\n".join(lines) + "\nWhat is the number 7 squared? Answer with one number."


def _reference_model(model_dir: Path, reference: str, torch_dtype):
    from transformers import AutoModelForCausalLM

    if reference == "gguf":
        from mixsd_jax.models.registry import EMBEDDED_DEFAULT, embedded_gguf_path, pulled_from

        gguf = embedded_gguf_path(pulled_from(model_dir) or EMBEDDED_DEFAULT)
        return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype).eval()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()


class _RopeCorrectlyRounded:
    """Within it, the reference's rotary embeddings return cos/sin correctly rounded to float32
    (from its own float32 angles, through float64): a table as accurate as PyTorch's, rounded
    differently at some entries, as any other implementation's is."""

    def __init__(self, model):
        self.modules = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
        self.handles = []

    @staticmethod
    def _tables(module, args, out):
        import torch

        x, position_ids, *rest = args
        layer_type = rest[0] if rest else None
        inv_freq = getattr(module, f"{layer_type}_inv_freq") if layer_type else module.inv_freq
        scaling = getattr(module, f"{layer_type}_attention_scaling") if layer_type else module.attention_scaling
        freqs = position_ids[..., None].float() * inv_freq.float()  # the reference's own angles
        angles = torch.cat((freqs, freqs), dim=-1).double()
        return tuple((f(angles) * scaling).to(t.dtype) for f, t in ((torch.cos, out[0]), (torch.sin, out[1])))

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._tables) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@dataclasses.dataclass(frozen=True)
class LogitParity:
    result: dict  # model, reference, dtype, prompts, max_abs_logit_diff, argmax_agreement, cached_steps
    params: dict  # ours, loaded at `dtype`
    cfg: object  # ModelConfig
    prompts: list  # token ids of PROMPTS, chat-templated
    stop_ids: tuple
    hf_generated: list  # transformers' `generate`: up to `greedy_tokens` greedy ids per prompt
    greedy_tokens: int = GREEDY_TOKENS


def logit_parity(model_dir: str | Path, dtype: str = "float32", reference: str = "hf_dir") -> LogitParity:
    import jax
    import jax.numpy as jnp
    import torch

    from mixsd_jax.models import transformer
    from mixsd_jax.models.checkpoint import load_hf
    from mixsd_jax.models.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    tok = load_tokenizer(model_dir)
    cfg, params = load_hf(model_dir, param_dtype=dtype)
    texts = list(PROMPTS)
    greedy_tokens = GREEDY_TOKENS
    if cfg.has_sliding_layers:
        texts.append(long_prompt(cfg.sliding_window + 64))
        greedy_tokens = WINDOWED_GREEDY_TOKENS
    prompts = [tok.prompt_ids(p) for p in texts]
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    ref = _reference_model(model_dir, reference, torch_dtype)

    # Transformers' greedy tokens, by full forwards (used to drive the logits checks), and its own
    # `generate` with the model's generation config (stops at eos), which our decoder must reproduce.
    continuations, hf_generated = [], []
    with torch.no_grad():
        for p in prompts:
            seq = list(p)
            for _ in range(CACHED_STEPS + 1):
                seq.append(int(ref(torch.tensor([seq]), logits_to_keep=1).logits[0, -1].argmax()))
            continuations.append(seq[len(p):])
            # An explicit mask: SmolLM2's pad id is <|im_end|>, which chat prompts contain.
            out = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=greedy_tokens, do_sample=False, pad_token_id=tok.pad_id)
            hf_generated.append(out[0, len(p):].tolist())

    # 1. Padded batch (ours) against each sequence alone (transformers): prompt + the greedy tokens
    # the cached steps will feed. Logits are taken a row at a time: a 262k vocabulary makes a
    # whole batch's logits gigabytes.
    seqs = [p + c[: CACHED_STEPS + 1] for p, c in zip(prompts, continuations)]
    width = max(map(len, seqs))
    tokens = np.zeros((len(seqs), width), np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
        mask[i, : len(s)] = 1
    seg = jnp.asarray(mask, jnp.int32)
    compute = jnp.dtype(dtype)
    hidden, _ = jax.jit(lambda p, t, s: transformer.forward(p, cfg, t, transformer.padded_positions(s), s, dtype=compute))(
        params, jnp.asarray(tokens, jnp.int32), seg
    )
    long_at = len(PROMPTS) if cfg.has_sliding_layers else None
    diffs, agree, total, ref_at_steps, long_diffs, spread = [], 0, 0, [], [], None
    for i, s in enumerate(seqs):
        with torch.no_grad():
            b = ref(torch.tensor([s])).logits[0].float().numpy()
            if i == long_at:
                with _RopeCorrectlyRounded(ref):
                    spread = float(np.abs(ref(torch.tensor([s])).logits[0].float().numpy() - b).max())
        a = np.asarray(transformer.lm_logits(params, cfg, hidden[i, : len(s)], dtype=compute))
        (long_diffs if i == long_at else diffs).append(np.abs(a - b).max())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(s)
        ref_at_steps.append(b[len(prompts[i]) - 1:].copy())  # the positions the cached steps predict from
        del a, b

    # 2. Cached decoding: prefill the prompts, then feed the greedy tokens one at a time.
    P = max(map(len, prompts))
    prompt_tokens = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):
        prompt_tokens[i, : len(p)] = p
    pseg = jnp.asarray((np.arange(P)[None] < np.array([len(p) for p in prompts])[:, None]).astype(np.int32))
    _, cache = transformer.prefill(params, cfg, jnp.asarray(prompt_tokens), transformer.padded_positions(pseg), pseg,
                                   P + CACHED_STEPS, dtype=compute)
    step = jax.jit(lambda p, t, pos, c: transformer.forward(p, cfg, t, pos, jnp.ones_like(t), c, dtype=compute))
    for k in range(1, CACHED_STEPS + 1):
        # Step k feeds greedy token k-1 (at position len+k-1) and predicts the next one.
        fed = np.array([(p + c)[len(p) + k - 1] for p, c in zip(prompts, continuations)], np.int32)[:, None]
        pos = np.array([len(p) + k - 1 for p in prompts], np.int32)[:, None]
        hidden, cache = step(params, jnp.asarray(fed), jnp.asarray(pos), cache)
        logits = np.asarray(transformer.lm_logits(params, cfg, hidden[:, 0], dtype=compute))
        for i, p in enumerate(prompts):
            want = ref_at_steps[i][k]
            (long_diffs if i == long_at else diffs).append(np.abs(logits[i] - want).max())
            agree += int(logits[i].argmax() == want.argmax())
            total += 1

    result = {
        "model": str(model_dir),
        "reference": reference,
        "dtype": dtype,
        "prompts": len(prompts),
        "max_abs_logit_diff": float(max(diffs)),
        "argmax_agreement": agree / total,
        "cached_steps": CACHED_STEPS,
        "longest_prompt": max(map(len, prompts)),
    }
    if long_at is not None:  # the prompt longer than the window, against the reference's own spread
        result |= {"long_prompt_logit_diff": float(max(long_diffs)), "long_prompt_rope_rounding_spread": spread}
    return LogitParity(result, params, cfg, prompts, tuple(tok.stop_ids), hf_generated, greedy_tokens)
