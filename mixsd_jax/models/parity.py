"""Our model against transformers (PyTorch) on the same checkpoint: the logits checks.

Two checks on a fixed set of chat prompts: logits of a padded batch (full forward), and logits of
8 cached decoding steps (prefill, then one token at a time through the KV cache, fed transformers'
own greedy tokens). The third check of `mixsd models parity`, our compiled greedy decoder against
transformers' `generate`, needs the decoder and so lives with it (`sampling/parity.py`); this
module hands it what it needs (`LogitParity`).
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


def _reference_model(model_dir: Path, reference: str, torch_dtype):
    from transformers import AutoModelForCausalLM

    if reference == "gguf":
        from mixsd_jax.models.registry import EMBEDDED_DEFAULT, embedded_gguf_path

        gguf = embedded_gguf_path(EMBEDDED_DEFAULT)
        return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype).eval()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()


@dataclasses.dataclass(frozen=True)
class LogitParity:
    result: dict  # model, reference, dtype, prompts, max_abs_logit_diff, argmax_agreement, cached_steps
    params: dict  # ours, loaded at `dtype`
    cfg: object  # ModelConfig
    prompts: list  # token ids of PROMPTS, chat-templated
    stop_ids: tuple
    hf_generated: list  # transformers' `generate`: up to GREEDY_TOKENS greedy ids per prompt


def logit_parity(model_dir: str | Path, dtype: str = "float32", reference: str = "hf_dir") -> LogitParity:
    import jax
    import jax.numpy as jnp
    import torch

    from mixsd_jax.models import transformer
    from mixsd_jax.models.checkpoint import load_hf
    from mixsd_jax.models.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    tok = load_tokenizer(model_dir)
    prompts = [tok.prompt_ids(p) for p in PROMPTS]
    cfg, params = load_hf(model_dir, param_dtype=dtype)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    ref = _reference_model(model_dir, reference, torch_dtype)

    # Transformers' greedy tokens, by full forwards (used to drive the logits checks), and its own
    # `generate` with the model's generation config (stops at eos), which our decoder must reproduce.
    continuations, hf_generated = [], []
    with torch.no_grad():
        for p in prompts:
            seq = list(p)
            for _ in range(CACHED_STEPS + 1):
                seq.append(int(ref(torch.tensor([seq])).logits[0, -1].argmax()))
            continuations.append(seq[len(p):])
            # An explicit mask: SmolLM2's pad id is <|im_end|>, which chat prompts contain.
            out = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=tok.pad_id)
            hf_generated.append(out[0, len(p):].tolist())

    # 1. Padded batch: prompt + the greedy tokens the cached steps will feed, right-padded.
    seqs = [p + c[: CACHED_STEPS + 1] for p, c in zip(prompts, continuations)]
    width = max(map(len, seqs))
    tokens = np.zeros((len(seqs), width), np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
        mask[i, : len(s)] = 1
    with torch.no_grad():
        ref_logits = ref(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.float().numpy()
    seg = jnp.asarray(mask, jnp.int32)
    compute = jnp.dtype(dtype)
    full_forward = jax.jit(lambda p, t, s: transformer.forward(p, cfg, t, transformer.padded_positions(s), s,
                                                               dtype=compute))
    hidden, _ = full_forward(params, jnp.asarray(tokens, jnp.int32), seg)
    ours_full = np.asarray(transformer.lm_logits(params, cfg, hidden, dtype=compute))
    diffs, agree, total = [], 0, 0
    for i, s in enumerate(seqs):
        a, b = ours_full[i, : len(s)], ref_logits[i, : len(s)]
        diffs.append(np.abs(a - b).max())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(s)

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
            want = ref_logits[i, len(p) + k - 1]
            diffs.append(np.abs(logits[i] - want).max())
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
    }
    return LogitParity(result, params, cfg, prompts, tuple(tok.stop_ids), hf_generated)
