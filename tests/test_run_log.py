"""train/run_log.py: TensorBoard event files of successive runs in one folder."""

import time

from mixsd_jax.train.run_log import TensorBoard


def test_two_runs_started_in_the_same_second_keep_two_event_files(tmp_path, monkeypatch):
    """The event file is named after its start time in whole seconds: a run resumed within that
    second must not overwrite the first run's events."""
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.25)  # both writers see the same second
    for step in (1, 2):
        board = TensorBoard(tmp_path / "tb")
        board.writer.add_scalar("train/loss", float(step), step)
        board.close()
    files = sorted((tmp_path / "tb").iterdir())
    assert len(files) == 2 and all(f.stat().st_size > 0 for f in files)
