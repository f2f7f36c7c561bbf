"""The stage graph of an experiment, built and validated before any expensive work.

Stages, in order: `corpus` → `generate_<run>` per (λ, T) → `train_<method>` per trained method
(`edit_memit` for MEMIT, which edits the weights in closed form instead and leaves its model where a
training run leaves its export) → `eval`. Each stage's fingerprint hashes only the settings that change its outputs plus its inputs'
fingerprints, so changing an eval setting re-runs only `eval`, and adding a λ adds one
generation, one training run and that checkpoint's evaluation.

A stage also has a `reset` key: when a re-run's reset key differs from the recorded one, the
stage's old outputs are wiped first (its tool would refuse to resume them); when only the
fingerprint differs (e.g. more training steps), the tool continues from what is there.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mixsd_jax import config as config_lib
from mixsd_jax import storage
from mixsd_jax.data.layout import TRAIN_FILES
from mixsd_jax.errors import MixsdError
from mixsd_jax.pipeline import stage_runners
from mixsd_jax.pipeline.config import ExperimentConfig
from mixsd_jax.pipeline.stage import Plan, Stage, file_hash, settings_hash

# Generation prompt preset per corpus kind (docs/reference.md, The two prompts).
GENERATION_PRESETS = {"kgfact": "knowledge", "mquake": "knowledge", "kgfunc": "math_operations", "simpleqa": "simpleqa"}
# OPSD's teacher prompt (the GT-text strings) per corpus kind (docs/reference.md, OPSD).
OPSD_PROMPTS = {"kgfact": "knowledge_base_answer", "mquake": "knowledge_base_answer", "kgfunc": "math_operations",
                "simpleqa": "simpleqa"}
# Keys the pipeline sets itself in each stage section.
OWNED_KEYS = {
    "generation": ("input", "out_dir", "model", "lambda_mix", "temperature", "criterion"),
    "train": ("data", "model", "out"),
    "eval": ("base", "tuned", "out_dir", "corpus_dir", "train_files", "labels", "criterion", "groups"),
    "memit": ("data", "model", "out"),
}
EDIT_METHODS = ("memit",)  # no training steps: no checkpoints to select from
BASE = "base"


def _num(x: float) -> str:
    return f"{x:g}".replace(".", "p").replace("-", "m")


def mixsd_run_name(lam: float, temperature: float) -> str:
    """`mixsd_l0p3` at T=0, `mixsd_l0p3_t0p6` otherwise: adding a temperature never renames T=0 runs."""
    return f"mixsd_l{_num(lam)}" + (f"_t{_num(temperature)}" if temperature else "")


def trained_runs(cfg: ExperimentConfig) -> list[tuple[str, float | None, float | None]]:
    """(run name, λ, T) per training run, in report order; λ is None for SFT and OPSD. With `seeds`,
    one run per seed, named `<run>_s<seed>` (see `run_groups`); MEMIT's one edit is `memit_s<first>`."""
    runs: list[tuple[str, float | None, float | None]] = []
    if "sft" in cfg.methods:
        runs.append(("sft", None, None))
    if "opsd" in cfg.methods:
        runs.append(("opsd", None, None))
    if "memit" in cfg.methods:
        runs.append(("memit", None, None))
    if "mixsd" in cfg.methods:
        runs += [(mixsd_run_name(lam, t), lam, t) for t in cfg.temperatures for lam in cfg.lambdas]
    if cfg.seeds:
        # An edit samples nothing: one run, under the first seed, stands for all of them.
        runs = [(f"{name}_s{seed}", lam, t) for name, lam, t in runs
                for seed in (cfg.seeds[:1] if name in EDIT_METHODS else cfg.seeds)]
    return runs


def _opsd_keys(cfg: ExperimentConfig) -> dict:
    """The OPSD run's section: `train` + the flat `opsd` section (OpsdConfig keys nested under
    `opsd`), `method: opsd`, and the corpus kind's teacher prompt unless one is given."""
    from mixsd_jax.train.config import OpsdConfig

    own = {f.name for f in dataclasses.fields(OpsdConfig)}
    section = dict(cfg.opsd)
    method_keys = {k: section.pop(k) for k in list(section) if k in own}
    if "method" in section or "opsd" in section:
        raise MixsdError("config key 'opsd.method' / 'opsd.opsd': write the OPSD keys directly in the 'opsd' section")
    method_keys.setdefault("prompt", OPSD_PROMPTS.get(_layout_kind(cfg), "knowledge_base_answer"))
    nested = {**dict(cfg.train.get("opsd", {})), **method_keys}
    return {**section, "method": "opsd", "opsd": nested}


