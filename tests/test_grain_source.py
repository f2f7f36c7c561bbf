"""The batch stream: seeded per-epoch order, step = resumable position, JSONL and TFDS alike."""

import itertools

import numpy as np
import pytest

from mixsd_jax.data.grain_source import (
    TfdsRecordSource,
    batch_iterator,
    batches_per_epoch,
    epoch_order,
    record_source,
    training_records,
)
from mixsd_jax.data.kgfunc import build_kgfunc
from mixsd_jax.data.layout import KGFUNC_TRAIN_DIR
from mixsd_jax.data.records import read_records, validate_file
from mixsd_jax.data.tfds_builder import build_tfds
from mixsd_jax.errors import MixsdError

pytest.importorskip("grain")
pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Builder -> JSONL -> validator -> TFDS: the path a large corpus takes to the trainer."""
    root = tmp_path_factory.mktemp("corpus")
    build_kgfunc(root, seed=5, preset="small")
    jsonl = root / KGFUNC_TRAIN_DIR / "train_messages.jsonl"
    report = validate_file(jsonl)
    assert report.ok and not report.duplicates and report.records == 1750
    return jsonl, build_tfds(jsonl, root / "tfds")


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_epoch_order_is_a_seeded_permutation():
    order = epoch_order(10, seed=3, epoch=0)
    assert sorted(order.tolist()) == list(range(10))
    assert np.array_equal(order, epoch_order(10, seed=3, epoch=0))
    assert not np.array_equal(order, epoch_order(10, seed=3, epoch=1))
    assert not np.array_equal(order, epoch_order(10, seed=4, epoch=0))
    # (seed, epoch) pairs do not alias the way seed + epoch would.
    assert not np.array_equal(epoch_order(10, seed=3, epoch=1), epoch_order(10, seed=4, epoch=0))


def test_tfds_and_jsonl_sources_hold_the_same_records(corpus):
    jsonl, tfds_dir = corpus
    from_jsonl = record_source(jsonl)
    from_tfds = record_source(tfds_dir.parent.parent)  # the data_dir: its one dataset is found
    assert isinstance(from_tfds, TfdsRecordSource) and len(from_tfds) == len(from_jsonl) == 1750
    assert [from_tfds[i] for i in range(len(from_tfds))] == read_records(jsonl)


def test_grain_batches_are_the_same_records_from_either_source(corpus):
    jsonl, tfds_dir = corpus
    from_jsonl = take(batch_iterator(record_source(jsonl), 64, seed=11), 30)  # crosses an epoch end
    from_tfds = take(batch_iterator(record_source(tfds_dir), 64, seed=11), 30)
    assert from_jsonl == from_tfds
    records = read_records(jsonl)
    per_epoch = batches_per_epoch(1750, 64)
    assert per_epoch == 27
    first_epoch = [r for batch in from_jsonl[:per_epoch] for r in batch]
    order = epoch_order(1750, 11, 0)
    assert first_epoch == [records[i] for i in order[: 27 * 64]]


def test_every_record_once_per_epoch_and_remainder_handling():
    records = list(range(10))  # any random-access sequence works as a source
    kept = take(batch_iterator(records, 4, seed=0, drop_remainder=False), 3)
    assert [len(b) for b in kept] == [4, 4, 2]
    assert sorted(sum(kept, [])) == records
    dropped = list(batch_iterator(records, 4, seed=0, num_epochs=2))
    assert [len(b) for b in dropped] == [4, 4, 4, 4]
    assert dropped[:2] != dropped[2:]  # reshuffled each epoch
    assert sum(dropped[:2], []) == [records[i] for i in epoch_order(10, 0, 0)[:8]]


def test_resuming_at_step_k_continues_the_fresh_run():
    records = list(range(23))
    fresh = take(batch_iterator(records, 5, seed=9), 20)  # 4 batches per epoch, 5 epochs
    for k in (0, 1, 3, 4, 7, 13):
        assert take(batch_iterator(records, 5, seed=9, start_step=k), 20 - k) == fresh[k:]
    assert take(batch_iterator(records, 5, seed=10), 20) != fresh


def test_bad_requests_are_clear_errors(tmp_path):
    with pytest.raises(MixsdError, match="batch size 11 is larger than the 10 records"):
        next(batch_iterator(list(range(10)), 11, seed=0))
    with pytest.raises(MixsdError, match="batch size 0"):
        next(batch_iterator(list(range(10)), 0, seed=0))
    with pytest.raises(MixsdError, match="no such file or directory"):
        record_source(tmp_path / "missing.jsonl")
    with pytest.raises(MixsdError, match="found no TFDS dataset"):
        record_source(tmp_path)


def test_training_records_reads_either_source_whole_and_refuses_an_empty_one(corpus, tmp_path):
    jsonl, tfds_dir = corpus
    assert training_records(tfds_dir) == training_records(jsonl) == read_records(jsonl)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(MixsdError, match="empty.jsonl: no training records"):
        training_records(empty)
