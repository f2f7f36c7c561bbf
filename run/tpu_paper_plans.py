"""XLA:TPU plans of every paper config, compiled on this host (no TPU): one JSON line per kernel.

  python run/tpu_paper_plans.py [--out configs/paper/tpu_plans.jsonl] [--kernels train_step] [--only NAME]
  python run/tpu_paper_plans.py --table            # the markdown table of configs/paper/README.md
  python run/tpu_paper_plans.py --summary          # each model's largest peak per kernel family
  python run/tpu_paper_plans.py --kernels generate --only kgfact_small_qwen3_1p7b   # one kernel family of one config

Each config of configs/paper/ is compiled (`mixsd bench memory`'s plan_lines) for the slice its
model is planned on (SLICES below: the slice whose chip count the config's mesh and batch sizes are
set for), a scaling study once per model (`model=NAME`), one kernel family at a time. A family whose
program is built from the same settings as one already compiled (`signature`: the KGFact, KGFunc,
MQuAKE and SimpleQA configs of one model differ only in schedules, data and `grad_accum`, the
micro-batch scan's trip count, which does not change what a chip holds) is compiled once and its
lines are repeated with `same_as`. Lines already in --out are kept and not recompiled, so an
interrupted run resumes (per config and kernel family: `--kernels generate` adds the generation
kernels of configs whose train step is already there). Compile times are those of the host that ran it (see `host_load`).
`--reestimate` recomputes the train steps' `*_est` figures of --out in place (bench.estimates), keeping
the compiled figures: the lines' `estimates_host_load` says when.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The slice each paper model is planned on: 8 chips for the small models (mesh 1, 4, 2), 16 for
# Qwen3-4B (1, 4, 4: 8 chips of 16 GiB do not hold its step), 32 for Qwen3-8B (1, 4, 8).
SLICES = {"qwen3-0.6b": "v5e:2x4", "qwen3-1.7b": "v5e:2x4", "llama-3.2-1b-instruct": "v5e:2x4",
          "llama-3.2-3b-instruct": "v5e:2x4", "qwen3-4b-instruct-2507": "v5e:4x4", "qwen3-8b": "v5e:4x8"}


def cases(only: str | None):
    """(config path, overrides, topology) for every paper config (a scaling study: every model)."""
    from mixsd_jax import config as config_lib

    for path in sorted(glob.glob(str(ROOT / "configs/paper/*.yaml"))):
        name = pathlib.Path(path).stem
        if only and only not in name:
            continue
        raw = config_lib.read_yaml(path)
        models = [m["model"] if isinstance(m, dict) else m for m in raw.get("models", [])] or [raw["model"]]
        for model in models:
            overrides = [f"model={model}"] if raw.get("models") else []
            yield name, path, overrides, model, SLICES.get(str(model))


def run(args) -> int:
    from mixsd_jax.bench import memory

    out = pathlib.Path(args.out)
    done = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    seen = {(d["config"], d["model"], family(d["kernel"])) for d in done}
    kernels = memory.parse_kernels(args.kernels)
    plans = {}

    def plan_of(name, path, overrides, model):
        if (name, model) not in plans:
            plans[name, model] = memory.load_plan_config(path, overrides)
        return plans[name, model]

    # The compiled lines of each kernel family, by what decides its program: a config whose family
    # has the same signature as one already compiled gets that one's lines as `same as` lines.
    by_signature = {}
    where = {(name, str(model)): (path, overrides, topology) for name, path, overrides, model, topology in cases(None)}
    for d in done:
        if "same_as" in d or "error" in d or (d["config"], d["model"]) not in where:
            continue
        path, overrides, topology = where[d["config"], d["model"]]
        sig = signature(plan_of(d["config"], path, overrides, d["model"]), family(d["kernel"]), d["model"], topology)
        by_signature.setdefault(sig, {"config": d["config"], "lines": []})
        if by_signature[sig]["config"] == d["config"]:
            by_signature[sig]["lines"].append(d)
    with out.open("a") as sink:
        for name, path, overrides, model, topology in cases(args.only):
            if topology is None:
                print(f"{name} {model}: no slice planned (unknown model shapes)", file=sys.stderr)
                continue
            plan = plan_of(name, path, overrides, str(model))
            for kernel in kernels:
                if (name, str(model), kernel) in seen or not runs(plan, kernel):
                    continue
                sig = signature(plan, kernel, str(model), topology)
                if sig in by_signature:  # the same program as a config already compiled
                    for twin in by_signature[sig]["lines"]:
                        sink.write(json.dumps(twin_line(twin, name, _train_shapes(plan, kernel))) + "\n")
                    sink.flush()
                    continue
                if args.reuse_only:
                    continue
                compiled = compile_family(plan, name, str(model), topology, kernel, not args.no_estimates, sink)
                if compiled:
                    by_signature[sig] = {"config": name, "lines": compiled}
    return 0


def compile_family(plan, name, model, topology, kernel, estimates, sink) -> list:
    """Compile one kernel family of one config; its lines are appended to `sink` as they come (a
    failure, such as a mesh that does not divide, is one `error` line and does not stop the rest)."""
    from mixsd_jax.bench import memory

    lines = []
    try:
        for line in memory.plan_lines(plan, memory.tpu_target(topology, None), kernels=(kernel,), estimates=estimates):
            line = {"config": name, **line, "host_load": round(os.getloadavg()[0], 1)}
            lines.append(line)
            sink.write(json.dumps(line) + "\n")
            sink.flush()
            print(json.dumps({k: line.get(k) for k in ("config", "kernel", "peak_gib", "fits", "compile_s",
                                                        "mfu_est")}), flush=True)
    except Exception as exc:
        sink.write(json.dumps({"config": name, "model": model, "kernel": kernel, "topology": topology,
                               "error": str(exc).splitlines()[0]}) + "\n")
        sink.flush()
        return []
    return lines


# What each kernel family's compiled program is built from: the plan sections it reads (besides the
# model and the slice). Keys that only steer the schedule, the data or the loop's trip count are left
# out, so configs that differ only there share one compile. Anything else that differs compiles anew.
FAMILY_SECTIONS = {"train_step": ("train", "train_mesh"), "opsd_step": ("opsd", "train_mesh"),
                   "generate": ("generation", "generation_mesh"),
                   "eval_decode": ("eval", "eval_mesh", "generation"), "eval_mc": ("eval", "eval_mesh", "generation"),
                   "eval_kl": ("eval", "eval_mesh", "generation"), "export": ("train", "train_mesh"),
                   "memit": ("memit", "memit_mesh")}
STEP_SECTIONS = {"train_step": "train", "opsd_step": "opsd"}  # the steps' sections (the export reads train's too)
NOT_IN_PROGRAM = {"grad_accum", "lr", "epochs", "steps", "warmup_steps", "schedule", "seed", "save_every", "limit",
                  "max_retries", "suites", "benchmarks", "data_root", "data", "out_dir", "resume"}


def runs(plan: dict, kernel: str) -> bool:
    """Whether the config runs this kernel family at all (OPSD and MEMIT only where they are methods)."""
    return all(section in plan for section in FAMILY_SECTIONS[kernel])


def signature(plan: dict, kernel: str, model: str, topology: str) -> str:
    def plain(value):
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items() if k not in NOT_IN_PROGRAM}
        return value

    sections = {s: plain(plan.get(s)) for s in FAMILY_SECTIONS[kernel]}
    for step in set(STEP_SECTIONS.values()) & set(sections):
        # A step holds one micro batch (batch_size = micro_batch × grad_accum), and OPSD's prompt
        # template is text the rollouts are made from, not part of the step's program.
        sections[step]["batch_size"] = plan[step].micro_batch
        (sections[step].get("opsd") or {}).pop("prompt", None)
    return json.dumps({"model": model, "topology": topology, "kernel": kernel, **sections}, sort_keys=True, default=str)


TRAIN_ESTIMATES = ("attention", "flops_est", "bytes_accessed_est", "flops_analytic", "flops_est_over_analytic",
                   "roofline_s", "tokens_per_s_est", "mfu_est", "estimates_host_load")
# Whole-step figures: a step of `grad_accum` micro batches does that many micro batches' work. (The
# compiled `flops` and `bytes_accessed` count the micro-batch loop's body once, so they stay; rates
# and ratios such as tokens_per_s_est and mfu_est stay too.)
PER_STEP_ESTIMATES = ("flops_est", "bytes_accessed_est", "flops_analytic", "roofline_s")


def twin_line(twin: dict, config: str, shapes: dict | None) -> dict:
    """The line of `config`, whose kernel compiles to `twin`'s; a train step may scan more or fewer
    micro batches (`shapes`: the config's own), which scales its per-step estimates."""
    line = {**twin, "config": config, "same_as": twin["config"]}
    if shapes is None:
        return line
    ratio = shapes["grad_accum"] / twin["shapes"]["grad_accum"]
    return line | {"shapes": shapes} | {k: twin[k] * ratio for k in PER_STEP_ESTIMATES if k in twin}


def reestimate(args) -> int:
    """The train steps' estimates of --out recomputed; `same as` lines take their twin's. The file is
    rewritten after each config, so an interrupted run keeps what it did."""
    from mixsd_jax.bench import memory
    from mixsd_jax.bench.estimates import train_estimates
    from mixsd_jax.files import atomic_write_text
    from mixsd_jax.models.sharding import make_mesh

    out = pathlib.Path(args.out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    plans = {(name, str(model)): (path, overrides, topology) for name, path, overrides, model, topology in cases(args.only)}
    for line in lines:
        where = plans.get((line["config"], line["model"]))
        if line["kernel"] != "train_step" or "same_as" in line or "error" in line or where is None:
            continue
        path, overrides, topology = where
        plan, target = memory.load_plan_config(path, overrides), memory.tpu_target(topology, None)
        mesh = make_mesh(plan["train_mesh"], devices=target.devices[: memory.mesh_devices(plan["train_mesh"],
                                                                                          target.fill_devices)])
        with memory.compile_context(target):
            line |= train_estimates(memory.model_config_for(plan["model"]), plan["train"], mesh, target)
        line["estimates_host_load"] = round(os.getloadavg()[0], 1)
        print(json.dumps({k: line.get(k) for k in ("config", "model", *TRAIN_ESTIMATES)}), flush=True)
        twins = {(x["config"], x["model"]): x for x in lines if x["kernel"] == "train_step" and "same_as" not in x}
        for other in lines:
            twin = twins.get((other.get("same_as"), other["model"]))
            if other["kernel"] == "train_step" and twin is not None:
                other |= twin_line(twin, other["config"], other["shapes"])  # the twin's estimates, scaled
        atomic_write_text(out, "".join(json.dumps(x) + "\n" for x in lines))
    return 0


def family(kernel: str) -> str:
    """The --kernels name a compiled kernel's line belongs to (`generate.insert` -> `generate`)."""
    return {"export_gather": "export"}.get(kernel, kernel.split(".")[0])


def _train_shapes(plan, kernel: str) -> dict | None:
    """A train or OPSD step's own micro-batch shapes (None for the other kernels)."""
    section = STEP_SECTIONS.get(kernel)
    if section is None:
        return None
    t = plan[section]
    return {"grad_accum": t.grad_accum, "micro_batch": t.micro_batch, "seq_len": t.max_seq_len}


def table(path: str, only: str | None, kernels: tuple) -> int:
    """The markdown table of the lines of configs matching `only` and of the kernel families `kernels`."""
    rows = [r for r in map(json.loads, pathlib.Path(path).read_text().splitlines())
            if (not only or only in r["config"]) and all(family(k) in kernels for k in r["kernel"].split(","))]
    print("| config | model | slice | kernel | mesh (data, fsdp, tensor) | peak / chip | fits | mfu_est | compile |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | {r['model']} | {r['topology']} | {r['kernel']} | | error: {r['error']} | | | |")
            continue
        mesh = ", ".join(str(v) for v in r["mesh"].values())
        mfu = f"{r['mfu_est']:.2f}" if r.get("mfu_est") is not None else ""
        compiled = f"same as {r['same_as']}" if "same_as" in r else f"{r['compile_s']:.0f} s (load {r.get('host_load')})"
        # A kernel XLA:TPU refused for lack of HBM: its figure is a lower bound of the peak.
        at_least = "≥ " if r.get("peak_is_lower_bound") else ""
        print(f"| {r['config']} | {r['model']} | {r['topology']} | {r['kernel']} | {mesh} | "
              f"{at_least}{r['peak_bytes'] / (1 << 30):.2f} GiB | {'yes' if r['fits'] else '**no**'} | {mfu} | {compiled} |")
    listed = {(r["config"], str(r["model"]), family(r["kernel"])) for r in rows}
    from mixsd_jax import config as config_lib

    for name, path, _, model, topology in cases(only):
        runs = set(config_lib.read_yaml(path).get("methods", []))  # the edit's kernels only where MEMIT runs
        missing = [k for k in kernels if (name, str(model), k) not in listed and (k != "memit" or "memit" in runs)]
        if missing:
            why = "no slice planned: shapes read from the model's config.json" if topology is None else "not compiled yet"
            print(f"| {name} | {model} | {topology or ''} | {','.join(missing)} | | {why} | | | |")
    return 0


def summary(path: str) -> int:
    """One row per model and slice: each kernel family's largest per-chip peak (compiled lines only;
    a `same as` line is its twin's program), and the paper configs that run them."""
    from mixsd_jax.bench.memory import KERNELS

    rows = {}
    for r in map(json.loads, pathlib.Path(path).read_text().splitlines()):
        if "error" in r:
            continue
        row = rows.setdefault((r["model"], r["topology"]), {"configs": set(), "peaks": {}})
        row["configs"].add(r["config"])
        if "same_as" not in r:
            fam = family(r["kernel"])
            row["peaks"][fam] = max(row["peaks"].get(fam, (0, True)), (r["peak_bytes"], r["fits"]))
    print("| model | slice | " + " | ".join(KERNELS) + " | configs |")
    print("|---|---|" + "---|" * len(KERNELS) + "---|")
    for (model, topology), row in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = []
        for k in KERNELS:
            peak, fits = row["peaks"].get(k, (None, True))
            cells.append("" if peak is None else f"{peak / (1 << 30):.2f}" + ("" if fits else " **no**"))
        print(f"| {model} | {topology} | " + " | ".join(cells) + f" | {len(row['configs'])} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "configs/paper/tpu_plans.jsonl"))
    parser.add_argument("--kernels", default="train_step", help="as `mixsd bench memory --kernels`")
    parser.add_argument("--only", default=None, help="only configs whose name contains this")
    parser.add_argument("--no-estimates", action="store_true")
    parser.add_argument("--reuse-only", action="store_true",
                        help="only write the lines of configs whose twin is already compiled; compile nothing")
    parser.add_argument("--reestimate", action="store_true",
                        help="recompute the train steps' *_est figures of --out in place; compile only for them")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and stop")
    parser.add_argument("--summary", action="store_true",
                        help="print each model's largest peak per kernel family (GiB per chip) and stop")
    args = parser.parse_args()
    if args.summary:
        return summary(args.out)
    if args.table:
        from mixsd_jax.bench import memory

        return table(args.out, args.only, memory.parse_kernels(args.kernels))
    return reestimate(args) if args.reestimate else run(args)


if __name__ == "__main__":
    sys.exit(main())
