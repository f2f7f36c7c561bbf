"""A scaling study: one pipeline per entry of `models:`, one shared corpus, one report over sizes.

Layout under `out_dir`:

    corpus/                 built once (its record: stages/corpus.json), read by every model
    <name>/                 one model's pipeline, exactly as a single-model experiment's folder
    <name>/study_model.json the model's parameter count and runs (what the scaling report reads)
    scaling/                scaling.json, report.md and the plots (eval/scaling.py)

Each model's stages are skipped, resumed or redone as in any pipeline, so a study killed during
its second model reruns nothing of the first. `only` runs the corpus and one model, then rewrites
the report from every model's results found on disk: slices that each run one model of the same
config share one report (`only="corpus"` builds the shared corpus alone, before they start;
`--only scaling` rewrites the report alone, see pipeline/commands.py).

An entry is a registry name or HF directory, or a mapping with `model`, an optional `name` (its
folder; default: the last part of `model`) and per-model sections (OVERRIDABLE) merged over the
study's. Methods, λ, seeds and the corpus stay shared, so every size is measured alike.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable, Mapping

from mixsd_jax import storage
from mixsd_jax import config as config_lib
from mixsd_jax.errors import MixsdError
from mixsd_jax.files import atomic_write_json
from mixsd_jax.pipeline.config import ExperimentConfig
from mixsd_jax.pipeline.plan import build_plan, method_run, trained_runs
from mixsd_jax.pipeline.stage import Plan

OVERRIDABLE = ("mesh", "generation", "train", "opsd", "eval", "selection", "memit")
RESERVED_NAMES = ("corpus", "scaling", "stages")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
STUDY_MODEL_FILE = "study_model.json"
CORPUS_ONLY = "corpus"  # `--only corpus`: build the shared corpus before slices start their models
REPORT_ONLY = "scaling"  # `--only scaling`: rewrite the scaling report from the model folders, run nothing


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str  # folder under out_dir, and what `--only` takes
    model: str  # registry name or HF-format directory
    overrides: dict  # {section: keys merged over the study's section}


@dataclasses.dataclass(frozen=True)
class Study:
    config: ExperimentConfig
    out_dir: Path
    entries: tuple[ModelEntry, ...]
    corpus: Plan  # the shared corpus stage alone, recorded under out_dir/stages
    plans: dict[str, Plan]  # model name -> its stages after the corpus (the `only` model alone when given)

    @property
    def report_dir(self) -> Path:
        return self.out_dir / "scaling"


def model_entries(cfg: ExperimentConfig) -> list[ModelEntry]:
    """The validated `models:` entries (names unique, only per-model sections overridden)."""
    entries = []
    for i, raw in enumerate(cfg.models):
        where = f"models[{i}]"
        if isinstance(raw, str):
            raw = {"model": raw}
        if not isinstance(raw, Mapping):
            raise MixsdError(f"config key {where!r}: expected a model name, an HF directory or a mapping with "
                             f"'model', got {raw!r}")
        fields = dict(raw)
        model = fields.pop("model", None)
        if not isinstance(model, str) or not model.strip():
            raise MixsdError(f"config key '{where}.model': required (a registry name or an HF-format directory)")
        name = fields.pop("name", None) or Path(model.rstrip("/")).name
        if not isinstance(name, str) or not _NAME.match(name) or name in RESERVED_NAMES:
            raise MixsdError(f"config key '{where}.name': {name!r} cannot name a folder under out_dir "
                             f"(letters, digits, '.', '_', '-'; not {', '.join(RESERVED_NAMES)})")
        for key, value in fields.items():
            if key not in OVERRIDABLE:
                raise MixsdError(f"config key '{where}.{key}': not a per-model setting (a model may set "
                                 f"{', '.join(OVERRIDABLE)}; the rest is shared by the study)")
            if not isinstance(value, Mapping):
                raise MixsdError(f"config key '{where}.{key}': expected a section (mapping), got {value!r}")
            _check_section_keys(f"{where}.{key}", key, value)
        entries.append(ModelEntry(name=name, model=model, overrides=fields))
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise MixsdError(f"config key 'models': two models named {entry.name!r} (give one its own 'name')")
        seen.add(entry.name)
    return entries


def _check_section_keys(where: str, section: str, keys: Mapping) -> None:
    """A per-model section may only name keys its stage config has (nested values: checked by the plan)."""
    known = set(_section_fields(section))
    for key in keys:
        if key not in known:
            raise MixsdError(f"unknown config key '{where}.{key}' (known in this section: {', '.join(sorted(known))})")


def _section_fields(section: str) -> list[str]:
    from mixsd_jax.models.sharding import MeshConfig
    from mixsd_jax.pipeline.selection import SelectionConfig
    from mixsd_jax.sampling.generator import GenerateConfig
    from mixsd_jax.edit.config import EditConfig
    from mixsd_jax.train.config import OpsdConfig, TrainConfig

    classes = {"mesh": [MeshConfig], "generation": [GenerateConfig], "train": [TrainConfig],
               "opsd": [TrainConfig, OpsdConfig], "selection": [SelectionConfig], "memit": [EditConfig]}
    if section == "eval":
        from mixsd_jax.eval.config import EvalConfig

        return [f.name for f in dataclasses.fields(EvalConfig)] + ["splits"]  # splits: the pipeline's corpus view
    return [f.name for cls in classes[section] for f in dataclasses.fields(cls)]


def model_config(cfg: ExperimentConfig, entry: ModelEntry) -> ExperimentConfig:
    """The single-model experiment of one entry: the study's settings, its sections merged over them."""
    data = config_lib.to_dict(cfg)
    data.pop("models")
    data = config_lib.merge(data, entry.overrides)
    data.update(name=f"{cfg.name}/{entry.name}", model=entry.model, out_dir=f"{cfg.out_dir.rstrip('/')}/{entry.name}")
    return _for_model(entry, lambda: config_lib.from_dict(ExperimentConfig, data))


