"""XLA:TPU plans of every paper config, compiled on this host (no TPU): one JSON line per kernel.

  python run/tpu_paper_plans.py [--out configs/paper/tpu_plans.jsonl] [--kernels train_step] [--only NAME]
  python run/tpu_paper_plans.py --table            # the markdown table of configs/paper/README.md
  python run/tpu_paper_plans.py --kernels generate --only kgfact_small_qwen3_1p7b   # one kernel family of one config

Each config of configs/paper/ is compiled (`mixsd bench memory`'s plan_lines) for the slice its
model is planned on (SLICES below: the slice whose chip count the config's mesh and batch sizes are
set for), a scaling study once per model (`model=NAME`). Configs whose kernels have the same shapes
on the same slice (the KGFact, KGFunc and SimpleQA configs of one model differ only in `grad_accum`,
the micro-batch scan's trip count, which does not change what a chip holds) are compiled once and
the line is repeated with `same_as`. Lines already in --out are kept and not recompiled, so an
interrupted run resumes (per config and kernel family: `--kernels generate` adds the generation
kernels of configs whose train step is already there). Compile times are those of the host that ran it (see `host_load`).
`--reestimate` recomputes the train steps' `*_est` figures of --out in place (bench.estimates), keeping
the compiled figures: the lines' `estimates_host_load` says when.
"""

from __future__ import annotations

import argparse
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


def shape_key(line: dict) -> str:
    keep = {k: line.get(k) for k in ("model", "topology", "kernel", "mesh", "param_dtype", "compute_dtype", "remat")}
    shapes = {k: v for k, v in (line.get("shapes") or {}).items() if k != "grad_accum"}
    return json.dumps({**keep, "shapes": shapes}, sort_keys=True)


def run(args) -> int:
    from mixsd_jax.bench import memory

    out = pathlib.Path(args.out)
    done = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    seen = {(d["config"], d["model"], family(d["kernel"])) for d in done}
    by_shape = {shape_key(d): d for d in done if "same_as" not in d and "error" not in d}
    kernels = memory.parse_kernels(args.kernels)
    with out.open("a") as sink:
        for name, path, overrides, model, topology in cases(args.only):
            if topology is None:
                print(f"{name} {model}: no slice planned (unknown model shapes)", file=sys.stderr)
                continue
            if all((name, str(model), k) in seen for k in kernels):
                continue
            plan = memory.load_plan_config(path, overrides)
            # Same shapes as a config already compiled: the train step only differs in grad_accum.
            probe = _probe(plan, model, topology, kernels)
            if probe is not None and probe in by_shape:
                line = twin_line(by_shape[probe], name, _train_shapes(plan))
                sink.write(json.dumps(line) + "\n")
                sink.flush()
                continue
            if args.reuse_only:
                continue
            target = memory.tpu_target(topology, None)
            try:
                for line in memory.plan_lines(plan, target, kernels=kernels, estimates=not args.no_estimates):
                    line = {"config": name, **line, "host_load": round(os.getloadavg()[0], 1)}
                    by_shape.setdefault(shape_key(line), line)
                    sink.write(json.dumps(line) + "\n")
                    sink.flush()
                    print(json.dumps({k: line.get(k) for k in ("config", "kernel", "peak_gib", "fits", "compile_s",
                                                                "mfu_est")}), flush=True)
            except Exception as exc:  # one config's failure (a mesh that does not divide) must not stop the rest
                sink.write(json.dumps({"config": name, "model": str(model), "kernel": ",".join(kernels),
                                       "topology": topology, "error": str(exc).splitlines()[0]}) + "\n")
                sink.flush()
    return 0


TRAIN_ESTIMATES = ("attention", "flops_est", "bytes_accessed_est", "flops_analytic", "flops_est_over_analytic",
                   "roofline_s", "tokens_per_s_est", "mfu_est", "estimates_host_load")
# Whole-step figures: a step of `grad_accum` micro batches does that many micro batches' work. (The
# compiled `flops` and `bytes_accessed` count the micro-batch loop's body once, so they stay; rates
# and ratios such as tokens_per_s_est and mfu_est stay too.)
PER_STEP_ESTIMATES = ("flops_est", "bytes_accessed_est", "flops_analytic", "roofline_s")


def twin_line(twin: dict, config: str, shapes: dict) -> dict:
    """The line of `config`, whose train step compiles to `twin`'s but may scan more or fewer micro batches."""
    ratio = shapes["grad_accum"] / twin["shapes"]["grad_accum"]
    line = {**twin, "config": config, "same_as": twin["config"], "shapes": shapes}
    return line | {k: twin[k] * ratio for k in PER_STEP_ESTIMATES if k in twin}


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


def _train_shapes(plan) -> dict:
    t = plan["train"]
    return {"grad_accum": t.grad_accum, "micro_batch": t.micro_batch, "seq_len": t.max_seq_len}


def _probe(plan, model, topology, kernels) -> str | None:
    """The shape key of the train step this plan would compile (only a train-step-only run is deduplicated)."""
    if tuple(kernels) != ("train_step",):
        return None
    from mixsd_jax.bench import memory
    from mixsd_jax.models.sharding import make_mesh

    target = memory.tpu_target(topology, None)
    mesh_cfg = plan["train_mesh"]
    mesh = make_mesh(mesh_cfg, devices=target.devices[: memory.mesh_devices(mesh_cfg, len(target.devices))])
    t = plan["train"]
    return shape_key({"model": str(model), "topology": topology, "kernel": "train_step", "mesh": dict(mesh.shape),
                      "param_dtype": t.param_dtype, "compute_dtype": t.compute_dtype, "remat": t.remat,
                      "shapes": _train_shapes(plan)})


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
    args = parser.parse_args()
    if args.table:
        from mixsd_jax.bench import memory

        return table(args.out, args.only, memory.parse_kernels(args.kernels))
    return reestimate(args) if args.reestimate else run(args)


if __name__ == "__main__":
    sys.exit(main())
