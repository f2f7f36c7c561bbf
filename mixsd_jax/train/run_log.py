"""What a training run logs as it goes: metrics.jsonl, TensorBoard scalars and the progress bar.

Only process 0 writes. metrics.jsonl is trimmed back to the checkpoint a run resumes from, so it
tells the history of the parameters actually kept. TensorBoard's event files are appended to as
the run goes, which a bucket cannot do: for a URL `out` they are written in a local temporary
folder and uploaded whole into `out/tb/` at every metrics flush and at close (a killed run loses
at most the scalars since the last flush; metrics.jsonl holds them all).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from mixsd_jax import storage
from mixsd_jax.files import JsonlAppender, atomic_write_jsonl, read_partial_jsonl, remove_partial

METRIC_KEYS = ("loss", "accuracy", "grad_norm", "lr", "tokens", "loss_tokens")
# OPSD rows also log their rollouts (`loss` is then the divergence, `accuracy` the share of
# response tokens where student and teacher argmax agree).
OPSD_METRIC_KEYS = ("rollout_tokens", "rollout_s", "rollout_tokens_per_s", "teacher_tokens", "mean_response_tokens",
                    "stopped")



class RunLog:
    """metrics.jsonl, TensorBoard scalars and the progress bar; only process 0 writes files."""

    def __init__(self, out, start: int, total: int, *, primary: bool, progress: bool):
        self.metrics = self.tb = None
        if primary:
            self.metrics = _metrics_appender(out / "metrics.jsonl", start)
            self.tb = TensorBoard(out / "tb")
        self.bar = None
        if progress and primary:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def write(self, step: int, epoch: int, values: dict) -> None:
        if self.metrics is None:
            return
        row = {"step": step, "epoch": epoch, **{k: values[k] for k in (*METRIC_KEYS, "tokens_per_s")},
               **{k: values[k] for k in OPSD_METRIC_KEYS if k in values}}
        self.metrics.write(row)
        for key, value in row.items():
            if key != "step":
                self.tb.writer.add_scalar(f"train/{key}", value, step)
        self.tb.maybe_upload()

    def advance(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        for item in (self.bar, self.metrics, self.tb):
            if item is not None:
                item.close()


def _metrics_appender(path, start: int) -> JsonlAppender:
    """An appender positioned after `start`: lines a killed run wrote past its last checkpoint are
    dropped, so the file tells the history of the parameters actually kept."""
    if not path.exists():
        return JsonlAppender(path)
    kept = [row for row in read_partial_jsonl(path) if row.get("step", 0) <= start]
    if not storage.is_url(path):
        atomic_write_jsonl(path, kept)
        return JsonlAppender(path)
    remove_partial(path)  # a bucket stream is rewritten as one chunk of the kept rows
    appender = JsonlAppender(path)
    for row in kept:
        appender.write(row)
    appender.flush()
    return appender


class TensorBoard:
    """Event files in `folder`: written there directly on a local disk; for a URL written in a
    local temporary folder and uploaded whole (each file one object) every `MIXSD_FLUSH_SECONDS`
    of logging and at close, since an object cannot be appended to."""

    def __init__(self, folder):
        from tensorboardX import SummaryWriter

        self.folder = storage.path(folder)
        self.local = tempfile.mkdtemp(prefix="mixsd-tb-") if storage.is_url(self.folder) else None
        # The event file's name has the start time in whole seconds: a run resumed within the same
        # second would overwrite the first run's file (its object in a bucket). The suffix tells them apart.
        self.writer = SummaryWriter(self.local or str(self.folder), filename_suffix=f".{time.time_ns()}")
        self.every_s = float(os.environ.get("MIXSD_FLUSH_SECONDS", 5))
        self.uploaded = time.monotonic()

    def maybe_upload(self) -> None:
        if self.local is not None and time.monotonic() - self.uploaded >= self.every_s:
            self.upload()

    def upload(self) -> None:
        self.writer.flush()
        self._copy()

    def close(self) -> None:
        self.writer.close()
        if self.local is not None:
            try:
                self._copy()
            finally:
                shutil.rmtree(self.local, ignore_errors=True)

    def _copy(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(self.local)):
            with open(os.path.join(self.local, name), "rb") as f:  # a local temporary file
                (self.folder / name).write_bytes(f.read())
        self.uploaded = time.monotonic()
