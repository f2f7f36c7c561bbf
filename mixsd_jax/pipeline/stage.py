"""A pipeline stage and a plan of stages: what the runner executes, skips or wipes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from mixsd_jax.pipeline.config import ExperimentConfig


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    fingerprint: str  # equal to the recorded one (and outputs present) => skipped
    reset: str  # differs from the recorded one => old outputs wiped before running
    workdir: Path
    outputs: tuple[Path, ...]
    inputs: tuple[str, ...]  # names of the stages it reads from
    run: Callable[[], dict] = dataclasses.field(compare=False, repr=False)
    description: str = ""
    # Parts (eval: one per checkpoint) whose own outputs are wiped when only their fingerprint changes.
    parts: dict[str, str] = dataclasses.field(default_factory=dict)
    part_dirs: tuple[str, ...] = ()  # format strings under workdir, `{name}` = part name
    owns_workdir: bool = True  # False for a user's corpus directory: never wiped
    settings: Any = dataclasses.field(default=None, compare=False, repr=False)  # the resolved stage config


@dataclasses.dataclass(frozen=True)
class Plan:
    config: ExperimentConfig
    exp_dir: Path
    model_dir: Path
    stages: tuple[Stage, ...]
    report: Path  # report.md of the eval stage

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


def settings_hash(*parts: Any) -> str:
    """A stage fingerprint: 16 hex digits of the SHA-256 of the parts as canonical JSON."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_hash(path: Path) -> str:
    from mixsd_jax.files import sha256_file

    return sha256_file(path)[:16]