def run_groups(cfg: ExperimentConfig) -> dict[str, dict[str, int]]:
    """{method run: {seeded run: seed}} when `seeds` is set (the runs a seed interval is over)."""
    groups: dict[str, dict[str, int]] = {}
    if not cfg.seeds:
        return groups
    for name, _, _ in trained_runs(cfg):
        base, _, seed = name.rpartition("_s")
        groups.setdefault(base, {})[name] = int(seed)
    return groups


def method_run(cfg: ExperimentConfig, name: str) -> str:
    """The method run a (possibly seeded) run belongs to: `sft_s1` -> `sft`."""
    return name.rpartition("_s")[0] if cfg.seeds else name


def _seed_overrides(cfg: ExperimentConfig, name: str) -> dict:
    """A seeded run's training seed and (MixSD) generation seed; nothing without `seeds`."""
    if not cfg.seeds:
        return {}
    return {"seed": int(name.rpartition("_s")[2])}


def _section(cls, cfg: ExperimentConfig, section: str, owned_values: dict, extra: dict | None = None):
    """The stage config for one run: the section's keys (+ `extra` over them) + the pipeline's keys
    + the shared mesh."""
    data = dict(getattr(cfg, section)) | (extra or {})
    names = {f.name for f in dataclasses.fields(cls)}
    if section == "eval" and "splits" not in names:
        data.pop("splits", None)  # handled by the pipeline (a corpus view with those splits only)
    for key in OWNED_KEYS[section]:
        if key in data:
            raise MixsdError(f"config key '{section}.{key}': set by the pipeline for each run; remove it")
    for shared in ("mesh", "distributed", "storage"):  # one mesh and one multi-host setup for every stage
        if shared in names and shared not in data:
            data[shared] = config_lib.to_dict(getattr(cfg, shared))
    data.update({k: v for k, v in owned_values.items() if k in names})
    return config_lib.from_dict(cls, data, prefix=f"{section}.")


def _model_identity(model: str, dry_run: bool) -> tuple[Path, str]:
    """(model directory, fingerprint). A dry run plans a paper model before its download (its
    published config fields stand in for config.json: every stage then reads as not done)."""
    import json
    import os

    from mixsd_jax.models.known_shapes import HF_CONFIGS
    from mixsd_jax.models.registry import PAPER_MODELS, resolve_model

    try:
        model_dir = resolve_model(model)
    except MixsdError:
        name = {hf_id: n for n, hf_id in PAPER_MODELS.items()}.get(str(model), str(model))
        if not dry_run or name not in HF_CONFIGS:
            raise
        model_dir = Path(os.environ.get("MIXSD_MODELS_DIR", "models")) / name
        return model_dir, settings_hash(str(model), "known shapes", json.dumps(HF_CONFIGS[name], sort_keys=True))
    return model_dir, settings_hash(str(model), file_hash(model_dir / "config.json"))


