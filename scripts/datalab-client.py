#!/usr/bin/env python3
"""Sign and upload a file to a datalab proxy; print the nonce and the URL to embed. Or list an
owner's instances (the instance API).

    scripts/datalab-client.py FILE [--url http://127.0.0.1:8080] [--key KEY] [--destination tree]
                                   [--scheme sha256|hmac-sha256] [--cacert CA.pem]
                                   [--owner ID] [--profile NAME] [--unpack]
    scripts/datalab-client.py --list OWNER [--url ...] [--key KEY] [--scheme ...] [--cacert CA.pem]

The key defaults to $DATALAB_SIGN_KEY, then to .state/sign_key (what run.sh generated).
Standard library only, so any python3 runs it. It signs as docs/api.md "Signatures" says, with
its own sign(): a client written from the docs, not from the proxy's code.
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
START_EXTRAS = ("owner", "profile", "unpack")  # signed after the filename, in this order


def sign(key: str, ts: str, subject: str, scheme: str) -> str:
    """X-SIGN as the proxy's datalab_sign_scheme asks (docs/api.md, Signatures)."""
    if scheme == "hmac-sha256":
        return hmac.new(key.encode(), f"{ts}\n{subject}".encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256((key + ts + subject).encode()).hexdigest()


def start_subject(filename: str, extras: dict[str, str]) -> str:
    """A start signs its filename, then "\n<name>=<value>" for each extra it sends, in START_EXTRAS' order."""
    return filename + "".join(f"\n{name}={extras[name]}" for name in START_EXTRAS if name in extras)


def listing_subject(owner: str) -> str:
    return f"GET /datalab/instances\nowner={owner}"


def default_key() -> str:
    key = os.environ.get("DATALAB_SIGN_KEY") or ""
    state = ROOT / ".state" / "sign_key"
    if not key and state.exists():
        key = state.read_text().strip()
    return key


def call(request: urllib.request.Request, context: ssl.SSLContext | None) -> dict:
    """The answer's result; a refusal ends the script with its code and message."""
    try:
        with urllib.request.urlopen(request, timeout=180, context=context) as r:
            return json.load(r)["result"]
    except urllib.error.HTTPError as e:
        body = json.loads(e.read() or b"{}")
        sys.exit(f"refused ({e.code} {body.get('code')}): {body.get('message')}")
    except urllib.error.URLError as e:
        sys.exit(f"cannot reach the proxy: {e.reason}")


def upload(base: str, key: str, path: Path, scheme: str, context: ssl.SSLContext | None, extras: dict[str, str]) -> str:
    ts = str(int(time.time() * 1000))  # milliseconds: a signature is used once
    query = urllib.parse.urlencode({"ts": ts, "filename": path.name, **extras})
    request = urllib.request.Request(
        f"{base}/datalab/start?{query}",
        data=path.read_bytes(),
        headers={
            "X-SIGN": sign(key, ts, start_subject(path.name, extras), scheme),
            "Content-Type": "application/octet-stream",
        },
        method="POST",
    )
    return call(request, context)["nonce"]


def list_instances(base: str, key: str, owner: str, scheme: str, context: ssl.SSLContext | None) -> list[dict]:
    ts = str(int(time.time()))
    query = urllib.parse.urlencode({"ts": ts, "owner": owner})
    headers = {"X-SIGN": sign(key, ts, listing_subject(owner), scheme)}
    return call(urllib.request.Request(f"{base}/datalab/instances?{query}", headers=headers), context)["instances"]


def shown(entry: dict) -> str:
    """One instance on a line: its work, state, file and what ends it next."""
    state = f"ended ({entry['ended']})" if entry["state"] == "ended" else entry["state"]
    line = f"{entry['work']}  {state:<18} {entry['profile']:<10} {entry['filename']}"
    deadlines = [d for d in (entry["idle_deadline"], entry["max_age_deadline"]) if d is not None]
    if deadlines:
        line += f"  (ends by {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(min(deadlines)))} unless used)"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path, nargs="?")
    parser.add_argument("--url", default=os.environ.get("DATALAB_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--key", default=default_key())
    parser.add_argument("--destination", default="", help="path to open after the redirect, e.g. notebooks/x.ipynb")
    parser.add_argument("--scheme", default=os.environ.get("DATALAB_SIGN_SCHEME") or "sha256", choices=SCHEMES)
    parser.add_argument("--cacert", type=Path, help="CA certificate to trust for an https:// proxy")
    parser.add_argument("--owner", help="the frontend's id of the user the instance is for (signed)")
    parser.add_argument("--profile", help="the operator's profile to start (signed)")
    parser.add_argument("--unpack", action="store_true", help="unpack the archive (zip, tar, tar.gz) (signed)")
    parser.add_argument("--list", metavar="OWNER", help="list this owner's instances instead of uploading")
    args = parser.parse_args()
    if not args.key:
        sys.exit("no sign key: pass --key, set DATALAB_SIGN_KEY, or run ./run.sh once to generate .state/sign_key")
    base = args.url.rstrip("/")
    context = ssl.create_default_context(cafile=args.cacert) if args.cacert else None
    if args.list:
        for entry in list_instances(base, args.key, args.list, args.scheme, context):
            print(shown(entry))
        return
    if args.file is None:
        parser.error("give a FILE to upload, or --list OWNER")
    given = {"owner": args.owner, "profile": args.profile, "unpack": "1" if args.unpack else None}
    nonce = upload(base, args.key, args.file, args.scheme, context, {k: v for k, v in given.items() if v})
    destination = args.destination or (f"notebooks/{args.file.name}" if args.file.suffix == ".ipynb" else "tree")
    print(f"nonce:  {nonce}")
    print(f"view:   {base}/datalab/view/{nonce}/{urllib.parse.quote(destination)}")
    print(f"static: {base}/datalab/static/{nonce}/files/{urllib.parse.quote(args.file.name)}")


if __name__ == "__main__":
    main()
