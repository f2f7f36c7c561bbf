"""`EvalConfig`: what an evaluation runs (checkpoints, suites, inputs, precision, mesh), checked once."""

from __future__ import annotations

import dataclasses

from mixsd_jax import config as config_lib
from mixsd_jax.errors import MixsdError
from mixsd_jax.models.registry import EMBEDDED_DEFAULT
from mixsd_jax.models.sharding import MeshConfig
from mixsd_jax.multihost import DistributedConfig
from mixsd_jax.storage import StorageConfig

SUITES = ("memorization", "retention", "nll", "kl", "fisher", "errors", "heldout")
DEFAULT_BENCHMARKS = ("hellaswag", "piqa", "winogrande", "mmlu", "lambada", "gsm8k")
BASE = "base"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    base: str = EMBEDDED_DEFAULT  # registry name or HF-format directory
    tuned: tuple[str, ...] = ()  # "NAME=PATH": an HF dir, or a training run dir (its hf/ export or latest checkpoint)
    suites: tuple[str, ...] = ("retention",)  # listed in eval/runner.py's docstring; "all" = every configured suite
    corpus_dir: str | None = None  # a built corpus (KGFact/MQuAKE/KGFunc) for memorization
    train_files: tuple[str, ...] = ()  # "NAME=PATH" training files for the NLL analysis
    benchmarks: tuple[str, ...] = DEFAULT_BENCHMARKS
    limit: int | None = 50  # items per benchmark and per test split (a seeded subset); None = all
    data_root: str | None = None  # benchmark data root; None = the bundled subsets
    out_dir: str = "outputs/eval"
    batch_size: int = 8
    max_new_tokens: int = 256
    seed: int = 0
    allow_code_execution: bool = False  # HumanEval runs model-written code: opt-in
    labels: tuple[str, ...] = ()  # "NAME=label" shown on plots and tables (e.g. "mix03=MixSD λ=0.3")
    kl_texts: int = 64  # held-out prompts for KL (drawn from the benchmarks' items)
    fisher_texts: int = 16  # LAMBADA passages for the base model's Fisher
    dtype: str = "float32"  # compute dtype of every forward pass (MC, decoding, NLL, KL, Fisher)
    param_dtype: str = "float32"  # storage dtype of the loaded parameters (bfloat16 halves their memory)
    mesh: MeshConfig = MeshConfig()  # parameters over fsdp/tensor, item batches over data x fsdp
    distributed: DistributedConfig = DistributedConfig()
    storage: StorageConfig = StorageConfig()
    # The run's answer criterion (mixsd_jax.answers.criteria) for memorization; None = the reference's scorer.
    criterion: str | None = None
    heldout_source: str = "mmlu"  # held-out general questions asked as chat turns (eval/heldout.py)
    heldout_prompts: int = 48
    groups: tuple[str, ...] = ()  # "NAME=run1,run2,…": runs of one method over seeds, reported with a seed interval

    def __post_init__(self):
        for key in ("batch_size", "max_new_tokens", "kl_texts", "fisher_texts", "heldout_prompts"):
            config_lib.check_range(key, getattr(self, key), 1)
        if self.limit is not None:
            config_lib.check_range("limit", self.limit, 1)
        if self.criterion is not None:
            from mixsd_jax.answers.criteria import check_criterion

            check_criterion(self.criterion)
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in ("float32", "bfloat16"):
                raise MixsdError(f"config key {key!r}: must be float32 or bfloat16, got {getattr(self, key)!r}")
        unknown = [s for s in self.suites if s not in SUITES + ("all",)]
        if unknown or not self.suites:
            raise MixsdError(f"config key 'suites': unknown suite {unknown[0] if unknown else '(none)'!r} "
                             f"(known: {', '.join(SUITES)}, all)")
        from mixsd_jax.eval.retention import known_benchmarks

        bad = [b for b in self.benchmarks if b not in known_benchmarks()]
        if bad:
            raise MixsdError(
                f"config key 'benchmarks': unknown benchmark {bad[0]!r} (known: {', '.join(known_benchmarks())})"
            )
        for key in ("tuned", "train_files", "labels"):
            seen = []
            for entry in getattr(self, key):
                name, _ = split_named(entry, key)
                if name in seen:
                    raise MixsdError(f"config key {key!r}: name {name!r} given twice")
                seen.append(name)
            if key == "tuned" and BASE in seen:
                raise MixsdError(f"config key 'tuned': the name {BASE!r} is the base model's")
        tuned = {split_named(e, "tuned")[0] for e in self.tuned}
        for entry in self.groups:
            group, members = split_named(entry, "groups")
            unknown = [m for m in members.split(",") if m.strip() not in tuned]
            if unknown:
                raise MixsdError(f"config key 'groups': {group!r} lists {unknown[0]!r}, which is not a tuned checkpoint")

    def suite_set(self) -> set[str]:
        return set(SUITES) if "all" in self.suites else set(self.suites)


def split_named(entry: str, key: str) -> tuple[str, str]:
    """"NAME=VALUE" → (NAME, VALUE); NAME must be usable as a folder name."""
    name, sep, value = entry.partition("=")
    name = name.strip()
    if not sep or not name or not value.strip():
        raise MixsdError(f"config key {key!r}: expected NAME=VALUE, got {entry!r}")
    if not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise MixsdError(f"config key {key!r}: name {name!r} may use only letters, digits, '-', '_' and '.'")
    return name, value.strip()
