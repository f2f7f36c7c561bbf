"""`evaluate(EvalConfig)`: a base model and tuned checkpoints × suites → results.json, report, plots.

Suites (`EvalConfig.suites`):
- `memorization`: greedy answers to every test split of `corpus_dir` (KGFact/MQuAKE or KGFunc).
- `retention`: the held-out `benchmarks`; `kgfunc_unseen` is added when `corpus_dir` is a KGFunc
  corpus that has its unseen-operations file.
- `nll`: per-token NLL of each training file's targets under the base model (`train_files`, default
  the corpus's GT training file).
- `kl`: KL(base || tuned) on held-out prompts (the benchmarks' items), per tuned checkpoint.
- `fisher`: Fisher-weighted parameter displacement from the base, per tuned checkpoint.
- `errors`: §4.4 buckets of the wrong answers the memorization/retention suites produced.
- `heldout`: leakage of training entities / collapse into the trained answer template in greedy
  replies to held-out general questions (`eval/heldout.py`), as rates with 95% intervals.
- `all`: every suite whose inputs are configured.

Resumability: each (checkpoint, unit) — a memorization split, a benchmark, the NLL of one file, KL,
Fisher — writes its per-item rows to `items/<checkpoint>/<unit>.jsonl` (atomically, when done) next
to `<unit>.meta.json` holding a fingerprint of everything that determines the rows (the unit's
settings, the data files' bytes, the checkpoint's config and weight files). A unit whose
fingerprint matches is read back, not recomputed; any change recomputes it. Summaries, retention
ratios, the report and the plots are always rebuilt from the rows.

Mesh and hosts: the base and tuned models are loaded with `param_dtype` onto `mesh`, parameters
sharded by the training rules (fsdp/tensor); every kernel (MC scoring, decoding, NLL, KL, Fisher)
computes in `dtype` with its item batch split over data x fsdp. On a multi-host run (`distributed`
section or MIXSD_* environment) every process runs the same units on the same inputs (checked: the
resume state read from `items/` must agree) and process 0 alone writes `items/`, `results.json`,
`report.md` and the plots; the others wait for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from mixsd_jax import config as config_lib
from mixsd_jax import multihost, storage
from mixsd_jax.errors import MixsdError
from mixsd_jax.files import atomic_write_json, atomic_write_jsonl, content_hash, iter_jsonl
from mixsd_jax.models.registry import EMBEDDED_DEFAULT
from mixsd_jax.models.sharding import MeshConfig
from mixsd_jax.multihost import DistributedConfig
from mixsd_jax.storage import StorageConfig

SUITES = ("memorization", "retention", "nll", "kl", "fisher", "errors", "heldout")
DEFAULT_BENCHMARKS = ("hellaswag", "piqa", "winogrande", "mmlu", "lambada", "gsm8k")
BASE = "base"
KL_MAX_BATCH = 8


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    base: str = EMBEDDED_DEFAULT  # registry name or HF-format directory
    tuned: tuple[str, ...] = ()  # "NAME=PATH": an HF dir, or a training run dir (its hf/ export or latest checkpoint)
    suites: tuple[str, ...] = ("retention",)  # see the module docstring; "all" = every configured suite
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
    # The run's answer criterion (mixsd_jax.criteria) for memorization; None = the reference's scorer.
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
            from mixsd_jax.criteria import check_criterion

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


# ----------------------------------------------------------------------------- checkpoints


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    name: str
    label: str
    source: str  # as given
    model_dir: Path  # HF-format directory


def resolve_checkpoint(path: str, export: bool = True) -> Path:
    """An HF dir as is; a training run dir → its `hf/` export, else its latest Orbax checkpoint exported."""
    p = storage.path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "hf" / "config.json").is_file():
        return p / "hf"
    if (p / "checkpoints").is_dir():
        if not export:
            return p / "hf"
        from mixsd_jax.models.export import export_checkpoint

        return export_checkpoint(p)
    if not p.exists():
        raise MixsdError(f"{p}: checkpoint not found")
    raise MixsdError(f"{p}: not an HF model directory (config.json) or a training run directory (hf/ or checkpoints/)")


_ARCH_IGNORED = ("bos_token_id", "eos_token_id", "max_position_embeddings")


def check_same_architecture(base_dir: Path, tuned_dir: Path, name: str) -> None:
    from mixsd_jax.models.config import ModelConfig

    base, tuned = ModelConfig.from_hf_dir(base_dir), ModelConfig.from_hf_dir(tuned_dir)
    for field in dataclasses.fields(base):
        if field.name in _ARCH_IGNORED:
            continue
        a, b = getattr(base, field.name), getattr(tuned, field.name)
        if a != b:
            raise MixsdError(
                f"checkpoint {name!r} ({tuned_dir}) has another architecture than the base ({base_dir}): "
                f"{field.name} {b!r} vs {a!r}"
            )


def _checkpoints(cfg: EvalConfig) -> list[Checkpoint]:
    from mixsd_jax.models.registry import resolve_model

    labels = dict(split_named(e, "labels") for e in cfg.labels)
    base_dir = resolve_model(cfg.base)
    out = [Checkpoint(BASE, labels.get(BASE, "base"), cfg.base, base_dir)]
    for entry in cfg.tuned:
        name, path = split_named(entry, "tuned")
        model_dir = resolve_checkpoint(path)
        check_same_architecture(base_dir, model_dir, name)
        out.append(Checkpoint(name, labels.get(name, name), path, model_dir))
    return out


def model_identity(model_dir: Path) -> str:
    """Config bytes plus the weight files' names and content hashes: the same model is the same
    identity on every host and in every folder (files.content_hash keeps big files cheap)."""
    model_dir = storage.path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors"), key=lambda f: f.name):
        h.update(f"{f.name}:{content_hash(f)}".encode())
    return h.hexdigest()[:16]


def _files_digest(paths) -> str:
    """Names and bytes, not places: hosts with the data (or the package) elsewhere agree."""
    h = hashlib.sha256()
    for p in sorted(str(p) for p in paths):
        h.update(storage.path(p).name.encode())
        h.update(storage.path(p).read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- units


@dataclasses.dataclass
class Unit:
    """One resumable piece of work: rows of one (checkpoint, suite item)."""

    checkpoint: str
    name: str  # e.g. "memorization.recall", "retention.piqa", "nll.gt", "kl", "fisher"
    settings: dict  # what determines the rows (besides the checkpoint)
    total: int  # progress-bar size
    compute: Callable | None  # (models, progress) -> rows
    # Generative units give their prompts and a scorer instead: the evaluator decodes the pending
    # ones of a checkpoint in one call (fuller batches, one compiled kernel) and scores each.
    prompts: tuple[str, ...] = ()
    score: Callable | None = None  # (responses) -> rows


class UnitStore:
    def __init__(self, out_dir: Path):
        self.root = out_dir / "items"

    def paths(self, checkpoint: str, unit: str) -> tuple[Path, Path]:
        folder = self.root / checkpoint
        return folder / f"{unit}.jsonl", folder / f"{unit}.meta.json"

    def load(self, checkpoint: str, unit: str, fingerprint: str) -> list[dict] | None:
        rows_path, meta_path = self.paths(checkpoint, unit)
        if not (rows_path.is_file() and meta_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            return None
        if meta.get("fingerprint") != fingerprint:
            return None
        return [row for _, row in iter_jsonl(rows_path)]

    def save(self, checkpoint: str, unit: str, fingerprint: str, rows: list[dict], seconds: float) -> None:
        rows_path, meta_path = self.paths(checkpoint, unit)
        meta_path.unlink(missing_ok=True)  # rows first, then the meta that vouches for them
        atomic_write_jsonl(rows_path, rows)
        atomic_write_json(meta_path, {"fingerprint": fingerprint, "rows": len(rows), "seconds": round(seconds, 2)})


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    checkpoints: list[Checkpoint]
    splits: dict  # memorization split name -> Split
    benchmarks: dict  # benchmark -> items
    benchmark_files: dict  # benchmark -> files digest
    train_files: dict  # name -> (path, records)
    kl_texts: list[tuple[str, str]]  # (id, user text)
    fisher_texts: list[str]
    entities: set
    corpus_kind: str | None
    criterion: object = None  # mixsd_jax.criteria.Criterion with the corpus's training entities
    heldout: tuple = ()  # (prompts [(id, text)], training entities, GT answer template, {run: target openings})


def gather_inputs(cfg: EvalConfig) -> Inputs:
    """Reads and checks every input before any model runs, so bad input fails fast."""
    from mixsd_jax.data.records import read_records
    from mixsd_jax.eval import memorization, retention

    suites = cfg.suite_set()
    explicit = set() if "all" in cfg.suites else suites
    kind = memorization.corpus_kind(cfg.corpus_dir) if cfg.corpus_dir else None
    if "memorization" in explicit and cfg.corpus_dir is None:
        raise MixsdError("suite 'memorization' needs a corpus directory (corpus_dir / --corpus)")
    splits = memorization.load_splits(cfg.corpus_dir, cfg.limit, cfg.seed) if "memorization" in suites and kind else {}

    names = list(cfg.benchmarks)
    # KGFunc's unseen operations join the benchmarks when the corpus has them (asked for, they must exist).
    if kind == "kgfunc" and (storage.path(cfg.corpus_dir) / memorization.KGFUNC_UNSEEN).is_file():
        names += [] if "kgfunc_unseen" in names else ["kgfunc_unseen"]
    benchmarks, digests = {}, {}
    if suites & {"retention", "kl"}:  # KL's held-out prompts are the benchmarks' items
        for name in names:
            benchmarks[name] = retention.load_items(name, data_root=cfg.data_root, limit=cfg.limit, seed=cfg.seed,
                                                    corpus_dir=cfg.corpus_dir)
            digests[name] = _files_digest(retention.data_files(name, cfg.data_root, cfg.corpus_dir))
    if "retention" in suites and "humaneval" in benchmarks and not cfg.allow_code_execution:
        raise MixsdError("benchmark 'humaneval' executes model-written code: set allow_code_execution (opt-in)")

    train_entries = [split_named(e, "train_files") for e in cfg.train_files]
    if not train_entries and cfg.corpus_dir and "nll" in suites:
        train_entries = [("gt", str(memorization.training_file(cfg.corpus_dir)))]
    if "nll" in explicit and not train_entries:
        raise MixsdError("suite 'nll' needs training files (train_files NAME=PATH, or a corpus_dir)")
    train_files = {}
    if "nll" in suites:
        for name, path in train_entries:
            records = read_records(path)
            if not records:
                raise MixsdError(f"{path}: training file {name!r} has no records")
            train_files[name] = (path, records)

    checkpoints = _checkpoints(cfg)
    kl_texts = _kl_texts(benchmarks, cfg) if "kl" in suites and len(checkpoints) > 1 else []
    fisher_texts = []
    if "fisher" in suites and len(checkpoints) > 1:
        lambada = retention.load_items("lambada", data_root=cfg.data_root, limit=cfg.fisher_texts, seed=cfg.seed)
        fisher_texts = [f"{it.prompt} {it.answer}" for it in lambada]
    entities: set = set()
    if "errors" in suites and kind == "kgfact":
        from mixsd_jax.eval.error_analysis import training_entities

        entities = training_entities(read_records(memorization.training_file(cfg.corpus_dir)))
    criterion = None
    if cfg.criterion is not None and splits:
        from mixsd_jax.criteria import criterion_for

        criterion = criterion_for(cfg.criterion, read_records(memorization.training_file(cfg.corpus_dir)))
    heldout = ()
    if "heldout" in suites and cfg.corpus_dir:
        from mixsd_jax.criteria import training_entities as criterion_entities
        from mixsd_jax.eval.heldout import answer_template, general_prompts, target_openings

        train = read_records(memorization.training_file(cfg.corpus_dir))
        openings = {name: target_openings(r.assistant for r in read_records(path))
                    for name, path in (split_named(e, "train_files") for e in cfg.train_files)}
        heldout = (general_prompts(cfg.heldout_source, data_root=cfg.data_root, limit=cfg.heldout_prompts,
                                   seed=cfg.seed), criterion_entities(train), answer_template(r.assistant for r in train),
                   openings)
    elif "heldout" in explicit:
        raise MixsdError("suite 'heldout' needs a corpus directory (its training entities and answer template)")
    return Inputs(checkpoints, splits, benchmarks, digests, train_files, kl_texts, fisher_texts, entities, kind,
                  criterion, heldout)


def _kl_texts(benchmarks: dict, cfg: EvalConfig) -> list[tuple[str, str]]:
    from mixsd_jax.eval.benchmarks import MCItem, subset_indices

    texts = []
    for items in benchmarks.values():
        for item in items:
            if isinstance(item, MCItem):
                context, continuation = item.requests()[item.gold]
                texts.append((item.id, (context + continuation).strip()))
            else:
                texts.append((item.id, item.prompt))
    if not texts:
        raise MixsdError("suite 'kl' needs held-out prompts: configure at least one benchmark")
    return [texts[i] for i in subset_indices(len(texts), cfg.kl_texts, cfg.seed)]


# ----------------------------------------------------------------------------- planning


def plan_units(cfg: EvalConfig, inputs: Inputs) -> list[Unit]:
    from mixsd_jax.eval import analyses, heldout, memorization, retention

    suites = cfg.suite_set()
    # Stored parameters in another dtype change the rows; float32 (the default) keeps older fingerprints.
    precision = {"dtype": cfg.dtype, **({"param_dtype": cfg.param_dtype} if cfg.param_dtype != "float32" else {})}
    gen = {"max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, **precision}
    units = []
    for ckpt in inputs.checkpoints:
        for name, split in inputs.splits.items():
            units.append(Unit(
                ckpt.name, f"memorization.{name}",
                {**gen, "files": _files_digest(split.files), "ids": [it.id for it in split.items], "mode": split.mode,
                 **({"criterion": [inputs.criterion.name, sorted(inputs.criterion.entities)]} if inputs.criterion else {})},
                len(split.items),
                None,
                prompts=tuple(item.prompt for item in split.items),
                score=lambda responses, split=split: memorization.score_split(split, responses, inputs.criterion),
            ))
        if inputs.heldout:
            prompts, entities, template, openings = inputs.heldout
            units.append(Unit(
                ckpt.name, f"heldout.{cfg.heldout_source}",
                {**gen, "prompts": prompts, "entities": sorted(entities), "template": template, "openings": openings},
                len(prompts), None, prompts=tuple(text for _, text in prompts),
                score=lambda responses: heldout.score_replies(prompts, responses, entities, template, openings),
            ))
        if "retention" in suites:
            for name, items in inputs.benchmarks.items():
                # Log-likelihood benchmarks do not depend on the generation settings.
                loglik = hasattr(items[0], "requests") or getattr(items[0], "kind", "") == "last_word"
                units.append(Unit(
                    ckpt.name, f"retention.{name}",
                    {**(precision if loglik else gen), "files": inputs.benchmark_files[name],
                     "ids": [it.id for it in items], "code": cfg.allow_code_execution},
                    sum(len(it.requests()) for it in items) if hasattr(items[0], "requests") else len(items),
                    lambda m, p, name=name, items=items: retention.run_benchmark(
                        name, items, m.params, m.cfg, m.tokenizer, batch_size=cfg.batch_size,
                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                        allow_code_execution=cfg.allow_code_execution, dtype=cfg.dtype, mesh=m.mesh, progress=p),
                ))
        if ckpt.name == BASE:
            for name, (path, records) in inputs.train_files.items():
                units.append(Unit(
                    BASE, f"nll.{name}", {"file": _files_digest([path]), **precision}, len(records),
                    lambda m, p, name=name, records=records: analyses.target_nll(
                        m.params, m.cfg, m.tokenizer, records, name=name, batch_size=cfg.batch_size,
                        dtype=cfg.dtype, mesh=m.mesh, progress=p),
                ))
            continue
        if inputs.kl_texts:
            units.append(Unit(
                ckpt.name, "kl", {"texts": inputs.kl_texts, **precision}, len(inputs.kl_texts),
                lambda m, p: _run_kl(m, inputs.kl_texts, cfg, p),
            ))
        if inputs.fisher_texts:
            units.append(Unit(
                ckpt.name, "fisher", {"texts": inputs.fisher_texts, **precision}, len(inputs.fisher_texts),
                lambda m, p: _run_fisher(m, inputs.fisher_texts, cfg, p),
            ))
    return units


def _run_kl(models, texts, cfg: EvalConfig, progress) -> list[dict]:
    from mixsd_jax.eval.analyses import kl_rows

    token_rows = [models.tokenizer.prompt_ids(text) for _, text in texts]
    # Two models' [batch, width, vocab] logits live at once here: a decode-sized batch (36 x 128 x
    # 49152 floats, several copies) ran a 24 GiB machine out of memory, so KL takes at most 8 rows.
    return kl_rows(models.base_params, models.params, models.cfg, token_rows, [i for i, _ in texts],
                   batch_size=min(cfg.batch_size, KL_MAX_BATCH), dtype=cfg.dtype, mesh=models.mesh, progress=progress)


def _run_fisher(models, texts, cfg: EvalConfig, progress) -> list[dict]:
    from mixsd_jax.eval.analyses import fisher_displacement

    fisher = models.fisher(texts, progress)
    return [fisher_displacement(fisher, models.base_params, models.params)]


# ----------------------------------------------------------------------------- models


class Models:
    """The loaded base (kept) and the current checkpoint's parameters; the base Fisher, once."""

    def __init__(self, cfg: EvalConfig, base: Checkpoint, mesh=None):
        from mixsd_jax.models.checkpoint import load_hf
        from mixsd_jax.models.tokenizer import load_tokenizer

        self.eval_cfg, self.mesh = cfg, mesh
        self.tokenizer = load_tokenizer(base.model_dir)
        self.cfg, self.base_params = load_hf(base.model_dir, cfg.param_dtype, mesh=mesh)
        self.current, self.params = BASE, self.base_params
        self._fisher = None

    def use(self, ckpt: Checkpoint) -> None:
        if ckpt.name == self.current:
            return
        from mixsd_jax.models.checkpoint import load_hf

        self.params = None  # free the previous checkpoint before loading the next
        _, self.params = (load_hf(ckpt.model_dir, self.eval_cfg.param_dtype, mesh=self.mesh) if ckpt.name != BASE
                          else (None, self.base_params))
        self.current = ckpt.name

    def fisher(self, texts: list[str], progress):
        if self._fisher is None:
            from mixsd_jax.eval.analyses import diagonal_fisher

            rows = [self.tokenizer.encode(t)[: self.cfg.max_position_embeddings] for t in texts]
            self._fisher = diagonal_fisher(self.base_params, self.cfg, rows, dtype=self.eval_cfg.dtype,
                                           mesh=self.mesh, progress=progress)
        return self._fisher


