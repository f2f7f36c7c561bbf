"""JSONL records -> a TFDS dataset in array_record files (random access, no TensorFlow needed).

JSONL stays the interchange format; this is the high-throughput path for large corpora. The
dataset keeps the file's record order (shuffling is the reader's job, from a seed), has one split
`train`, and stores each record as text features: user, assistant, clear_answer and subject
(None stays None), and every other field as `extra_json`. Read it back with
`tfds.data_source(name, data_dir=...)`, `tfds.builder_from_directory(path)` or
`grain_source.record_source(path)`.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

import numpy as np

from mixsd_jax import storage
from mixsd_jax.data.records import Record, read_records
from mixsd_jax.errors import MixsdError

VERSION = "1.0.0"
SPLIT = "train"


def dataset_name(jsonl_path: str | Path) -> str:
    """A valid TFDS name from a file name: `train_messages_mix_l0.3.jsonl` -> `train_messages_mix_l0_3`."""
    name = re.sub(r"[^a-z0-9]+", "_", Path(jsonl_path).name.removesuffix(".jsonl").lower()).strip("_")
    return name if name and name[0].isalpha() else f"records_{name}"


def example_from_record(index: int, record: Record) -> dict:
    return {
        "index": index,
        "user": record.user,
        "assistant": record.assistant,
        "clear_answer": record.clear_answer,
        "subject": record.subject,
        "extra_json": json.dumps(record.extra, ensure_ascii=False),
    }


def record_from_example(example: dict) -> Record:
    """Inverse of `example_from_record` for what the data source returns (text as bytes)."""

    def text(value):
        return value.decode("utf-8") if isinstance(value, bytes) else value

    return Record(
        user=text(example["user"]),
        assistant=text(example["assistant"]),
        clear_answer=text(example["clear_answer"]),
        subject=text(example["subject"]),
        extra=json.loads(text(example["extra_json"])),
    )


def build_tfds(jsonl_path: str | Path, data_dir: str | Path, name: str | None = None, *, allow_empty_assistant: bool = False) -> Path:
    """Builds (or rebuilds) dataset `name` under `data_dir`; returns its versioned directory."""
    jsonl_path = storage.path(jsonl_path)
    name = name or dataset_name(jsonl_path)
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise MixsdError(f"TFDS name {name!r}: use lowercase letters, digits and '_', starting with a letter")
    records = read_records(jsonl_path, allow_empty_assistant=allow_empty_assistant)
    if not records:
        raise MixsdError(f"{jsonl_path}: no records to build a dataset from")
    digest = hashlib.sha256(jsonl_path.read_bytes()).hexdigest()

    import tensorflow_datasets as tfds  # heavy: only when building

    target = storage.path(data_dir)
    # array_record writes through its own local-file layer, so a bucket's dataset is built in a
    # local temporary folder and uploaded.
    with tempfile.TemporaryDirectory(prefix="mixsd-tfds-") as scratch:
        builder = _builder_class(tfds, name)(
            records=records, source=jsonl_path.name, source_sha256=digest,
            data_dir=f"{scratch}/data" if storage.is_url(target) else str(target), file_format="array_record",
        )
        # Always rebuild: reusing an existing directory would silently keep stale records.
        config = tfds.download.DownloadConfig(download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD)
        builder.download_and_prepare(download_dir=f"{scratch}/downloads", download_config=config)
        if not storage.is_url(target):
            return storage.path(builder.data_dir)
        return _upload(storage.path(builder.data_dir), target / name / VERSION)


def _upload(local, dest):
    """A built dataset folder into the bucket, replacing what was there; dataset_info.json, which
    makes it a dataset to TFDS's readers, last."""
    storage.remove(dest)
    files = sorted(storage.files_under(local), key=lambda p: (p.name == "dataset_info.json", str(p)))
    for path in files:
        (dest / path.relative_to(local)).parent.mkdir(parents=True, exist_ok=True)
        (dest / path.relative_to(local)).write_bytes(path.read_bytes())
    return dest


def _builder_class(tfds, dataset: str):
    # Defined per call and kept out of TFDS's global registry, so any number of datasets (and
    # readers by name in the same process) can coexist.
    with tfds.core.registered.skip_registration():

        class JsonlRecords(tfds.core.GeneratorBasedBuilder):
            name = dataset
            VERSION = tfds.core.Version(VERSION)
            # No download checksums to look up; TFDS's lookup of them next to the code imports
            # `importlib_resources`, which tensorflow-datasets does not install.
            code_path = None

            def __init__(self, *, records: list[Record], source: str, source_sha256: str, **kwargs):
                self._records = records
                self._source = source
                self._source_sha256 = source_sha256
                super().__init__(**kwargs)

            def _info(self):
                text = tfds.features.Text
                return tfds.core.DatasetInfo(
                    builder=self,
                    description=f"mixsd-jax records from {self._source}",
                    features=tfds.features.FeaturesDict(
                        {
                            "index": tfds.features.Scalar(dtype=np.int64),
                            "user": text(),
                            "assistant": text(),
                            "clear_answer": text(optional=True),
                            "subject": text(optional=True),
                            "extra_json": text(),
                        }
                    ),
                    disable_shuffling=True,
                    metadata=tfds.core.MetadataDict(source=self._source, source_sha256=self._source_sha256),
                )

            def _split_generators(self, dl_manager):
                return {SPLIT: self._generate_examples()}

            def _generate_examples(self):
                for index, record in enumerate(self._records):
                    yield index, example_from_record(index, record)

    return JsonlRecords