def build_plan(cfg: ExperimentConfig, corpus_root: Path | None = None, dry_run: bool = False) -> Plan:
    """Validates the model, methods, λ list and every stage section; returns the stages to run.
    `corpus_root`: where a built corpus lives when it is shared with other plans (a scaling study);
    default `<out_dir>/corpus`. `dry_run`: a paper model that is not on this machine is planned
    from its known shapes."""
    from mixsd_jax.sampling.generator import NOT_IN_FINGERPRINT, GenerateConfig, Paths
    from mixsd_jax.train.config import TrainConfig, not_fingerprinted

    EvalConfig, evaluate = _eval_api()
    exp = storage.path(cfg.out_dir)
    corpus_stage, corpus_dir, train_file = _corpus_stage(cfg, exp, corpus_root)
    # Sections first (cheap, catches typos), then the model (may convert the embedded default).
    generate_cfgs = {
        name: _section(GenerateConfig, cfg, "generation", {
            "input": str(train_file), "out_dir": str(exp / "generate" / name), "model": cfg.model,
            "lambda_mix": lam, "temperature": t, "preset": cfg.generation.get("preset", _preset(cfg)),
            "criterion": cfg.criterion, **_seed_overrides(cfg, name),
        })
        for name, lam, t in trained_runs(cfg) if lam is not None
    }
    if "preset" not in cfg.generation and _preset(cfg) == "custom" and generate_cfgs:
        raise MixsdError("config key 'generation.preset': required for a corpus of kind "
                         f"{cfg.corpus.kind!r} (knowledge | math_operations | simpleqa | custom)")
    from mixsd_jax.pipeline.selection import train_overrides

    train_cfgs = {
        name: _section(TrainConfig, cfg, "train", {"data": "", "model": cfg.model, "out": str(exp / "train" / name),
                                                   **train_overrides(cfg.selection), **_seed_overrides(cfg, name)},
                       extra=_opsd_keys(cfg) if method_run(cfg, name) == "opsd" else None)
        for name, _, _ in trained_runs(cfg) if method_run(cfg, name) not in EDIT_METHODS
    }
    edit_cfgs = _edit_configs(cfg, exp, train_file)
    model_dir, model_fp = _model_identity(cfg.model, dry_run)

    stages = [corpus_stage]
    # SFT trains on the ground truth; OPSD rolls out on its prompts, the ground truth for the teacher.
    data_for: dict[str, tuple[Path, str]] = {name: (train_file, corpus_stage.fingerprint) for name in ("sft", "opsd")}
    for name, gcfg in generate_cfgs.items():
        output = Paths.for_config(gcfg).final
        # The input's bytes are in the corpus stage's fingerprint; the rest change only the speed.
        fp = settings_hash("generate", config_lib.fingerprint(gcfg, exclude=NOT_IN_FINGERPRINT),
                   corpus_stage.fingerprint, model_fp)
        stages.append(Stage(
            name=f"generate_{name}", fingerprint=fp, reset=fp, workdir=storage.path(gcfg.out_dir),
            outputs=(output,), inputs=(corpus_stage.name,), run=stage_runners.generate_runner(gcfg),
            description=f"MixSD targets λ={gcfg.lambda_mix:g} T={gcfg.temperature:g} → {output}", settings=gcfg,
        ))
        data_for[name] = (output, fp)

    train_fps: dict[str, str] = {}
    for name, lam, _ in trained_runs(cfg):
        if name in edit_cfgs:
            stage = _edit_stage(name, edit_cfgs[name], corpus_stage, model_fp)
            stages.append(stage)
            train_fps[name] = stage.fingerprint
            continue
        data, data_fp = data_for[name if lam is not None else "sft"]
        tcfg = dataclasses.replace(train_cfgs[name], data=str(data))
        skip = not_fingerprinted(tcfg)
        settings = config_lib.fingerprint(tcfg, exclude=("data", *(k for k in skip if k not in ("steps", "epochs"))))
        # Saving every k steps for selection changes what a run leaves behind: a run without those
        # exports is redone (only when selection is on, so other runs keep their fingerprints).
        every = (("selection_every", cfg.selection.every),) if cfg.selection.every else ()
        fp = settings_hash("train", settings, data_fp, model_fp, *every)
        reset = settings_hash("train-reset", config_lib.fingerprint(tcfg, exclude=("data", *skip)), data_fp, model_fp, *every)
        source = corpus_stage.name if lam is None else f"generate_{name}"
        stages.append(Stage(
            name=f"train_{name}", fingerprint=fp, reset=reset, workdir=storage.path(tcfg.out),
            outputs=(storage.path(tcfg.out) / "hf" / storage.COMMIT_MARKER if storage.is_url(tcfg.out)
                     else storage.path(tcfg.out) / "hf" / "config.json", storage.path(tcfg.out) / "summary.json"),
            inputs=(source,),
            run=stage_runners.train_runner(tcfg, prune_checkpoints=bool(cfg.selection.every and cfg.selection.prune)),
            description=f"train {name} on {data}", settings=tcfg,
        ))
        train_fps[name] = fp

    runs = trained_runs(cfg)
    evaluated, eval_inputs = _selection_stages(cfg, exp, runs, corpus_dir, train_fps, stages)
    eval_dir = exp / "eval"
    labels = tuple(f"{name}={method_run(cfg, name).upper() if lam is None else f'MixSD λ={lam:g}' + (f' T={t:g}' if t else '')}"
                   + (f" seed {name.rpartition('_s')[2]}" if cfg.seeds else "") for name, lam, t in runs)
    eval_corpus, view_splits = corpus_dir, stage_runners.view_splits(cfg, EvalConfig)
    if view_splits:
        eval_corpus = eval_dir / "corpus_view"
    ecfg = _section(EvalConfig, cfg, "eval", {
        "base": cfg.model,
        "tuned": tuple(f"{name}={evaluated[name][0]}" for name, _, _ in runs),
        "out_dir": str(eval_dir),
        "corpus_dir": str(eval_corpus),
        "train_files": tuple(f"{name}={data_for[name if lam is not None else 'sft'][0]}" for name, lam, _ in runs),
        "labels": labels,
        "criterion": cfg.criterion,
        "groups": tuple(f"{group}={','.join(members)}" for group, members in run_groups(cfg).items()),
    })
    if {"memorization", "all"} & set(getattr(ecfg, "suites", ())) and _layout_kind(cfg) not in ("kgfact", "mquake", "kgfunc"):
        raise MixsdError(f"config key 'eval.suites': the memorization suite needs a KGFact, MQuAKE or KGFunc corpus, "
                         f"not {cfg.corpus.kind!r} (drop it, e.g. suites=[retention, nll])")
    # The mesh and hosts change how fast, not what: not in the fingerprint (process ids differ per host).
    settings = settings_hash("eval", config_lib.fingerprint(ecfg, exclude=(*OWNED_KEYS["eval"], "mesh", "distributed", "storage")),
                     corpus_stage.fingerprint, view_splits, *([cfg.criterion] if cfg.criterion else []))
    parts = {BASE: model_fp, **{name: fp for name, (_, fp) in evaluated.items()}}
    stages.append(Stage(
        # The evaluator keeps one result per (checkpoint, benchmark) under its own fingerprint, so a
        # changed eval setting never wipes the folder; only a retrained checkpoint's items are removed.
        name="eval", fingerprint=settings_hash(settings, parts), reset="eval", workdir=eval_dir,
        outputs=(eval_dir / "results.json", eval_dir / "report.md"),
        inputs=eval_inputs, run=stage_runners.eval_runner(ecfg, evaluate, corpus_dir, view_splits),
        description=f"evaluate base + {len(runs)} checkpoints → {eval_dir}",
        parts=parts, part_dirs=("items/{name}",), settings=ecfg,
    ))
    return Plan(config=cfg, exp_dir=exp, model_dir=model_dir, stages=tuple(stages), report=eval_dir / "report.md")


