"""`ExperimentConfig`: one YAML file describes a whole experiment.

The stage sections (`generation`, `train`, `eval`) hold the keys of the stage configs
(`GenerateConfig`, `TrainConfig`, `EvalConfig`) shared by every run; the plan fills in what the
pipeline owns (input files, output folders, the model, λ and T per run) and validates the rest
with the stage config's own checks, so a typo fails at load time, before any expensive work.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from mixsd_jax import config as config_lib
from mixsd_jax.errors import MixsdError
from mixsd_jax.models.registry import EMBEDDED_DEFAULT
from mixsd_jax.models.sharding import MeshConfig
from mixsd_jax.pipeline.selection import SelectionConfig
from mixsd_jax.multihost import DistributedConfig
from mixsd_jax.storage import StorageConfig

METHODS = ("base", "sft", "opsd", "mixsd", "memit")


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Where the training facts and the memorization test splits come from.

    kgfact/kgfunc are built here; simpleqa/mquake are converted from `source`; `released` imports
    the authors' dataset folder at `source`; `directory` uses an already built corpus at `source`.
    """

    kind: Literal["kgfact", "kgfunc", "simpleqa", "mquake", "released", "directory"] = "kgfact"
    preset: str | None = None  # None: the builder's default
    seed: int = 42
    source: str | None = None
    limit: int | None = None  # simpleqa: first N shuffled rows
    num_domains: int | None = None  # kgfact
    num_entities: int | None = None  # kgfact
    num_compositional: int | None = None  # kgfact
    max_facts: int | None = None  # mquake
    eval_max_facts: int | None = None  # mquake
    train_file: str | None = None  # relative to the corpus root; None: the kind's standard file

    def __post_init__(self):
        config_lib.check_range("corpus.seed", self.seed, 0)
        if self.kind in ("released", "directory", "mquake") and not self.source:
            raise MixsdError(f"config key 'corpus.source': required for corpus kind {self.kind!r}")
        if self.limit is not None:
            config_lib.check_range("corpus.limit", self.limit, 1)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    out_dir: str = "experiments/experiment"
    model: str = EMBEDDED_DEFAULT  # registry name or HF-format directory
    # A scaling study: one pipeline per entry (a model name/directory, or a mapping with `model`,
    # optional `name` and per-model section overrides), sharing the corpus; replaces `model`.
    # Entries are validated by pipeline/study.py, which knows which sections a model may override.
    models: tuple[Any, ...] = ()
    corpus: CorpusConfig = CorpusConfig()
    methods: tuple[str, ...] = ("base", "sft", "mixsd")
    lambdas: tuple[float, ...] = (0.3,)  # one MixSD run per (λ, T)
    temperatures: tuple[float, ...] = (0.0,)
    # One answer criterion (mixsd_jax.answers.criteria) for the whole run: the MixSD verifier and the
    # memorization scorer both use it. None: each stage's own default (extract mode; reference scorer).
    criterion: str | None = None
    # Training seeds (and MixSD generation seeds): one run per seed and method, reported with an
    # interval over seeds. Empty: one run with the sections' own seeds.
    seeds: tuple[int, ...] = ()
    generation: dict = dataclasses.field(default_factory=dict)  # GenerateConfig keys
    train: dict = dataclasses.field(default_factory=dict)  # TrainConfig keys
    # The OPSD run's own keys, over `train`'s: TrainConfig keys (lr, steps, warmup_steps ...) and
    # OpsdConfig keys (divergence, num_rollouts, max_new_tokens ...), in one flat section.
    opsd: dict = dataclasses.field(default_factory=dict)
    eval: dict = dataclasses.field(default_factory=dict)  # EvalConfig keys
    # The MEMIT edit's keys (EditConfig: layers, prompt, v_steps ...); its defaults are per model.
    memit: dict = dataclasses.field(default_factory=dict)
    mesh: MeshConfig = MeshConfig()  # used by every stage unless its section sets its own
    # Checkpoint selection by training recall (pipeline/selection.py); every=0: report the last step.
    selection: SelectionConfig = SelectionConfig()
    distributed: DistributedConfig = DistributedConfig()  # multi-host start-up, shared by every stage
    storage: StorageConfig = StorageConfig()  # a shared local out_dir, the compilation cache

    def __post_init__(self):
        if not self.name.strip():
            raise MixsdError("config key 'name': must not be empty")
        if not self.out_dir.strip():
            raise MixsdError("config key 'out_dir': must not be empty")
        if not str(self.model).strip():
            raise MixsdError("config key 'model': must not be empty")
        if not self.methods:
            raise MixsdError(f"config key 'methods': must list at least one of {list(METHODS)}")
        for i, method in enumerate(self.methods):
            if method not in METHODS:
                raise MixsdError(f"config key 'methods[{i}]': unknown method {method!r} (known: {', '.join(METHODS)})")
        if len(set(self.methods)) != len(self.methods):
            raise MixsdError(f"config key 'methods': {list(self.methods)} lists a method twice")
        if "mixsd" in self.methods:
            if not self.lambdas:
                raise MixsdError("config key 'lambdas': empty, but method 'mixsd' needs at least one λ (e.g. [0.3])")
            if not self.temperatures:
                raise MixsdError("config key 'temperatures': empty, but method 'mixsd' needs at least one T (e.g. [0])")
        for key in ("lambdas", "temperatures"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise MixsdError(f"config key {key!r}: {list(values)} lists a value twice")
        if self.criterion is not None:
            from mixsd_jax.answers.criteria import check_criterion

            check_criterion(self.criterion)
        if len(set(self.seeds)) != len(self.seeds):
            raise MixsdError(f"config key 'seeds': {list(self.seeds)} lists a seed twice")
        for i, seed in enumerate(self.seeds):
            config_lib.check_range(f"seeds[{i}]", seed, 0)
        for i, lam in enumerate(self.lambdas):
            config_lib.check_range(f"lambdas[{i}]", lam, 0.0, 1.0)
        for i, temperature in enumerate(self.temperatures):
            config_lib.check_range(f"temperatures[{i}]", temperature, 0.0)


def load_experiment(path=None, overrides=(), base: dict | None = None) -> ExperimentConfig:
    return config_lib.load(ExperimentConfig, path, overrides, base=base)
