"""An S3-compatible server on this machine for the tests of ``--store s3://...``: moto's server, bound to
127.0.0.1 on a free port, with test keys; nothing leaves the loopback interface."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

_SERVE = """
import sys, time
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the test closes the pipe
"""

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # never ask a cloud's instance metadata service (169.254.169.254) for credentials
    "AWS_EC2_METADATA_DISABLED": "true",
}
"""What the driver and every node need to reach the test server."""


@dataclass
class S3Server:
    port: int
    process: subprocess.Popen

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, bucket: str, prefix: str = "") -> str:
        """A ``--store`` URI for ``bucket``/``prefix`` on this server."""
        path = f"{bucket}/{prefix}".rstrip("/")
        return f"s3://{path}?region=us-east-1&scheme=http&endpoint_override={self.endpoint}"

    def client(self):
        """A boto3 client of this server, with the test keys."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=f"http://{self.endpoint}",
            region_name="us-east-1",
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)

    def keys(self, bucket: str) -> list[str]:
        """Every object key in ``bucket``."""
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server in a child process (bound to 127.0.0.1, a free port), stopped on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **S3_ENV},
    )
    try:
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError("moto's S3 server did not start (is moto[server] installed?)")
        yield S3Server(int(line), proc)
    finally:
        proc.kill()
        proc.wait(timeout=30)