def _selection_stages(cfg: ExperimentConfig, exp: Path, runs, corpus_dir: Path, train_fps: dict, stages: list):
    """Appends a `select_<run>` stage per run when selection is on; returns {run: (model dir the eval
    stage evaluates, its fingerprint)} and the eval stage's input stages."""
    from mixsd_jax.pipeline import selection

    def producer(name):
        return f"edit_{name}" if method_run(cfg, name) in EDIT_METHODS else f"train_{name}"

    if not cfg.selection.every:
        return ({name: (exp / "train" / name / "hf", train_fps[name]) for name, _, _ in runs},
                tuple(producer(name) for name, _, _ in runs))
    if _layout_kind(cfg) not in selection.TRAIN_SPLIT:
        raise MixsdError(f"config key 'selection.every': selecting by training recall needs a KGFact, MQuAKE or "
                         f"KGFunc corpus, not {cfg.corpus.kind!r}")
    # Decoded as the eval stage decodes: its mesh (else the run's) and its dtypes.
    decode = {"mesh": cfg.eval.get("mesh", config_lib.to_dict(cfg.mesh)),
              "param_dtype": cfg.eval.get("param_dtype", "float32"), "dtype": cfg.eval.get("dtype", "float32")}
    out, inputs = {}, []
    for name, lam, _ in runs:
        if method_run(cfg, name) in EDIT_METHODS:  # one edited model, nothing to select
            out[name] = (exp / "train" / name / "hf", train_fps[name])
            inputs.append(producer(name))
            continue
        inputs.append(f"select_{name}")
        workdir = exp / "select" / name
        fp = settings_hash("select", selection.fingerprint_settings(cfg.selection), cfg.criterion, train_fps[name],
                   decode["param_dtype"], decode["dtype"])
        method = "mixsd" if lam is not None else method_run(cfg, name)  # the reference: SFT first peak, MixSD/OPSD last
        stages.append(Stage(
            name=f"select_{name}", fingerprint=fp, reset=fp, workdir=workdir,
            outputs=(workdir / "selection.json", selection.model_link(exp, name) / "config.json"),
            inputs=(f"train_{name}",),
            run=selection.selection_runner(name, method, exp / "train" / name, corpus_dir, cfg.criterion,
                                           cfg.selection, workdir, decode),
            description=f"pick {name}'s checkpoint by training recall (rule {cfg.selection.rule})",
            settings=cfg.selection,
        ))
        out[name] = (selection.model_link(exp, name), fp)
    return out, tuple(inputs)


