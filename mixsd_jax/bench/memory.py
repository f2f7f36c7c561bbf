"""`mixsd bench memory`: will each kernel of a config fit a chip, and how fast can it run? Checked
before a pod is rented, with no weights and no accelerator.

Every kernel the config runs (bench.kernels) is compiled ahead of time at the config's shapes from
abstract inputs (`jax.ShapeDtypeStruct` with the real shardings) on the mesh the run would build
(models.sharding.make_mesh), over either
  --topology NAME   a TPU slice's devices from libtpu (`v5e:2x4`, `v5e:4x8`, `v5p:4x4x4`, ...): the
                    real XLA:TPU compiler, TPU layouts and fusion (backend "tpu"); or
  (default)         simulated XLA:CPU devices (`--xla_force_host_platform_device_count`; the command
                    re-executes itself with it): a different compiler, an upper bound (backend "cpu").
One JSON line per kernel (`generate.prefill`, `generate.decode_segment`, `eval_mc`, ...) with the
per-device bytes of the partitioned program (`peak_bytes` = arguments + outputs - aliased +
temporaries, against `hbm_bytes`, the chip's or `--chip-bytes`), XLA's `flops` and
`bytes_accessed` (loop bodies counted once: see bench.cost), and `roofline_s` for the chip. The
train step and the decode segment also carry loop-scaled `*_est` figures: `tokens_per_s_est`,
`mfu_est`, and for decode the bytes of one step against the ideal (weights + live KV read once).

Models: the paper's models are known by shape (models.known_shapes), so no download is needed;
any other model is read from its HF directory's config.json (weights untouched).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys

from mixsd_jax import config as config_lib
from mixsd_jax.bench import cost, kernels as kernels_lib
from mixsd_jax.bench.estimates import decode_estimates, train_estimates
from mixsd_jax.errors import MixsdError

GIB = 1 << 30
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_REEXEC_ENV = "MIXSD_MEMORY_DEVICES"


# ----------------------------------------------------------------------------- simulated mesh


def mesh_devices(mesh_cfg, default: int) -> int:
    """Devices the mesh needs: the product of its axes, `default` filling a -1 axis."""
    fixed = math.prod(s for s in (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor) if s != -1)
    if -1 in (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor):
        if default % fixed:
            raise MixsdError(f"--devices {default}: not divisible by the mesh's fixed axes product {fixed}")
        return default
    return fixed


def ensure_cpu_devices(n: int, argv: list[str]) -> None:
    """Return when this process has >= n CPU devices; otherwise re-execute the command with n
    simulated ones (XLA reads the flag once, at backend start-up, so it cannot be set later)."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():  # a CPU plan: libtpu (the [tpu] extra) need not start
        jax.config.update("jax_platforms", "cpu")
    if jax.default_backend() == "cpu" and jax.device_count() >= n:
        return
    if os.environ.get(_REEXEC_ENV) == str(n):
        raise MixsdError(f"bench memory: could not simulate {n} CPU devices (got {jax.device_count()})")
    env = dict(os.environ)
    flags = re.sub(rf"{_DEVICE_FLAG}=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={n}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[_REEXEC_ENV] = str(n)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mixsd_jax", *argv], env)


def model_config_for(model: str):
    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.models.known_shapes import known_model_config
    from mixsd_jax.models.registry import resolve_model

    known = known_model_config(str(model))
    return known if known is not None else ModelConfig.from_hf_dir(resolve_model(model))


def load_plan_config(path: str, overrides) -> dict:
    """{model, train, opsd, generation, eval and their meshes} from an experiment config, or from a
    train config (a YAML of TrainConfig keys: only the train step is planned)."""
    from mixsd_jax.models.sharding import MeshConfig
    from mixsd_jax.train.config import TrainConfig

    raw = config_lib.read_yaml(path)
    if not any(key in raw for key in ("generation", "train", "eval", "methods", "corpus")):
        train = config_lib.load(TrainConfig, path, overrides)
        return {"model": train.model, "train": train, "train_mesh": train.mesh}
    from mixsd_jax.pipeline.config import load_experiment
    from mixsd_jax.pipeline.plan import _opsd_keys

    exp = load_experiment(path, overrides)
    if exp.models:  # a scaling study: the model `model=NAME` picks, with its own sections
        from mixsd_jax.pipeline.study import chosen_model_config

        exp = chosen_model_config(exp)

    def section_mesh(section: dict) -> MeshConfig:
        if "mesh" in section:
            return config_lib.from_dict(MeshConfig, section["mesh"], prefix="mesh.")
        return exp.mesh

    train_keys = {k: v for k, v in exp.train.items() if k != "mesh"}
    plan = {"model": exp.model, "train": config_lib.from_dict(TrainConfig, train_keys, prefix="train."),
            "train_mesh": section_mesh(exp.train), "generation": exp.generation,
            "generation_mesh": section_mesh(exp.generation), "eval": exp.eval, "eval_mesh": exp.mesh,
            "methods": tuple(exp.methods)}
    if "opsd" in exp.methods:  # the OPSD run's train section, as the pipeline builds it
        plan["opsd"] = config_lib.from_dict(TrainConfig, {**train_keys, **_opsd_keys(exp)}, prefix="opsd.")
    if "memit" in exp.methods:  # the edit's section, on the pipeline's shared mesh unless it sets one
        from mixsd_jax.edit.config import EditConfig

        plan["memit"] = config_lib.from_dict(EditConfig, {"mesh": config_lib.to_dict(exp.mesh), **exp.memit},
                                             prefix="memit.")
        plan["memit_mesh"] = plan["memit"].mesh
    return plan