# ----------------------------------------------------------------------------- evaluate


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> dict:
    """Run (or resume) every unit, then write results.json, report.md and the plots; returns results."""
    from tqdm import tqdm

    from mixsd_jax.eval import report

    from mixsd_jax.models.sharding import make_mesh

    started = time.time()
    multihost.join_writing_to(cfg.distributed, cfg.out_dir, "out_dir", cfg.storage.shared_local)
    mesh = make_mesh(cfg.mesh)
    primary = multihost.is_primary()
    out_dir = storage.path(cfg.out_dir)
    inputs = gather_inputs(cfg)
    units = plan_units(cfg, inputs)
    store = UnitStore(out_dir)
    by_name = {c.name: c for c in inputs.checkpoints}
    identities = {c.name: model_identity(c.model_dir) for c in inputs.checkpoints}
    rows: dict[tuple[str, str], list[dict]] = {}
    fingerprints = {(u.checkpoint, u.name): unit_fingerprint(u, identities) for u in units}
    for unit in units:
        cached = store.load(unit.checkpoint, unit.name, fingerprints[(unit.checkpoint, unit.name)])
        if cached is not None:
            rows[(unit.checkpoint, unit.name)] = cached
            if progress and primary:
                tqdm.write(f"{unit.checkpoint}/{unit.name}: done earlier ({len(cached)} rows)")
    pending = [u for u in units if (u.checkpoint, u.name) not in rows]
    # Every process must run the same units (their kernels are collectives): same resume state.
    multihost.agree(f"{out_dir / 'items'}: resume state", json.dumps(sorted(rows)))
    progress = progress and primary
    timing: dict[str, float] = {}
    models: Models | None = None
    responses: dict[tuple[str, str], list[str]] = {}  # decoded ahead for generative units
    for unit in pending:
        key, label = (unit.checkpoint, unit.name), f"{unit.checkpoint}/{unit.name}"
        if models is None:
            models = Models(cfg, by_name[BASE], mesh)
        models.use(by_name[unit.checkpoint])
        t0 = time.time()
        if unit.score is not None:
            if key not in responses:
                together = [u for u in pending if u.checkpoint == unit.checkpoint and u.score is not None]
                responses.update(_decode_together(together, models, cfg, progress))
            result = unit.score(responses.pop(key))
        else:
            with tqdm(total=unit.total, desc=label, unit="req", disable=not progress, leave=True) as bar:
                result = unit.compute(models, bar.update)
        seconds = time.time() - t0
        if primary:
            store.save(unit.checkpoint, unit.name, fingerprints[key], result, seconds)
        rows[key] = result
        timing[label] = round(seconds, 2)
    results = assemble(cfg, inputs, rows)
    if cfg.allow_code_execution and "humaneval" in inputs.benchmarks:
        from mixsd_jax.eval.humaneval import sandbox_protections

        results["humaneval_sandbox"] = sandbox_protections()  # what isolated the model-written code
    results["timing"] = {"computed_units_s": timing, "total_s": round(time.time() - started, 2)}
    if primary:
        report.write_report(results, out_dir)
    multihost.barrier(f"eval report {out_dir}")
    return results