def _layout_kind(cfg: ExperimentConfig) -> str:
    """The corpus kind, read from the folder layout for a user's or the authors' released folder."""
    corpus = cfg.corpus
    if corpus.kind not in ("directory", "released"):
        return corpus.kind
    root = storage.path(corpus.source)
    for kind in ("kgfunc", "kgfact"):
        if (root / TRAIN_FILES[kind]).is_file():
            return kind
    return corpus.kind


def _preset(cfg: ExperimentConfig) -> str:
    return GENERATION_PRESETS.get(_layout_kind(cfg), "custom")


def _eval_api():
    try:
        from mixsd_jax.eval.runner import EvalConfig, evaluate
    except ImportError as exc:  # the evaluator is a separate package; say so instead of a traceback
        raise MixsdError(f"pipeline: the evaluator (mixsd_jax.eval.runner) is not available: {exc}") from None
    return EvalConfig, evaluate


def _corpus_stage(cfg: ExperimentConfig, exp: Path, shared_root: Path | None = None) -> tuple[Stage, Path, Path]:
    corpus = cfg.corpus
    if corpus.kind == "directory":
        root = storage.path(corpus.source)
        if not root.is_dir():
            raise MixsdError(f"config key 'corpus.source': {root} is not a directory")
    else:
        root = shared_root or exp / "corpus"
    relative = corpus.train_file or TRAIN_FILES.get(_layout_kind(cfg))
    if relative is None:
        raise MixsdError(f"config key 'corpus.train_file': required for corpus kind {corpus.kind!r} "
                         "(the training file's path inside the corpus folder)")
    train_file = root / relative
    settings = config_lib.to_dict(corpus)
    if corpus.kind in ("directory", "released", "simpleqa", "mquake"):
        source = storage.path(corpus.source) if corpus.source else None
        if corpus.kind == "simpleqa" and source is None:
            from mixsd_jax.data.commands import SIMPLEQA_CSV

            source = SIMPLEQA_CSV
        if not source.exists():
            raise MixsdError(f"config key 'corpus.source': {source} not found")
        probe = train_file if corpus.kind == "directory" else (source / relative if source.is_dir() else source)
        if not probe.is_file():
            raise MixsdError(f"config key 'corpus.source': {probe} not found")
        settings["source_sha256"] = file_hash(probe)  # new source content => new corpus
    if corpus.kind == "directory":
        settings.pop("source", None)
    fp = settings_hash("corpus", settings)
    stage = Stage(
        name="corpus", fingerprint=fp, reset=fp, workdir=root, outputs=(train_file,), inputs=(),
        run=stage_runners.corpus_runner(corpus, root), description=f"{corpus.kind} corpus → {root}",
        owns_workdir=corpus.kind != "directory", settings=corpus,
    )
    return stage, root, train_file


def _edit_configs(cfg: ExperimentConfig, exp: Path, train_file: Path) -> dict:
    """{run: EditConfig} for the editing methods: the `memit` section on the corpus's training file."""
    from mixsd_jax.edit.config import EditConfig

    runs = [name for name, _, _ in trained_runs(cfg) if method_run(cfg, name) in EDIT_METHODS]
    if runs and _layout_kind(cfg) in ("kgfunc", "simpleqa"):
        raise MixsdError(f"config key 'methods': MEMIT edits a subject's facts; a {_layout_kind(cfg)!r} corpus "
                         "has no subjects (use a KGFact or MQuAKE corpus)")
    return {name: _section(EditConfig, cfg, "memit", {"data": str(train_file), "model": cfg.model,
                                                      "out": str(exp / "train" / name)})
            for name in runs}


def _edit_stage(name: str, ecfg, corpus_stage: Stage, model_fp: str) -> Stage:
    fp = settings_hash("edit", config_lib.fingerprint(ecfg, exclude=("data", "out", "mesh")), corpus_stage.fingerprint,
                       model_fp)
    return Stage(
        name=f"edit_{name}", fingerprint=fp, reset=fp, workdir=Path(ecfg.out),
        outputs=(Path(ecfg.out) / "hf" / "config.json", Path(ecfg.out) / "summary.json"),
        inputs=(corpus_stage.name,), run=stage_runners.edit_runner(ecfg),
        description=f"edit {name} ({ecfg.method.upper()}) with {ecfg.data}", settings=ecfg,
    )


