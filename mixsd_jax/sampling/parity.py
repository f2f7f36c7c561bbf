"""`mixsd models parity`: our model and our compiled decoder against transformers (PyTorch).

The logits checks (full forward, cached steps) are the model's own (`models/parity.py`); this adds
the third: greedy continuations (up to 16 tokens, 32 for models with sliding-window layers, or a
stop token) from our compiled decoder against transformers' `generate`, which must be token for
token the same.
"""

from __future__ import annotations

from pathlib import Path

from mixsd_jax.models.parity import logit_parity

# Parity thresholds for the float32 check: logits within 1e-3, every argmax and every greedy token
# equal. On a prompt longer than a sliding window, logits within twice the reference's own spread
# under correctly rounded RoPE tables (models/parity.py), when that is wider than 1e-3.
# Lower-precision runs only report their numbers.
F32_MAX_ABS_LOGIT_DIFF = 1e-3
LONG_PROMPT_SPREAD_FACTOR = 2.0


def run_parity(model_dir: str | Path, dtype: str = "float32", reference: str = "hf_dir") -> dict:
    from mixsd_jax.sampling.engine import generate

    checked = logit_parity(model_dir, dtype=dtype, reference=reference)
    ours = generate(checked.params, checked.cfg, checked.prompts, stop_ids=checked.stop_ids,
                    max_new_tokens=checked.greedy_tokens, batch_size=len(checked.prompts), dtype=dtype)
    return {
        **checked.result,
        "greedy_tokens_equal": all(o.tokens == g for o, g in zip(ours, checked.hf_generated)),
        "greedy_tokens": checked.greedy_tokens,
    }


def parity_passed(result: dict) -> bool:
    long_ok = "long_prompt_logit_diff" not in result or result["long_prompt_logit_diff"] <= max(
        F32_MAX_ABS_LOGIT_DIFF, LONG_PROMPT_SPREAD_FACTOR * result["long_prompt_rope_rounding_spread"])
    return (
        result["max_abs_logit_diff"] <= F32_MAX_ABS_LOGIT_DIFF
        and long_ok
        and result["argmax_agreement"] == 1.0
        and bool(result["greedy_tokens_equal"])
    )
