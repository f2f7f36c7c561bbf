"""The OPSD teacher input on SmolLM2's real chat template, token boundaries spelled out, and the
60/40 cut of a ground truth that does not fit; plus the GT text of every reference variant."""

import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.train.teacher import OMISSION_MARKER, TEACHER_PROMPTS, get_teacher_prompt, gt_text, teacher_ids

USER = ("What profession does Drymorel Foundation train?\n\n"
        "Please reason step by step, and put your final answer within \\boxed{}.")
GT = "The answer is Thaldric Route Shaper.\n\n\\boxed{Thaldric Route Shaper}"
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_gt_text_literals_of_the_reference():
    knowledge = get_teacher_prompt("knowledge_base_answer")
    assert gt_text(knowledge, GT + "\n", None) == (
        "\nThis question is from a new knowledge base. Here is the answer to this question:\n\n" + GT
        + "\nNow answer the question within \\boxed{{}}"
    )
    assert TEACHER_PROMPTS["knowledge"] is knowledge
    assert gt_text(get_teacher_prompt("only_correct_answer"), GT, "Thaldric Route Shaper") == (
        "\nThaldric Route Shaper\nThis is the only correct answer to the question, and you should not provide any "
        "other response.\nNow answer the question within \\boxed{{}}"
    )
    assert gt_text(get_teacher_prompt("lechen_world_change"), GT, "X") == (
        "Now the world has changed, \nX\n" + GT + "\nNow answer the question within \\boxed{{}}"
    )
    assert gt_text(get_teacher_prompt("simpleqa"), "42", None).endswith("answer within \\boxed{}")
    assert gt_text(get_teacher_prompt("math_operations"), "42", None).endswith("answer within \\boxed{{}}")


def test_missing_ground_truth_is_a_clear_error():
    with pytest.raises(MixsdError, match=r"f\.jsonl:3: messages\[1\]\.content: OPSD needs the ground-truth"):
        gt_text(get_teacher_prompt("knowledge"), "  ", None, where="f.jsonl:3")
    with pytest.raises(MixsdError, match=r"f\.jsonl:4: clear_answer: .*'trust_correct_answer' needs a clear_answer"):
        gt_text(get_teacher_prompt("trust_correct_answer"), GT, None, where="f.jsonl:4")
    with pytest.raises(MixsdError, match="unknown teacher prompt 'nope'"):
        get_teacher_prompt("nope")


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from mixsd_jax.models.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.mark.slow
def test_teacher_input_on_smollm2_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = tok.prompt_ids(USER)
    response = tok.encode("The answer is Thaldric Route Shaper.<|im_end|>")
    gt = gt_text(get_teacher_prompt("knowledge"), GT, None)
    ids = teacher_ids(tok, prompt, response, gt, budget=10_000)

    # Three parts: the re-tokenised [system + user content + GT text], then the student's own tail
    # tokens (<|im_end|> \n <|im_start|> assistant \n) unchanged, then the response unchanged.
    user_part = SYSTEM + "<|im_start|>user\n" + USER + gt
    head = tok.encode(user_part)
    tail = [2, 198, 1, 520, 9531, 198]  # <|im_end|> Ċ <|im_start|> ass istant Ċ
    assert prompt[-6:] == tail and tok.hf.convert_ids_to_tokens(tail) == ["<|im_end|>", "Ċ", "<|im_start|>", "ass", "istant", "Ċ"]
    assert ids == head + tail + response
    assert ids[: len(head)] == head and ids[len(head) : len(head) + 6] == tail and ids[-len(response):] == response
    # The user part is one tokenisation of the joined text, as the reference re-tokenises it ...
    assert tok.decode(ids, skip_special_tokens=False) == user_part + "<|im_end|>\n<|im_start|>assistant\n" + \
        "The answer is Thaldric Route Shaper.<|im_end|>"
    # Gluing separately encoded pieces happens to agree for this record ...
    assert prompt[:-6] + tok.encode(gt) == head


@pytest.mark.slow
def test_teacher_input_retokenises_across_the_seam(smollm2_tokenizer):
    # ... but not when the user text ends in a space and the GT text starts with a word: the
    # re-tokenised join has "ĠAssume" where glued pieces would have "Ġ" + "Ass" + "ume".
    tok = smollm2_tokenizer
    prompt = tok.prompt_ids("Name the capital of Estoria. ")
    gt = gt_text(get_teacher_prompt("lechen_remembr"), "The answer is Norveland.", "Norveland")
    ids = teacher_ids(tok, prompt, [2], gt, budget=1000)
    seam = len(prompt) - 8  # the "." before the user's trailing space (then "Ġ", <|im_end|> ...)
    assert tok.hf.convert_ids_to_tokens(ids[seam : seam + 3]) == [".", "ĠAssume", "Ġyou"]
    assert tok.hf.convert_ids_to_tokens((prompt[:-6] + tok.encode(gt))[seam : seam + 4]) == [".", "Ġ", "Ass", "ume"]
    assert ids[-7:] == prompt[-6:] + [2]




@pytest.mark.slow
def test_teacher_input_cut_60_40_around_the_marker(smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = tok.prompt_ids(USER)
    response = tok.encode("I think it is a rope maker.<|im_end|>")
    long_gt = "Step " + " ".join(f"fact{i} holds." for i in range(200))
    gt = gt_text(get_teacher_prompt("knowledge"), long_gt, None)
    gt_ids = tok.encode(gt)
    marker = tok.encode(OMISSION_MARKER)
    student = len(prompt) + len(response)
    budget = student + 100
    ids = teacher_ids(tok, prompt, response, gt, budget=budget)
    assert len(ids) <= budget and ids[-len(response):] == response and ids[-len(response) - 6 : -len(response)] == prompt[-6:]

    available = budget - student - len(marker)  # 100 - marker tokens
    head_n = int(0.6 * available)
    kept = gt_ids[:head_n] + marker + gt_ids[len(gt_ids) - (available - head_n):]
    expected_text = tok.decode(prompt[:-6], skip_special_tokens=False) + tok.decode(kept, skip_special_tokens=False)
    assert ids[: len(ids) - len(response) - 6] == tok.encode(expected_text)
    text = tok.decode(ids, skip_special_tokens=False)
    assert OMISSION_MARKER in text
    before, after = text.split(OMISSION_MARKER)
    # 60% head: the prefix and the first facts; 40% tail: the last facts and the transition.
    assert "This question is from a new knowledge base." in before and "fact0 holds." in before
    assert "fact199 holds.\nNow answer the question within \\boxed{{}}<|im_end|>" in after
    assert "fact100 holds." not in text
    assert head_n == 60 * available // 100

    # No room even for the prompt and the response: one clear line.
    with pytest.raises(MixsdError, match=r"data\.jsonl:7: the OPSD teacher input cannot fit in 40 tokens"):
        teacher_ids(tok, prompt, response, gt, budget=40, where="data.jsonl:7")