def chosen_model_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The single-model experiment of the entry that `model=NAME` names (a tool that plans one model,
    e.g. `mixsd bench memory`, given a study config)."""
    entries = model_entries(cfg)
    for entry in entries:
        if cfg.model in (entry.name, entry.model):
            return model_config(cfg, entry)
    raise MixsdError(f"config key 'model': {cfg.model!r} is not a model of this study; pick one with model=NAME "
                     f"({', '.join(e.name for e in entries)})")


def _for_model(entry: ModelEntry, build: Callable):
    """Runs `build`; a config error names the model it is about."""
    try:
        return build()
    except MixsdError as exc:
        if repr(entry.name) in str(exc):  # the message already names it (an unknown model name)
            raise
        raise MixsdError(f"model {entry.name!r}: {exc}") from None


def build_study(cfg: ExperimentConfig, only: str | None = None, dry_run: bool = False) -> Study:
    """Every entry's config checked; the plans of every model (or of `only`) built, before any work.
    `dry_run`: a paper model not on this machine is planned from its known shapes (as `build_plan`)."""
    entries = model_entries(cfg)
    if not entries:
        raise MixsdError("config key 'models': empty (list the models of the study, or set 'model' alone)")
    names = [e.name for e in entries]
    if only is not None and only not in (*names, CORPUS_ONLY):
        raise MixsdError(f"--only {only!r}: not a model of this study (models: {', '.join(names)}; or "
                         f"{CORPUS_ONLY!r}: the shared corpus alone; {REPORT_ONLY!r}: the scaling report alone)")
    configs = {e.name: model_config(cfg, e) for e in entries}
    out = storage.path(cfg.out_dir)
    plans = {}
    for entry in entries:
        # `--only corpus` still plans the first model: its plan holds the corpus stage
        if only in (None, entry.name) or (only == CORPUS_ONLY and not plans):
            plans[entry.name] = _for_model(entry, lambda: build_plan(configs[entry.name], corpus_root=out / "corpus",
                                                                     dry_run=dry_run))
    first = next(iter(plans.values()))
    corpus = Plan(config=cfg, exp_dir=out, model_dir=first.model_dir, stages=first.stages[:1],
                  report=out / "scaling" / "report.md")
    if only == CORPUS_ONLY:
        plans = {}
    return Study(config=cfg, out_dir=out, entries=tuple(entries), corpus=corpus,
                 plans={name: dataclasses.replace(plan, stages=plan.stages[1:]) for name, plan in plans.items()})


def parameter_count(model_dir: Path, model: str | None = None) -> int:
    """Parameters of the model at `model_dir`, from its config.json (embeddings counted once when tied);
    of a paper model not yet downloaded (`model`, its registry name), from its known shapes."""
    import math

    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.models.known_shapes import known_model_config
    from mixsd_jax.models.transformer import param_shapes

    def count(tree) -> int:
        if isinstance(tree, dict):
            return sum(count(v) for v in tree.values())
        return math.prod(tree)

    known = None if model is None or (storage.path(model_dir) / "config.json").is_file() else known_model_config(model)
    return count(param_shapes(known or ModelConfig.from_hf_dir(model_dir)))


def study_model(plan: Plan, entry: ModelEntry) -> dict:
    """What the scaling report needs to know of one model beyond its results: size and runs."""
    cfg = plan.config
    model_type = json.loads((plan.model_dir / "config.json").read_text()).get("model_type")
    runs = [{"run": "base", "method": "base", "label": "base", "lambda": None, "temperature": None, "seed": None}]
    for name, lam, t in trained_runs(cfg):
        method = method_run(cfg, name)
        label = method.upper() if lam is None else f"MixSD λ={lam:g}" + (f" T={t:g}" if t else "")
        seed = int(name.rpartition("_s")[2]) if cfg.seeds else None
        runs.append({"run": name, "method": method, "label": label, "lambda": lam, "temperature": t, "seed": seed})
    return {"name": entry.name, "model": entry.model, "model_dir": str(plan.model_dir), "model_type": model_type,
            "parameters": parameter_count(plan.model_dir), "runs": runs}


def describe_study(study: Study) -> str:
    from mixsd_jax.pipeline.runner import describe, stage_status

    cfg = study.config
    stage = study.corpus.stages[0]
    lines = [f"study {cfg.name!r} in {study.out_dir}: {len(study.entries)} models "
             f"({', '.join(e.name for e in study.entries)}), one shared corpus",
             f" 0. {stage.name:<28} {stage_status(study.corpus, stage):<8} {stage.fingerprint}  {stage.description}"]
    for entry in study.entries:
        plan = study.plans.get(entry.name)
        if plan is None:
            lines.append(f"\nmodel {entry.name} ({entry.model}): not part of this run (--only)")
            continue
        lines.append(f"\nmodel {entry.name} ({entry.model}, {parameter_count(plan.model_dir, entry.model):,} parameters)")
        lines.append(describe(plan))
    lines.append(f"\nscaling report: {study.report_dir / 'report.md'}")
    return "\n".join(lines)


def run_study(study: Study, *, log: Callable[[str], None] = print) -> dict[str, Path]:
    """The corpus, then each model's pipeline in turn, then the scaling report; returns its paths."""
    from mixsd_jax import multihost
    from mixsd_jax.pipeline.runner import run_plan

    run_plan(study.corpus, log=log)
    entries = {e.name: e for e in study.entries}
    for i, (name, plan) in enumerate(study.plans.items(), 1):
        log(f"== model {i}/{len(study.plans)}: {name} ({plan.config.model}) in {plan.exp_dir}")
        if multihost.is_primary():
            atomic_write_json(plan.exp_dir / STUDY_MODEL_FILE, study_model(plan, entries[name]))
        run_plan(plan, log=log)
    paths: dict[str, Path] = {}
    if multihost.is_primary() and study.plans:
        paths = write_study_report(study.config)
    multihost.barrier("study report")
    return paths


