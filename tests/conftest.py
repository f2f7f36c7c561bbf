"""Shared fixtures: tiny real checkpoints written by transformers, and the embedded default model.

Eight simulated CPU devices are configured before JAX is imported, so sharding tests can build
meshes; computations without a mesh still run on one device. XLA's persistent compilation cache
is shared by the whole run (every pytest-xdist worker, every subprocess a test starts, which
inherit the environment): most of the suite's time is compiling the same tiny-model kernels in
another process. It is named by the host's processor, as the project's own cache is: a temp folder
carried to a machine of another kind must not hand it programs for instructions it lacks.
"""

import os
import tempfile

from mixsd_jax.compile_cache import host_fingerprint

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"mixsd-jax-test-xla-{os.getuid()}", host_fingerprint()))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402


def _tiny(tmp_path_factory, family):
    from mixsd_jax.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp(f"tiny_{family}"), family)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return _tiny(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    return _tiny(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    return _tiny(tmp_path_factory, "qwen3")


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory):
    """Three layers: sliding, sliding, full (window 16, shorter than the test prompts)."""
    from mixsd_jax.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny_gemma3"), "gemma3", layers=3)


@pytest.fixture(scope="session", params=["llama", "qwen2", "qwen3"])
def tiny_model_dir(request):
    return request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded default, converted once per machine into the user cache (as `mixsd models pull`)."""
    from mixsd_jax.models.registry import EMBEDDED_DEFAULT, pull

    return pull(EMBEDDED_DEFAULT)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test file. XLA:CPU maps every executable's code and
    data into the process; a pytest-xdist worker that keeps all of a 2-worker run's programs passes
    the kernel's 65,530 memory maps (vm.max_map_count) near the end of the suite, and the next
    mmap kills it with a fatal signal (two CI runs died so, in different tests). Later files reload
    what they share from the persistent cache."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


def pytest_collection_modifyitems(config, items):
    """A test that loads the embedded 135M model must be marked `slow`, so `-m "not slow"` skips it."""
    unmarked = [item.nodeid for item in items if "smollm2_dir" in item.fixturenames
                and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError(f"uses the embedded model without @pytest.mark.slow: {', '.join(unmarked)}")


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """fake-gcs-server on a free 127.0.0.1 port for the whole session, its buckets in a temp folder."""
    from gcs_server import GcsServer

    server = GcsServer(tmp_path_factory.mktemp("gcs") / "root").start()
    yield server
    server.stop()


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch, request):
    """`gs://<fresh bucket>` with the environment pointing every client (this process and the
    processes the test starts) at the emulator."""
    import re

    from gcs_server import clear_gcsfs_instances

    for key, value in gcs_server.environment().items():
        monkeypatch.setenv(key, value)
    clear_gcsfs_instances()
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40] + f"-{len(gcs_server.buckets)}"
    gcs_server.buckets.append(name)
    yield gcs_server.make_bucket(name)
    clear_gcsfs_instances()
