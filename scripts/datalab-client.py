#!/usr/bin/env python3
"""Sign and upload a file to a datalab proxy; print the nonce and the URL to embed.

    scripts/datalab-client.py FILE [--url http://127.0.0.1:8080] [--key KEY] [--destination tree]
                                   [--scheme sha256|hmac-sha256] [--cacert CA.pem]

The key defaults to $DATALAB_SIGN_KEY, then to .state/sign_key (what run.sh generated).
Standard library only, so any python3 runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = ("sha256", "hmac-sha256")


def sign(key: str, ts: str, filename: str, scheme: str) -> str:
    """X-SIGN as the proxy's datalab_sign_scheme asks (docs/api.md, Signatures)."""
    if scheme == "hmac-sha256":
        return hmac.new(key.encode(), f"{ts}\n{filename}".encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256((key + ts + filename).encode()).hexdigest()


def default_key() -> str:
    key = os.environ.get("DATALAB_SIGN_KEY") or ""
    state = ROOT / ".state" / "sign_key"
    if not key and state.exists():
        key = state.read_text().strip()
    return key


def upload(base: str, key: str, path: Path, scheme: str, context: ssl.SSLContext | None) -> str:
    ts = str(int(time.time() * 1000))  # milliseconds: a signature is used once
    query = urllib.parse.urlencode({"ts": ts, "filename": path.name})
    request = urllib.request.Request(
        f"{base}/datalab/start?{query}",
        data=path.read_bytes(),
        headers={"X-SIGN": sign(key, ts, path.name, scheme), "Content-Type": "application/octet-stream"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=180, context=context) as r:
            return json.load(r)["result"]["nonce"]
    except urllib.error.HTTPError as e:
        body = json.loads(e.read() or b"{}")
        sys.exit(f"refused ({e.code} {body.get('code')}): {body.get('message')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path)
    parser.add_argument("--url", default=os.environ.get("DATALAB_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--key", default=default_key())
    parser.add_argument("--destination", default="", help="path to open after the redirect, e.g. notebooks/x.ipynb")
    parser.add_argument("--scheme", default=os.environ.get("DATALAB_SIGN_SCHEME") or "sha256", choices=SCHEMES)
    parser.add_argument("--cacert", type=Path, help="CA certificate to trust for an https:// proxy")
    args = parser.parse_args()
    if not args.key:
        sys.exit("no sign key: pass --key, set DATALAB_SIGN_KEY, or run ./run.sh once to generate .state/sign_key")
    base = args.url.rstrip("/")
    context = ssl.create_default_context(cafile=args.cacert) if args.cacert else None
    nonce = upload(base, args.key, args.file, args.scheme, context)
    destination = args.destination or (f"notebooks/{args.file.name}" if args.file.suffix == ".ipynb" else "tree")
    print(f"nonce:  {nonce}")
    print(f"view:   {base}/datalab/view/{nonce}/{urllib.parse.quote(destination)}")
    print(f"static: {base}/datalab/static/{nonce}/files/{urllib.parse.quote(args.file.name)}")


if __name__ == "__main__":
    main()
