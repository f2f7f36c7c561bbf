"""Where files live: local paths and bucket URLs (`gs://…`, any fsspec URL) behind one path type.

Every file the project reads or writes goes through `path()`, an `etils.epath.Path`: on a pod the
hosts share no disk, only a bucket, so the run directory is a URL and the same code writes it.
Two rules keep URLs intact: never `Path(url).absolute()` (that makes `/cwd/gs:/bucket`), and never
the builtin `open()` on a path (it writes a local file named `gs:`); `p.open()` reads and writes
either. Orbax and TFDS get `str(path)`, the URL itself.

Object storage renames nothing and appends nothing: a file is written whole (an upload appears
complete or not at all), a streamed file is a folder of numbered chunk objects (files.JsonlAppender),
and a folder is committed by a marker object written after its contents (`commit_marker`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Union

from etils import epath

from mixsd_jax.errors import MixsdError

PathLike = Union[str, os.PathLike]
COMMIT_MARKER = ".mixsd_complete"  # written last into a folder built in place on a bucket


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    """Where a multi-process run's hosts meet: the run directory, and the compilation cache."""

    # A local out_dir that every host mounts (NFS, Filestore); without it a multi-process run
    # wants a bucket URL, since each host's own disk is seen by that host alone.
    shared_local: bool = False
    # XLA's persistent compilation cache; None: `<out_dir>/.jax_cache` when out_dir is a URL (so
    # every host reuses what one compiled), else the user cache on this machine.
    compile_cache_dir: str | None = None


def is_url(p: PathLike) -> bool:
    return "://" in str(p)


def path(p: PathLike) -> epath.Path:
    """The one path type: a URL as given; a local path with `~` expanded, made absolute."""
    if is_url(p):
        configure_environment()
        _no_listing_cache()
        text = str(p)
        return epath.Path(text.rstrip("/") if not text.endswith("://") else text)
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(p))))


def _no_listing_cache() -> None:
    """gcsfs keeps each folder listing it read and answers `exists()` from it: an object another
    host wrote after that stays invisible. Hosts meet through the bucket, so every look asks it."""
    import fsspec.config

    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


def configure_environment(environ=None) -> None:
    """`STORAGE_EMULATOR_HOST` alone points every client at a GCS emulator: gcsfs and Google's
    libraries read it; tensorstore (Orbax's array writer) has its own endpoint setting, set here
    from it, with a placeholder token so it looks up no credentials; gcsfs's probe for a
    hierarchical bucket goes over gRPC, which emulators do not serve, and would wait 60 s."""
    environ = os.environ if environ is None else environ
    host = environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    url = host if "://" in host else f"http://{host}"
    environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def check_reachable(p: PathLike, key: str) -> None:
    """One quick look at a URL's bucket before a run writes there, so a missing bucket or an
    unreachable endpoint is one line naming the setting instead of a retrying client's traceback."""
    if not is_url(p):
        return
    text = str(p)
    scheme, _, rest = text.partition("://")
    bucket = rest.split("/", 1)[0]
    if scheme in ("gs", "gcs"):
        _check_gcs_bucket(bucket, key, text)
        return
    try:
        path(f"{scheme}://{bucket}").exists()
    except Exception as exc:  # noqa: BLE001 - any client error is the same user-facing problem
        raise MixsdError(f"config key '{key}': {text} is not reachable ({first_line(exc)})") from None


def _check_gcs_bucket(bucket: str, key: str, text: str) -> None:
    import json
    import urllib.error
    import urllib.request

    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:  # real GCS: the client's own credentials and retries; ask it once
        try:
            exists = path(f"gs://{bucket}").exists()
        except Exception as exc:  # noqa: BLE001
            raise MixsdError(f"config key '{key}': {text} is not reachable ({first_line(exc)})") from None
        if not exists:
            raise MixsdError(f"config key '{key}': {text}: bucket gs://{bucket} does not exist")
        return
    base = host if "://" in host else f"http://{host}"
    try:
        with urllib.request.urlopen(f"{base}/storage/v1/b/{bucket}", timeout=10) as response:
            json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise MixsdError(f"config key '{key}': {text}: bucket gs://{bucket} does not exist") from None
        raise MixsdError(f"config key '{key}': {text}: storage answered HTTP {exc.code}") from None
    except (OSError, ValueError) as exc:
        raise MixsdError(f"config key '{key}': {text}: storage endpoint {base} (STORAGE_EMULATOR_HOST) "
                         f"is not reachable ({first_line(exc)})") from None


def first_line(exc: BaseException) -> str:
    return ((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:200]


def check_out_dir(out_dir: PathLike, key: str, processes: int, shared_local: bool) -> None:
    """A run of several processes must write one directory every host sees: a URL, or a local path
    the user says is shared (NFS, Filestore). A relative local path is each host's own folder (an
    absolute one is taken as a mount the hosts share)."""
    if processes <= 1 or is_url(out_dir) or shared_local or os.path.isabs(os.path.expanduser(str(out_dir))):
        return
    raise MixsdError(
        f"config key '{key}': {out_dir} is on this host's disk, but the run has {processes} processes that share "
        "no disk; use a bucket URL (gs://bucket/run), or set storage.shared_local: true for a shared filesystem")


def commit_marker(folder: PathLike) -> epath.Path:
    return path(folder) / COMMIT_MARKER


def is_committed(folder: PathLike) -> bool:
    """A folder built in place on a bucket is whole once its marker exists; a local folder is
    renamed into place whole, so it is whole once it exists."""
    folder = path(folder)
    return commit_marker(folder).exists() if is_url(folder) else folder.exists()


def files_under(folder: PathLike) -> list[epath.Path]:
    """Every file below `folder`, sorted (what `rglob("*")` gives locally; buckets have no `**`)."""
    out, pending = [], [path(folder)]
    while pending:
        for child in pending.pop().iterdir():
            if child.is_dir():
                pending.append(child)
            else:
                out.append(child)
    return sorted(out)


def remove(p: PathLike) -> None:
    p = path(p)
    if p.is_dir():
        p.rmtree()
    elif p.exists():
        p.unlink()
