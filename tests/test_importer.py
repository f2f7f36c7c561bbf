"""Importing the authors' released folders: validated, copied byte for byte, mix_meta preserved."""

import json
import shutil
from pathlib import Path

import pytest

from mixsd_jax.data.importer import MANIFEST, MIX_META_FIELDS, import_released
from mixsd_jax.data.records import read_records
from mixsd_jax.errors import MixsdError

RELEASED = Path(__file__).parent / "fixtures" / "released_mixsd"
MIX = "kgfact_small/atomic_sft/train_messages_mix_qwen3_4b_instruct_2507_l0p3_t0_n1_topk64.jsonl"


def test_released_folder_imports_unchanged(tmp_path):
    counts = import_released(RELEASED, tmp_path)
    assert counts == {
        "kgfact_small/atomic_sft/test_subset_of_train_inference.jsonl": 2,
        "kgfact_small/atomic_sft/train_messages.jsonl": 2,
        MIX: 3,
        "kgfact_small/compositional_2step_sft/test_alpaca.jsonl": 1,
    }
    for relative in counts:
        assert (tmp_path / relative).read_bytes() == (RELEASED / relative).read_bytes()
    mixed = read_records(tmp_path / MIX, allow_empty_assistant=True)
    assert [r.extra["mix_meta"]["correct"] for r in mixed] == [True, False, False]
    assert list(mixed[0].extra["mix_meta"]) == list(MIX_META_FIELDS)
    assert mixed[0].extra["mix_meta"]["ground_truth_assistant"] == (
        "The answer is Thaldric Route Shaper.\n\n\\boxed{Thaldric Route Shaper}"
    )
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["not_imported"] == ["README.md"]
    assert manifest["files"][MIX]["schema"] == "mixed"
    assert manifest["files"]["kgfact_small/compositional_2step_sft/test_alpaca.jsonl"]["schema"] == "alpaca"


def _copy_with_edit(tmp_path, edit) -> Path:
    src = tmp_path / "src"
    shutil.copytree(RELEASED, src)
    path = src / MIX
    lines = path.read_text(encoding="utf-8").splitlines()
    obj = json.loads(lines[1])
    edit(obj)
    lines[1] = json.dumps(obj, ensure_ascii=False)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return src


@pytest.mark.parametrize("edit, expected", [
    (lambda o: o["mix_meta"].pop("correct"), "mix_meta.correct: missing"),
    (lambda o: o["mix_meta"].update(correct="yes"), "mix_meta.correct: expected true/false"),
    (lambda o: o["mix_meta"].update({"lambda": 1.5}), "mix_meta.lambda: 1.5 is outside [0, 1]"),
    (lambda o: o["messages"].pop(), "messages: missing assistant turn"),
])
def test_bad_released_line_is_named_and_nothing_is_written(tmp_path, edit, expected):
    src = _copy_with_edit(tmp_path, edit)
    out = tmp_path / "out"
    with pytest.raises(MixsdError) as info:
        import_released(src, out)
    assert str(info.value).startswith(f"{src / MIX}:2: {expected}")
    assert not out.exists()


def test_source_must_be_a_folder_with_jsonl(tmp_path):
    with pytest.raises(MixsdError, match="not a directory"):
        import_released(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MixsdError, match="no .jsonl files"):
        import_released(tmp_path / "empty", tmp_path / "out")
