"""Generative forgetting on held-out general prompts: does a tuned model leak injected facts into
unrelated answers, or collapse into the answer template it was trained on? (docs/reference.md,
Error analysis: leakage and collapse, measured on every reply rather than only on wrong ones, because a 135M
model gets few held-out answers right and the base model's rate is the comparison.)

Prompts: a fixed set of benchmark questions asked as one chat user turn (question and its options),
`limit` of them by the benchmarks' seeded subset rule. `mmlu` (MIT) and 500 `arc_easy` questions
(CC BY-SA 4.0) are bundled; `arc_challenge` (CC BY-SA, not bundled) needs a data root such as
../shared/benchmarks.

Per reply:
- `leaked`: training entities (subjects and answers, `mixsd_jax.answers.criteria.training_entities`) the
  reply names as a whole phrase while the prompt does not;
- `template`: the reply opens with the training answers' common opening (KGFact: "The answer is");
- `opens_like[run]`: the reply opens with the same first three words as one of `run`'s own
  training targets (a MixSD model's targets have their own style, e.g. "1. The first step …",
  which the ground-truth template does not catch); every checkpoint's replies, the base's
  included, are checked against every run's openings, so each rate has the base's beside it;
- `collapsed`: the error analysis's rule (with `\\boxed{}` spans and "the answer is" lines removed, at most 80
  characters and 4 newlines remain); lenient when `max_new_tokens` is small, so read it beside
  the base model's rate.
Rates carry 95% Wilson intervals. The base model leaks nothing by construction (the entities are
invented), so leakage is a rate, not a ratio to the base.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from mixsd_jax.errors import MixsdError

SOURCES = ("mmlu", "arc_easy", "arc_challenge")
MIN_TEMPLATE_WORDS = 2
OPENING_WORDS = 3


def chat_question(item) -> str:
    """An MC benchmark item as a plain question for a chat turn: the last block of its context
    (no subject header or few-shot examples), without the trailing "Answer:", with its options."""
    block = item.context.rstrip().split("\n\n")[-1]
    if block.endswith("Answer:"):
        block = block[: -len("Answer:")].rstrip()
    if block.startswith("Question:"):
        block = block[len("Question:"):].strip()
    if all(len(c.strip()) == 1 for c in item.choices):  # MMLU: the options are in the context already
        return block
    return block + "\n" + "\n".join(f"{'ABCDE'[i]}. {c.strip()}" for i, c in enumerate(item.choices))


def general_prompts(source: str, *, data_root: str | None, limit: int, seed: int) -> list[tuple[str, str]]:
    """(id, user text) of `limit` held-out questions from `source`."""
    from mixsd_jax.eval.benchmarks import load_benchmark

    if source not in SOURCES:
        raise MixsdError(f"config key 'heldout_source': unknown source {source!r} (known: {', '.join(SOURCES)})")
    items = load_benchmark(source, data_root, limit, seed)
    if not items:
        raise MixsdError(f"held-out prompts {source!r}: no items read")
    return [(f"heldout/{item.id}", chat_question(item)) for item in items]


def answer_template(assistant_texts: Iterable[str]) -> str | None:
    """The words every training answer opens with ("The answer is"), or None when they share fewer
    than two (no common template to collapse into)."""
    common: list[str] | None = None
    for text in assistant_texts:
        words = text.strip().split("\n")[0].split()
        if common is None:
            common = words
        else:
            n = 0
            while n < min(len(common), len(words)) and common[n].lower() == words[n].lower():
                n += 1
            common = common[:n]
    if not common or len(common) < MIN_TEMPLATE_WORDS:
        return None
    return " ".join(common)


def opening(text: str) -> str:
    """The first OPENING_WORDS words of a text, lowercased (what "opens like" compares)."""
    return " ".join(text.split()[:OPENING_WORDS]).lower()


def target_openings(assistant_texts: Iterable[str]) -> list[str]:
    """The distinct openings of a training file's targets, sorted."""
    return sorted({opening(t) for t in assistant_texts if len(t.split()) >= OPENING_WORDS})


def leaked(response: str, prompt: str, entities: Iterable[str]) -> list[str]:
    from mixsd_jax.answers.text import normalize_answer, occurs_as_words

    response_n, prompt_n = normalize_answer(response), normalize_answer(prompt)
    return sorted(e for e in entities if occurs_as_words(e, response_n) and not occurs_as_words(e, prompt_n))


def score_replies(prompts: Sequence[tuple[str, str]], responses: Sequence[str], entities: Iterable[str],
                  template: str | None, openings: dict[str, Sequence[str]] | None = None) -> list[dict]:
    from mixsd_jax.eval.error_analysis import is_collapsed

    entities = sorted(entities)
    rows = []
    for (item_id, prompt), response in zip(prompts, responses):
        names = leaked(response, prompt, entities)
        rows.append({
            "id": item_id,
            "prompt": prompt,
            "response": response,
            "leaked": names,
            "leak": bool(names),
            "template": bool(template) and response.lstrip().lower().startswith(template.lower()),
            "collapsed": is_collapsed(response),
            "opens_like": {run: opening(response) in set(runs) for run, runs in (openings or {}).items()},
        })
    return rows


def _rate(count: int, n: int) -> dict:
    from mixsd_jax.eval.intervals import wilson_interval

    return {"count": count, "rate": count / n if n else None, "ci95": list(wilson_interval(count, n))}


def summarize(rows: Sequence[dict], template: str | None) -> dict:
    """Leakage, template and collapse rates with 95% Wilson intervals, and per run the share of
    replies opening like that run's training targets (`opens_like`)."""
    n = len(rows)
    out = {"n": n, "template_text": template}
    for key, field in (("leakage", "leak"), ("template", "template"), ("collapse", "collapsed")):
        out[key] = _rate(sum(bool(r[field]) for r in rows), n)
    runs = sorted({run for r in rows for run in r.get("opens_like", {})})
    out["opens_like"] = {run: _rate(sum(bool(r["opens_like"].get(run)) for r in rows), n) for run in runs}
    return out
