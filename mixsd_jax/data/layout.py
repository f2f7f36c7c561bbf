"""Where a built corpus keeps its files (the reference's layout, docs/reference.md, Layout).

KGFact, MQuAKE and SimpleQA share one layout (`atomic_sft/` and friends); KGFunc has its own. The
builders write these paths, and training, generation, evaluation and the pipeline read them from
here, so a file moves in one place.
"""

from __future__ import annotations

from pathlib import Path

from mixsd_jax.errors import MixsdError
from mixsd_jax import storage
from mixsd_jax.files import atomic_write_json, atomic_write_jsonl

# KGFact layout (also MQuAKE; SimpleQA writes only the training file).
ATOMIC_DIR = "atomic_sft"
KGFACT_TRAIN = f"{ATOMIC_DIR}/train_messages.jsonl"
KGFACT_RECALL = f"{ATOMIC_DIR}/test_subset_of_train_inference.jsonl"
KGFACT_PARAPHRASE_MESSAGES = f"{ATOMIC_DIR}/val_paraphrased_messages.jsonl"
KGFACT_PARAPHRASE_INFERENCE = f"{ATOMIC_DIR}/val_paraphrased_inference.jsonl"
KGFACT_RETRIEVAL = "atomic_with_context_cot/test_alpaca.jsonl"
KGFACT_RETRIEVAL_COMPOSITIONAL = "compositional_2step_with_context_cot/test_alpaca.jsonl"
COMPOSITIONAL_GLOB = "compositional_*step_sft"


def compositional_dir(hops: int) -> str:
    """The folder of the closed-book `hops`-hop questions (`test_messages.jsonl`, `test_alpaca.jsonl`)."""
    return f"compositional_{hops}step_sft"


# KGFunc layout.
KGFUNC_TRAIN_DIR = "primitive_atomic_balanced_sft_50k"
KGFUNC_PRIMITIVE_CHAIN_DIR = "primitive_compositional_sft_n_steps_2"
KGFUNC_MIXED_CHAIN_DIR = "compositional_sft_n_steps_2"
KGFUNC_UNSEEN_DIR = "primitive_atomic_balanced_new_operations"
KGFUNC_TRAIN = f"{KGFUNC_TRAIN_DIR}/train_messages.jsonl"
KGFUNC_UNSEEN = f"{KGFUNC_UNSEEN_DIR}/test_messages.jsonl"

# The memorization test splits of each layout (a `*` pattern joins several files into one split).
KGFACT_SPLITS = {
    "recall": KGFACT_RECALL,
    "paraphrased": KGFACT_PARAPHRASE_INFERENCE,
    "compositional_2hop": f"{compositional_dir(2)}/test_alpaca.jsonl",
    "compositional_3hop": f"{compositional_dir(3)}/test_alpaca.jsonl",
    "compositional_4hop": f"{compositional_dir(4)}/test_alpaca.jsonl",
    "retrieval": KGFACT_RETRIEVAL,
    "retrieval_2hop": KGFACT_RETRIEVAL_COMPOSITIONAL,
}
KGFUNC_SPLITS = {
    "in_domain": f"{KGFUNC_TRAIN_DIR}/test_messages.jsonl",
    "compositional_same_op": f"{KGFUNC_PRIMITIVE_CHAIN_DIR}/op_*_test_messages.jsonl",
    "compositional": f"{KGFUNC_MIXED_CHAIN_DIR}/test_messages.jsonl",
}

# The ground-truth training file of each corpus kind the pipeline builds.
TRAIN_FILES = {"kgfact": KGFACT_TRAIN, "mquake": KGFACT_TRAIN, "simpleqa": KGFACT_TRAIN, "kgfunc": KGFUNC_TRAIN}


def corpus_kind(corpus_dir: str | Path) -> str:
    """`kgfact` (also MQuAKE, same layout) or `kgfunc`, from the directory layout."""
    root = storage.path(corpus_dir)
    if not root.is_dir():
        raise MixsdError(f"{root}: corpus directory not found")
    if (root / ATOMIC_DIR).is_dir():
        return "kgfact"
    if (root / KGFUNC_TRAIN_DIR).is_dir():
        return "kgfunc"
    raise MixsdError(
        f"{root}: not a KGFact/MQuAKE ({ATOMIC_DIR}/) or KGFunc ({KGFUNC_TRAIN_DIR}/) corpus directory"
    )


def training_file(corpus_dir: str | Path) -> Path:
    """The GT training file of a corpus (for the error analysis's entity list and NLL defaults)."""
    return storage.path(corpus_dir) / (KGFACT_TRAIN if corpus_kind(corpus_dir) == "kgfact" else KGFUNC_TRAIN)


def write_corpus(out_dir: str | Path, files: dict[str, list[dict]], manifest: dict) -> dict[str, int]:
    """Writes each file (relative path -> records), then `manifest.json` with their counts added."""
    out_dir = storage.path(out_dir)
    for relative, records in files.items():
        atomic_write_jsonl(out_dir / relative, records)
    counts = {relative: len(records) for relative, records in files.items()}
    atomic_write_json(out_dir / "manifest.json", {**manifest, "counts": counts})
    return counts