def parse_bytes(text: str) -> int:
    """`17179869184`, `16GiB`, `80GB`, `95 GiB` -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(|B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)\s*", str(text))
    if not match:
        raise MixsdError(f"--chip-bytes {text!r}: expected a byte count such as 17179869184, 16GiB or 80GB")
    scale = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[match.group(2)]
    return int(float(match.group(1)) * scale)




@dataclasses.dataclass(frozen=True)
class Target:
    """What the kernels compile for: devices (a TPU topology's or simulated CPU ones) and a chip."""

    devices: tuple
    backend: str  # "tpu" | "cpu"
    topology: str | None
    chip: object | None  # bench.chips.Chip; None on the CPU (no roofline)
    hbm_bytes: int
    fill: int = 0  # devices a mesh's -1 axis spans (default: all of them)

    @property
    def fill_devices(self) -> int:
        return self.fill or len(self.devices)


def tpu_target(topology: str, chip_bytes: str | None) -> Target:
    from mixsd_jax.bench.chips import chip_for
    from mixsd_jax.bench.tpu import topology_devices

    devices = topology_devices(topology)
    chip = chip_for(topology)
    return Target(devices, "tpu", topology, chip, parse_bytes(chip_bytes) if chip_bytes else chip.hbm_bytes)


KERNELS = ("train_step", "opsd_step", "generate", "eval_decode", "eval_mc", "eval_kl", "export", "memit")


def plan_lines(plan: dict, target: Target, **options):
    """Yield one line per compiled kernel, each kernel compiled in turn (for a TPU topology, with
    the persistent compilation cache off while compiling: bench.tpu.no_persistent_cache)."""
    lines = _plan_lines(plan, target, **options)
    while True:
        with compile_context(target):
            line = next(lines, None)
        if line is None:
            return
        yield line


def compile_context(target: Target):
    from mixsd_jax.bench.tpu import no_persistent_cache

    return no_persistent_cache() if target.backend == "tpu" else contextlib.nullcontext()


def _plan_lines(plan: dict, target: Target, *, kernels=KERNELS, eval_prompt_len: int = 1024,
                eval_row_len: int = 2048, eval_window: int = 64, estimates: bool = True):
    from mixsd_jax.models.sharding import make_mesh, pad_rows

    model_cfg = model_config_for(plan["model"])

    def mesh_of(key):
        mesh_cfg = plan[key]
        return make_mesh(mesh_cfg, devices=target.devices[: mesh_devices(mesh_cfg, target.fill_devices)])

    common = {"model": str(plan["model"]), "backend": target.backend, "topology": target.topology,
              "chip": target.chip.name if target.chip else None}

    def lines(lowered: dict, mesh, **info):
        for name, line in cost.compile_lines(lowered, chip=target.chip, hbm_bytes=target.hbm_bytes).items():
            yield {"bench": "memory", "kernel": name, **common, "mesh": dict(mesh.shape), **line, **info}

    if "train_step" in kernels and "train" in plan:
        mesh, train = mesh_of("train_mesh"), plan["train"]
        for line in lines(kernels_lib.train_step(model_cfg, train, mesh), mesh, **_train_info(train, mesh)):
            yield line | (train_estimates(model_cfg, train, mesh, target) if estimates else {})
    if "opsd_step" in kernels and "opsd" in plan:
        mesh, opsd = mesh_of("train_mesh"), plan["opsd"]
        yield from lines(kernels_lib.train_step(model_cfg, opsd, mesh, opsd=True), mesh, **_train_info(opsd, mesh))
    gen = plan.get("generation")
    if "generate" in kernels and gen is not None:
        mesh = mesh_of("generation_mesh")
        max_new, max_len = int(gen.get("max_new_tokens", 8192)), int(gen.get("max_model_len", 10000))
        # Worst case: the longest prompt the length limit allows, so the cache has max_model_len slots.
        shapes = kernels_lib.DecodeShapes(pad_rows(int(gen.get("batch_size", 32)), mesh), 2,
                                          max(max_len - max_new, 1), max_new, max_len)
        yield from _decode_lines(lines, "generate.", model_cfg, mesh, shapes, target, estimates,
                                 dtype=gen.get("dtype", "float32"), param_dtype=gen.get("param_dtype", "float32"),
                                 topk=int(gen.get("topk", 64)))
    ev = plan.get("eval")
    if ev is None:
        return
    mesh = mesh_of("eval_mesh")
    # Eval computes in its dtype; its weights are held in bf16 when it computes in bf16.
    dtype = ev.get("dtype", gen.get("dtype", "float32") if gen else "float32")
    batch = pad_rows(int(ev.get("batch_size", 8)), mesh)
    if "eval_decode" in kernels:
        shapes = kernels_lib.DecodeShapes(batch, 1, eval_prompt_len, int(ev.get("max_new_tokens", 256)),
                                          model_cfg.max_position_embeddings)
        yield from _decode_lines(lines, "eval_decode.", model_cfg, mesh, shapes, target, estimates, dtype=dtype,
                                 param_dtype=dtype)
    if "eval_mc" in kernels or "eval_kl" in kernels:
        from mixsd_jax.eval.units import KL_MAX_BATCH

        # KL holds two models' [rows, width, vocab] logits: the eval runs it on at most KL_MAX_BATCH rows.
        kl_batch = pad_rows(min(int(ev.get("batch_size", 8)), KL_MAX_BATCH), mesh)
        lowered = kernels_lib.eval_scoring(model_cfg, mesh, batch=batch, row_len=eval_row_len, window=eval_window,
                                           dtype=dtype, kl="eval_kl" in kernels, kl_batch=kl_batch)
        for name, low in lowered.items():
            if name in kernels:
                yield from lines({name: low}, mesh, compute_dtype=dtype,
                                 shapes={"batch": kl_batch if name == "eval_kl" else batch, "row_len": eval_row_len,
                                         "window": eval_window})
    if "memit" in kernels and "memit" in plan:  # the edit's kernels (bench.edit_kernels)
        from mixsd_jax.bench.edit_kernels import memit_kernels

        mesh = mesh_of("memit_mesh")
        yield from lines(memit_kernels(model_cfg, mesh, plan["memit"]), mesh, batch_size=plan["memit"].batch_size)
    if "export" in kernels and "train" in plan:
        mesh = mesh_of("train_mesh")
        yield from lines(kernels_lib.export_gather(model_cfg, mesh, param_dtype=plan["train"].param_dtype,
                                                   export_dtype=plan["train"].export_dtype), mesh)


def _train_info(train, mesh) -> dict:
    from mixsd_jax.train.step import platform_of

    return {"shapes": {"grad_accum": train.grad_accum, "micro_batch": train.micro_batch,
                       "seq_len": train.max_seq_len},
            "param_dtype": train.param_dtype, "compute_dtype": train.compute_dtype_on(platform_of(mesh)),
            "remat": train.remat}


def _decode_lines(lines, prefix, model_cfg, mesh, shapes, target, estimates, *, dtype, param_dtype, topk=64):
    lowered = kernels_lib.engine(model_cfg, mesh, shapes, dtype=dtype, param_dtype=param_dtype, topk=topk,
                                 prefix=prefix)
    info = {"shapes": {**dataclasses.asdict(shapes), "capacity": shapes.capacity, "grow_from": shapes.grow_from},
            "param_dtype": param_dtype, "compute_dtype": dtype}
    for line in lines(lowered, mesh, **info):
        if estimates and line["kernel"].endswith("decode_segment"):
            line |= decode_estimates(model_cfg, mesh, shapes, target, dtype=dtype, param_dtype=param_dtype, topk=topk)
        yield line


def target_for(args, argv: list[str], plan: dict) -> Target:
    """The TPU topology's devices, or enough simulated CPU devices for every mesh of the plan."""
    from mixsd_jax.models.sharding import MeshConfig

    if args.topology:
        return tpu_target(args.topology, args.chip_bytes)
    meshes = [plan[k] for k in ("train_mesh", "generation_mesh", "eval_mesh", "memit_mesh")
              if isinstance(plan.get(k), MeshConfig)]
    ensure_cpu_devices(max(mesh_devices(m, args.devices) for m in meshes), argv)
    import jax

    return Target(tuple(jax.devices()), "cpu", None, None, parse_bytes(args.chip_bytes or "16GiB"), fill=args.devices)


def parse_kernels(text: str | None) -> tuple:
    kernels = tuple(text.split(",")) if text else KERNELS
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise MixsdError(f"--kernels: unknown kernel {unknown[0]!r} (known: {', '.join(KERNELS)})")
    return kernels


def prepare(args, argv: list[str]):
    """(plan, target, kernels) of the command line; re-executes for simulated CPU devices if needed."""
    if args.config is None:
        raise MixsdError("bench memory: --config FILE is required (an experiment or a train config)")
    kernels = parse_kernels(args.kernels)
    plan = load_plan_config(args.config, args.overrides)
    return plan, target_for(args, argv, plan), kernels


def run(args, plan: dict, target: Target, kernels) -> int:
    for line in plan_lines(plan, target, kernels=kernels, eval_prompt_len=args.eval_prompt_len,
                           eval_row_len=args.eval_row_len, eval_window=args.eval_window,
                           estimates=not args.no_estimates):
        print(json.dumps({"config": str(args.config), **line}), flush=True)
    return 0
