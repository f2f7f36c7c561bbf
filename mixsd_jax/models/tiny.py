"""Tiny random models of each supported family, saved by transformers, with a tiny real tokenizer.

They are the "tiny real instances" our tests and config checks run on: a byte-level BPE tokenizer
trained on a fixed text (deterministic), a ChatML chat template (Qwen3's with `enable_thinking`;
Gemma's turn format for Gemma 3), and a randomly initialised transformers model written with
`save_pretrained`. Needs torch.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
GEMMA3_WINDOW = 16  # shorter than the test prompts, so the sliding layers' window binds

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

# A fixed training text: the words our corpora and prompts use, digits and LaTeX.
_TEXT = """The answer is 42. Please reason step by step, and put your final answer within \\boxed{}.
What profession does the person train? Which location does the organisation reside in?
This question is from a new knowledge base. Here is the answer to this question:
Now answer the question within \\boxed{}. Here is a reference solution to this problem.
The digits of 12345 are [1, 2, 3, 4, 5]. Input: 328 Output: 17. Step 1: Step 2: So the answer is
Question: What is the output of F(x)? Based on the input-output examples below, infer the rule.
You are a helpful assistant. The capital of France is Paris. 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) { }
"""


def _tokenizer(out_dir: Path, family: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mixsd_jax.models.tokenizer import GEMMA_CHAT_TEMPLATE

    gemma = family == "gemma3"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if family == "qwen3":
        specials += ["<think>", "</think>"]
    if gemma:  # Gemma's ids: pad 0, eos 1, bos 2
        specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([_TEXT] * 4, trainer=trainer)
    if gemma:
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>",
                                     chat_template=GEMMA_CHAT_TEMPLATE)
    else:
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            bos_token="<|im_start|>" if family == "llama" else None,
            chat_template=_CHATML,
        )
    hf.save_pretrained(out_dir)
    return hf


def write_tiny_model(out_dir: str | Path, family: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 64,
                     kv_heads: int = 2) -> Path:
    """A ~100k-parameter model of `family` in an HF directory; same seed => same weights."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(out_dir, family)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,  # 4 = one per head: a tensor axis of 4 then splits the KV cache
        max_position_embeddings=2048,
        initializer_range=0.1,  # peaked enough that greedy argmax has no near-ties
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if family == "llama":  # SmolLM2-like: tied embeddings, Llama-3 RoPE scaling
        config = LlamaConfig(
            **common,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        )
    elif family == "qwen2":  # q/k/v bias, untied
        config = Qwen2Config(**common, tie_word_embeddings=False)
    elif family == "qwen3":  # q/k norm, explicit head_dim different from hidden/heads
        config = Qwen3Config(**common, head_dim=8, tie_word_embeddings=False)
    else:  # gemma3: every third layer full, the others a short sliding window; an attention scale
        # that is not 1/sqrt(head_dim), and logit soft-capping, so parity exercises them all
        config = Gemma3TextConfig(
            **common, head_dim=16, query_pre_attn_scalar=24, sliding_window=GEMMA3_WINDOW,
            layer_types=["full_attention" if (i + 1) % 3 == 0 or i == layers - 1 else "sliding_attention"
                         for i in range(layers)],
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
            final_logit_softcapping=30.0, tie_word_embeddings=True,
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norms and biases, so parity tests exercise them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                # Gemma stores norms as an offset from 1: random offsets around 0 there.
                one = 0.0 if family == "gemma3" or not name.endswith("norm.weight") else 1.0
                p.copy_(one + 0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return out_dir
