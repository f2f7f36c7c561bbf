"""The `mixsd` command. Each package contributes its subcommands through `commands.register`."""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from mixsd_jax.errors import MixsdError

# Each module defines `register(subparsers, bench_subparsers)` and sets `func` on its parsers.
COMMAND_MODULES = (
    "mixsd_jax.models.commands",
    "mixsd_jax.data.commands",
    "mixsd_jax.sampling.commands",
    "mixsd_jax.train.commands",
    "mixsd_jax.edit.commands",
    "mixsd_jax.eval.commands",
    "mixsd_jax.pipeline.commands",
    "mixsd_jax.bench.commands",
    "mixsd_jax.bench.plan_commands",
)


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixsd", description="MixSD knowledge injection in JAX")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser("bench", help="benchmarks that print one JSON line").add_subparsers(
        dest="bench_command", metavar="BENCH"
    )
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if not name.startswith(exc.name or "\0"):  # a real missing dependency, not a package without commands
                raise
            continue
        module.register(sub, bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command itself, not a library call: run its allocations on huge pages
        from mixsd_jax.huge_pages import reexec_with_huge_pages

        reexec_with_huge_pages(sys.argv[1:])
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # argparse places trailing positionals only once; `key=value` overrides may come anywhere.
    stray = [e for e in extras if not _OVERRIDE.match(e)]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extras:
        if not hasattr(args, "overrides"):
            parser.error(f"this command takes no key=value overrides: {' '.join(extras)}")
        args.overrides = list(args.overrides) + extras
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        if args.command == "bench":  # benches touch devices: join a multi-host run (MIXSD_* environment)
            from mixsd_jax.multihost import maybe_initialize

            maybe_initialize()
        return int(func(args) or 0)
    except MixsdError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        _tell_other_hosts(str(exc), exit_code=2)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        # Only the comparisons with transformers' PyTorch models (parity, benches) need it.
        print("error: this command compares against PyTorch; install it with the test extras: "
              "pip install -e '.[test]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _tell_other_hosts("interrupted", exit_code=130)
        return 130
    except BaseException as exc:
        import traceback

        if "jax" in sys.modules:  # a collective failed because a host was killed: it names that host
            from mixsd_jax.peer_watch import wait_if_a_peer_died

            wait_if_a_peer_died(exc)
        traceback.print_exc()
        _tell_other_hosts(f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}", exit_code=1)
        raise


def _tell_other_hosts(message: str, exit_code: int) -> None:
    """In a multi-process run the others may wait for this one in a collective: they stop too,
    and this one exits at once (JAX's shutdown at exit would wait for the hosts that just left)."""
    if "jax" not in sys.modules:
        return
    import jax

    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return
    import os

    from mixsd_jax.peer_watch import report_failure

    report_failure(message)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


if __name__ == "__main__":
    sys.exit(main())