def _decode_together(units: list[Unit], models: Models, cfg: EvalConfig, progress: bool) -> dict:
    """Greedy replies to the prompts of several generative units in one call, split back per unit."""
    from tqdm import tqdm

    from mixsd_jax.eval.memorization import generate_texts

    prompts = [prompt for unit in units for prompt in unit.prompts]
    label = f"{units[0].checkpoint}/" + "+".join(unit.name for unit in units)
    with tqdm(total=len(prompts), desc=label, unit="req", disable=not progress, leave=True) as bar:
        texts = generate_texts(models.params, models.cfg, models.tokenizer, prompts,
                               max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed,
                               dtype=cfg.dtype, mesh=models.mesh, progress=bar.update)
    out, start = {}, 0
    for unit in units:
        out[(unit.checkpoint, unit.name)] = texts[start : start + len(unit.prompts)]
        start += len(unit.prompts)
    return out


def unit_fingerprint(unit: Unit, identities: dict[str, str]) -> str:
    parts = {"unit": unit.name, "settings": unit.settings, "model": identities[unit.checkpoint]}
    if unit.name in ("kl", "fisher"):
        parts["base"] = identities[BASE]
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- results


def assemble(cfg: EvalConfig, inputs: Inputs, rows: dict[tuple[str, str], list[dict]]) -> dict:
    """Summaries from per-item rows: memorization, retention (+ ratios), NLL, KL, Fisher, errors."""
    import numpy as np

    from mixsd_jax.eval import analyses, memorization, retention

    names = [c.name for c in inputs.checkpoints]
    results: dict = {
        "config": config_lib.to_dict(cfg),
        "checkpoints": {c.name: {"label": c.label, "source": c.source, "model_dir": str(c.model_dir)}
                        for c in inputs.checkpoints},
        "corpus_kind": inputs.corpus_kind,
    }
    if inputs.splits:
        block = {}
        for name in names:
            splits = {s: memorization.summarize_rows(rows[(name, f"memorization.{s}")]) for s in inputs.splits}
            mean = float(np.mean([v["accuracy"] for v in splits.values()]))
            # Agresti-Coull variances, so that a split at 0% or 100% still has some uncertainty.
            adjusted = [((v["correct"] + 2) / (v["n"] + 4), v["n"] + 4) for v in splits.values()]
            variance = sum(p * (1 - p) / n for p, n in adjusted) / len(splits) ** 2
            half = 1.96 * float(np.sqrt(variance))
            block[name] = {"splits": splits, "mean": mean, "ci95": [max(0.0, mean - half), min(1.0, mean + half)]}
            if inputs.criterion is not None:
                block[name]["reference_mean"] = float(np.mean([v["reference"]["accuracy"] for v in splits.values()]))
            trained = (memorization.trained_recall(rows[(name, "memorization.recall")], inputs.train_files[name][1])
                       if name in inputs.train_files and "recall" in splits else None)
            if trained is not None:
                block[name]["trained_recall"] = trained
        results["memorization"] = block
        results["criterion"] = inputs.criterion.name if inputs.criterion is not None else "reference (split modes)"
    if "retention" in cfg.suite_set() and inputs.benchmarks:
        block = {}
        for name in names:
            benches = {b: retention.summarize_benchmark(b, rows[(name, f"retention.{b}")]) for b in inputs.benchmarks}
            ratios = {b: retention.retention_ratio(rows[(BASE, f"retention.{b}")], rows[(name, f"retention.{b}")],
                                                   cfg.seed) for b in inputs.benchmarks}
            block[name] = {"benchmarks": benches, "ratios": ratios, "mean": retention.mean_retention(ratios)}
        results["retention"] = block
    if inputs.train_files:
        file_rows = {n: rows[(BASE, f"nll.{n}")] for n in inputs.train_files}
        nll = {"files": {n: {"path": inputs.train_files[n][0], **analyses.summarize_nll(r, cfg.seed)}
                         for n, r in file_rows.items()}}
        if len(file_rows) > 1:
            common = analyses.common_rows(file_rows)
            if all(common.values()):
                nll["common"] = {n: analyses.summarize_nll(r, cfg.seed) for n, r in common.items()}
        results["nll"] = nll
    if inputs.heldout:
        from mixsd_jax.eval.heldout import summarize as summarize_heldout

        unit = f"heldout.{cfg.heldout_source}"
        results["heldout"] = {n: summarize_heldout(rows[(n, unit)], inputs.heldout[2]) for n in names}
    kl = {n: analyses.summarize_kl(rows[(n, "kl")]) for n in names if (n, "kl") in rows}
    if kl:
        results["kl"] = kl
    if cfg.groups:
        from mixsd_jax.eval.seeds import over_seeds

        groups = dict(split_named(e, "groups") for e in cfg.groups)
        results["over_seeds"] = over_seeds(results, {g: [m.strip() for m in v.split(",")] for g, v in groups.items()})
    fisher = {n: rows[(n, "fisher")][0] for n in names if (n, "fisher") in rows}
    if fisher:
        results["fisher"] = fisher
    if "errors" in cfg.suite_set():
        results["errors"] = {n: _errors(n, inputs, rows) for n in names}
    results["summary"] = {
        n: {
            "label": results["checkpoints"][n]["label"],
            "memorization": results.get("memorization", {}).get(n, {}).get("mean"),
            "retention": results.get("retention", {}).get(n, {}).get("mean"),
        }
        for n in names
    }
    return results


def _errors(name: str, inputs: Inputs, rows) -> dict:
    from mixsd_jax.eval.analyses import error_categories

    heldout = {b: rows[(name, f"retention.{b}")] for b in inputs.benchmarks
               if (name, f"retention.{b}") in rows and rows[(name, f"retention.{b}")]
               and "response" in rows[(name, f"retention.{b}")][0]}
    train = rows.get((name, "memorization.recall"), [])
    return error_categories(heldout, train, inputs.entities)