def write_study_report(cfg: ExperimentConfig) -> dict[str, Path]:
    """The scaling report over every model of the study whose folder holds results (any process, any
    slice may have run them: the report reads only files, and needs no model on this machine)."""
    from mixsd_jax.eval.scaling import write_scaling_report

    entries = model_entries(cfg)
    out = storage.path(cfg.out_dir)
    models = [model_outputs(out / entry.name) for entry in entries]
    missing = [entry.name for entry, m in zip(entries, models) if m is None or m["results"] is None]
    return write_scaling_report(cfg.name, [m for m in models if m is not None and m["results"] is not None],
                                out / "scaling", missing=missing)


def model_outputs(exp_dir: Path) -> dict | None:
    """A model folder's study_model.json with its results and each run's chosen step; None before it ran."""
    described = exp_dir / STUDY_MODEL_FILE
    if not described.is_file():
        return None
    model = json.loads(described.read_text())
    results_path = exp_dir / "eval" / "results.json"
    model["results"] = json.loads(results_path.read_text()) if results_path.is_file() else None
    steps = {}
    for run in model["runs"]:
        selected = exp_dir / "select" / run["run"] / "selection.json"
        trained = exp_dir / "train" / run["run"] / "summary.json"
        if selected.is_file():
            sel = json.loads(selected.read_text())
            steps[run["run"]] = {"chosen_step": sel["chosen_step"], "last_step": sel["last_step"]}
        elif trained.is_file():  # an edit (MEMIT) has no steps: None
            last = json.loads(trained.read_text()).get("steps")
            steps[run["run"]] = {"chosen_step": last, "last_step": last}
    model["steps"] = steps
    return model
