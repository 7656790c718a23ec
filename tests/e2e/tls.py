"""TLS for end-to-end tests: a throwaway CA and leaf, run.sh's TLS check, a browser and curl over
HTTP/2 that trust the test's CA."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.oid import NameOID

from e2e.proxy import ROOT
from e2e.proxy import Browser
from e2e.proxy import Proxy

COOKIE = "__Host-datalab_session"  # datalab_cookie_secure=true: the __Host- prefix, no Domain


class TestCA:
    """A throwaway CA and a leaf for localhost and 127.0.0.1 it signed, as PEM files in `where`:
    ca.pem, fullchain.pem (leaf, then CA) and key.pem, as an operator would give them to run.sh."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, where: Path):
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "datalab e2e test CA")])
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ca_ski, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        self.where = where
        self.ca_pem = ca.public_bytes(pem)
        self.leaf_pem = leaf.public_bytes(pem)
        self.key_pem = leaf_key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        self.ca = where / "ca.pem"
        self.ca.write_bytes(self.ca_pem)
        self.fullchain = where / "fullchain.pem"
        self.fullchain.write_bytes(self.leaf_pem + self.ca_pem)
        self.key = where / "key.pem"
        self.key.write_bytes(self.key_pem)
        self.key.chmod(0o600)


def run_sh_tls_check(state: Path, cert: Path | str, key: Path | str) -> subprocess.CompletedProcess:
    """`./run.sh --tls-check`: checks the two files and writes state/tls.pem; installs and starts nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATALAB_")}
    env |= {"DATALAB_STATE": str(state), "DATALAB_VENV": str(Path(sys.executable).parent.parent)}
    env |= {"DATALAB_TLS_CERT": str(cert), "DATALAB_TLS_KEY": str(key)}
    command = ["bash", str(ROOT / "run.sh"), "--tls-check"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd=state)


def tls_browser(proxy: Proxy, ca: Path) -> Browser:
    browser = Browser(proxy)  # its URLs are the proxy's https base
    browser.http.verify = str(ca)
    browser.http.trust_env = False  # else REQUESTS_CA_BUNDLE, when set, overrides a Session's verify
    return browser


def curl_h2(proxy: Proxy, ca: Path, path: str, *extra: str, stdin=None) -> tuple[str, bytes]:
    """curl over HTTP/2 (ALPN h2, asserted), verifying against `ca`, to https://localhost:PORT with
    localhost resolved by curl itself to 127.0.0.1 (no lookup) and no proxy. Returns (trace, body)."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is not installed (Debian: apt-get install curl); these tests speak HTTP/2 with it")
    port = proxy.port
    command = [curl, "-sS", "-v", "--http2", "--cacert", str(ca), "--resolve", f"localhost:{port}:127.0.0.1"]
    command += ["--noproxy", "*", "--max-time", "120", *extra, f"https://localhost:{port}{path}"]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    done = subprocess.run(command, stdin=stdin, capture_output=True, timeout=150, env=env)
    trace = done.stderr.decode(errors="replace")
    assert done.returncode == 0, trace
    assert "ALPN: server accepted h2" in trace, trace
    request_line = next(line for line in trace.splitlines() if line.startswith("> "))
    assert request_line.endswith(" HTTP/2"), trace
    return trace, done.stdout
