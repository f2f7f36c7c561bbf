"""ChatTokenizer on the tiny tokenizers (ChatML, Qwen3-style thinking switch) and on SmolLM2."""

from __future__ import annotations

import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.models.tokenizer import ChatTokenizer, load_tokenizer

USER = [{"role": "user", "content": "What is 2+2?"}]


def _reference_prompt_ids(hf, messages, **template_kwargs):
    """The reference's call (docs/reference.md, Chat template), through transformers' own tokenize path."""
    out = hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, add_special_tokens=False, **template_kwargs
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_ids_of_the_tiny_chatml_tokenizer(tiny_qwen3_dir):
    tok = load_tokenizer(tiny_qwen3_dir)
    vocab = tok.hf.get_vocab()
    assert tok.eos_id == vocab["<|im_end|>"]
    assert tok.pad_id == vocab["<|endoftext|>"]
    # No unk token here, so <|endoftext|> is a real stop token next to eos; <|eot_id|> is not in the vocab.
    assert tok.stop_ids == tuple(sorted({vocab["<|im_end|>"], vocab["<|endoftext|>"]}))
    assert tok.supports_thinking


def test_prompt_ids_match_transformers_and_pass_enable_thinking(tiny_qwen3_dir):
    tok = load_tokenizer(tiny_qwen3_dir)
    assert tok.render(USER, add_generation_prompt=True) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert tok.render(USER, add_generation_prompt=True, enable_thinking=True) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    for thinking in (False, True):
        ids = tok.prompt_ids("What is 2+2?", enable_thinking=thinking)
        assert ids == _reference_prompt_ids(tok.hf, USER, enable_thinking=thinking)
    assert tok.prompt_ids("x") != tok.prompt_ids("x", enable_thinking=True)


def test_system_turn_and_full_conversation(tiny_llama_dir):
    tok = load_tokenizer(tiny_llama_dir)
    ids = tok.prompt_ids("hi", system="Be brief.", enable_thinking=True)  # True: no empty think block
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    chat = USER + [{"role": "assistant", "content": "4"}]
    assert tok.render(chat, add_generation_prompt=False).endswith("<|im_start|>assistant\n4<|im_end|>\n")
    # bos exists for the tiny llama, but prompts carry only what the template wrote.
    assert tok.hf.bos_token_id is not None and tok.prompt_ids("hi")[0] == tok.hf.convert_tokens_to_ids("<|im_start|>")
    assert tok.prompt_ids("hi").count(tok.hf.bos_token_id) == 2  # the two <|im_start|> of the template


def test_encode_decode_round_trip(tiny_llama_dir):
    tok = load_tokenizer(tiny_llama_dir)
    text = "The answer is 42. \\boxed{Paris}"
    ids = tok.encode(text)
    assert ids == tok.hf(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id]) == text  # special tokens dropped by default
    assert tok.decode(ids + [tok.eos_id], skip_special_tokens=False) == text + "<|im_end|>"


def test_pad_falls_back_to_eos_and_thinking_is_detected(tiny_llama_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_llama_dir)
    hf.pad_token = None
    hf.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok = ChatTokenizer(hf)
    assert tok.pad_id == tok.eos_id
    assert not tok.supports_thinking
    assert tok.render(USER, add_generation_prompt=True, enable_thinking=True) == "What is 2+2?"


def test_template_problems_are_one_line_errors(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_llama_dir)
    hf.chat_template = None
    with pytest.raises(MixsdError, match="has no chat template"):
        ChatTokenizer(hf, source="tiny").prompt_ids("hi")
    hf.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(MixsdError, match=r"tiny: chat template failed \(System role not supported\)"):
        ChatTokenizer(hf, source="tiny").prompt_ids("hi")
    with pytest.raises(MixsdError, match="model directory not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MixsdError, match=r"empty: cannot load the tokenizer"):
        load_tokenizer(tmp_path / "empty")


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    assert (tok.eos_id, tok.pad_id) == (2, 2)
    # <|endoftext|> is SmolLM2's unk token (id 0): the reference's rule leaves it out of the stop set.
    assert tok.hf.unk_token_id == 0 and tok.stop_ids == (2,)
    assert not tok.supports_thinking
    assert tok.render(USER, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.prompt_ids("What is 2+2?")
    assert ids == _reference_prompt_ids(tok.hf, USER, enable_thinking=False)
    assert ids[0] == 1 and ids[-3:] == tok.encode("assistant\n") and ids.count(2) == 2
