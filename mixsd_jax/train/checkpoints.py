"""Orbax checkpoints of a training run: the state (step.TrainState: params, optimizer, step) and a JSON `meta`.

`meta` records the step (= data-iterator position: batch k is a pure function of the seed and k),
the resume fingerprint and the full config, so a directory can be checked before anything is
restored and exported later without the original command line. Saves are asynchronous where
Orbax supports it: the device-to-host copy happens before `save` returns, so the next (donating)
train step can run while the files are written.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from mixsd_jax import storage
from mixsd_jax.errors import MixsdError
from mixsd_jax.train import config as train_config

_NEVER = 1 << 62  # save_interval_steps when only forced (final) saves are wanted


class Checkpoints:
    def __init__(self, directory: str | Path, *, save_every: int = 0, keep: int = 3, async_save: bool = True):
        self.directory = storage.path(directory)  # a URL stays one: Orbax writes buckets itself
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every or _NEVER,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, step: int, abstract_state):
        """(state, meta) of checkpoint `step`; the state has `abstract_state`'s pytree type (a
        step.TrainState) and is placed as its shardings say."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["meta"])

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Saves when `step` is a multiple of `save_every` or `force`; a step already on disk is kept.
        (Decided here rather than by Orbax, which would also save the first step it sees.)"""
        on_interval = self.save_every > 0 and step % self.save_every == 0
        if not (force or on_interval) or step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def check_compatible(ckpt: Checkpoints, step: int, cfg: train_config.TrainConfig) -> dict:
    """The meta of checkpoint `step`, after checking it was written by a run of the same config
    (up to run length and output settings); otherwise a MixsdError naming both fingerprints."""
    meta = ckpt.read_meta(step)
    current = train_config.resume_fingerprint(cfg)
    stored = meta.get("fingerprint")
    if stored != current:
        stored_cfg = meta.get("config_fingerprinted", {})
        keys = train_config.differing_keys(stored_cfg, train_config.fingerprinted_dict(cfg))
        raise MixsdError(
            f"{ckpt.directory}: checkpoint step {step} was written with config fingerprint {stored}, this run has "
            f"{current} (differing keys: {', '.join(keys) or 'unknown'}); use another `out` directory or the same config"
        )
    return meta


def is_primary() -> bool:
    return jax.process_index() == 0
