"""The model's tokenizer as the pipeline uses it: chat-template prompts, stop ids, pad id.

Prompts follow the reference (docs/reference.md, Chat template): the chat template applied to one user turn with
the generation prompt, tokenized without adding special tokens (the template already wrote them),
`enable_thinking` passed through to templates that read it (Qwen3). The stop set is the eos id plus
whichever of `<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`, `<end_of_turn>` the vocabulary has as
real (non-unk) tokens. Gemma base models ship without a chat template; `GEMMA_CHAT_TEMPLATE` is
Gemma's turn format, which our GGUF import writes for them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from mixsd_jax import storage
from mixsd_jax.errors import MixsdError

STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>")

# Gemma's turn format: a system message is folded into the first user turn (Gemma has no system
# role); the assistant's role is "model".
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] | trim + '\n\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' "
    "+ ns.system + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% set ns.system = '' %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


class ChatTokenizer:
    """A transformers tokenizer plus the ids and prompt rendering our generator needs."""

    def __init__(self, hf, source: str = "tokenizer"):
        self.hf = hf
        self.source = source
        if hf.eos_token_id is None:
            raise MixsdError(f"{source}: the tokenizer has no eos token")
        self.eos_id: int = int(hf.eos_token_id)
        self.pad_id: int = int(hf.pad_token_id) if hf.pad_token_id is not None else self.eos_id
        self.stop_ids: tuple[int, ...] = _stop_ids(hf, self.eos_id)
        template = hf.chat_template if isinstance(hf.chat_template, str) else ""
        self.supports_thinking: bool = "enable_thinking" in template

    def prompt_ids(self, user_text: str, enable_thinking: bool = False, system: str | None = None) -> list[int]:
        """Token ids of one user turn (after an optional system turn) plus the generation prompt."""
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": user_text})
        return self.encode(self.render(messages, add_generation_prompt=True, enable_thinking=enable_thinking))

    def render(self, messages: Sequence[dict], add_generation_prompt: bool, enable_thinking: bool = False) -> str:
        """The chat template's text for `messages`."""
        import jinja2

        if not self.hf.chat_template:
            raise MixsdError(f"{self.source}: the tokenizer has no chat template")
        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
        try:
            try:
                return self.hf.apply_chat_template(list(messages), enable_thinking=enable_thinking, **kwargs)
            except TypeError:  # a tokenizer class whose template call rejects unknown keywords
                return self.hf.apply_chat_template(list(messages), **kwargs)
        except jinja2.TemplateError as exc:
            raise MixsdError(f"{self.source}: chat template failed ({exc})") from None

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as written: no bos/eos added (prompts carry their own special tokens)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(model_dir: str | Path) -> ChatTokenizer:
    """The tokenizer saved in an HF-format model directory."""
    from transformers import AutoTokenizer

    model_dir = storage.path(model_dir)
    if not model_dir.is_dir():
        raise MixsdError(f"{model_dir}: model directory not found")
    try:
        hf = AutoTokenizer.from_pretrained(str(_local_copy(model_dir)))
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MixsdError(f"{model_dir}: cannot load the tokenizer ({first_line})") from None
    return ChatTokenizer(hf, source=str(model_dir))


def _local_copy(model_dir) -> Path:
    """transformers reads tokenizers from a local folder only: a model in a bucket has its few
    small tokenizer files copied into the cache, under their content's hash (so every host and
    every run makes the same folder, and a changed tokenizer a new one)."""
    if not storage.is_url(model_dir):
        return Path(model_dir)
    from mixsd_jax.files import atomic_write_text, cache_dir
    from mixsd_jax.models.checkpoint import TOKENIZER_FILES

    found = {name: (model_dir / name).read_bytes() for name in ("config.json", *TOKENIZER_FILES)
             if (model_dir / name).is_file()}
    digest = hashlib.sha256(json.dumps({k: hashlib.sha256(v).hexdigest() for k, v in found.items()},
                                       sort_keys=True).encode()).hexdigest()[:16]
    local = cache_dir() / "tokenizers" / digest
    if not (local / ".complete").exists():
        local.mkdir(parents=True, exist_ok=True)
        for name, data in found.items():
            (local / name).write_bytes(data)
        atomic_write_text(local / ".complete", "")
    return local


def _stop_ids(hf, eos_id: int) -> tuple[int, ...]:
    unk = hf.unk_token_id
    vocab = hf.get_vocab()
    ids = {eos_id}
    for token in STOP_TOKENS:
        token_id = vocab.get(token)
        if isinstance(token_id, int) and token_id >= 0 and token_id != unk:
            ids.add(token_id)
    return tuple(sorted(ids))
