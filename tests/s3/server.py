"""A real S3-compatible server for the publish stage's tests: SeaweedFS (``weed mini``), built from its Go
module by build.sh, run as a local process on free loopback ports with one identity (an access key
pair that may read and write) and one bucket.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build.sh"
ACCESS_KEY = "PUBLISHTESTKEY000001"
SECRET_KEY = "publish-test-secret-value-do-not-leak"
BUCKET = "models"


@dataclass
class S3Server:
    endpoint: str
    """``http://127.0.0.1:<port>``"""
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> Any:
        """A minio client of this server (the publish stage's S3 client), for tests to look at the bucket."""
        from minio import Minio

        return Minio(self.endpoint.removeprefix("http://"), access_key=access_key, secret_key=secret_key, secure=False)


def build() -> Path:
    """bin/weed, built on first use, then cached (the directory build.sh prints)."""
    out = subprocess.run([str(BUILD)], check=True, stdout=subprocess.PIPE, text=True, timeout=3600).stdout
    return Path(out.strip().splitlines()[-1]) / "bin" / "weed"


def _free_ports(count: int) -> list[int]:
    """Ports free now (held open together, so they differ), for a server started right after."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@contextmanager
def running(root: Path) -> Iterator[S3Server]:
    """SeaweedFS with an S3 gateway on a free port, the bucket created, until the block ends."""
    weed = build()
    root.mkdir(parents=True, exist_ok=True)
    identity = {
        "identities": [
            {
                "name": "publisher",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config = root / "s3.json"
    config.write_text(json.dumps(identity))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, debug = _free_ports(9)
    args = [
        str(weed),
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-debug.port={debug}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        f"-s3.config={config}",
        f"-bucket={BUCKET}",
    ]
    (root / "data").mkdir(exist_ok=True)
    log = root / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    server = S3Server(f"http://127.0.0.1:{s3}", proc, log)
    try:
        _wait_ready(server)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(server: S3Server, timeout: float = 120) -> None:
    """Until the bucket answers (the gateway starts after master, volume and filer)."""
    deadline = time.monotonic() + timeout
    client = server.client()
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if client.bucket_exists(BUCKET):
                return
        except Exception as exc:  # not listening yet, or the filer not ready
            last = exc
        time.sleep(0.3)
    raise RuntimeError(f"SeaweedFS not ready after {timeout} s ({last!r}):\n{server.log_tail()}")
