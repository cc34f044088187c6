"""Credentials an app can present instead of a client secret, for tests: certificates and federated tokens.

- :func:`make_certificate`: a key pair and a self-signed (or CA-signed) certificate in PEM, as
  ``openssl req -x509`` or ``New-SelfSignedCertificate`` would make for an app registration.
- :class:`OidcIssuer`: a small OpenID Connect issuer over HTTPS on 127.0.0.1 (discovery document
  and JWKS), signing federated tokens like a Kubernetes service-account issuer. The Entra ID
  stand-in fetches its keys as Entra fetches a real issuer's.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import secrets
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

#: The audience Entra expects in a federated token.
EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"


@dataclass(frozen=True)
class CertificatePair:
    """A private key and its certificate, both PEM (the key encrypted when ``passphrase`` is set)."""

    key_pem: str = field(repr=False)
    certificate_pem: str
    passphrase: str | None = field(default=None, repr=False)

    def write(self, directory: Path, name: str = "app") -> tuple[Path, Path]:
        """``name.key`` (0600) and ``name.pem`` in ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.key_pem)
        cert_path.write_text(self.certificate_pem)
        return key_path, cert_path


def make_certificate(
    common_name: str = "airflow-o365mail",
    *,
    days: float = 365,
    passphrase: str | None = None,
    not_before: dt.datetime | None = None,
) -> CertificatePair:
    """A 2048-bit RSA key and a self-signed certificate valid for ``days`` from ``not_before`` (default now)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    encryption = (
        serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption).decode()
    return CertificatePair(
        key_pem=key_pem,
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        passphrase=passphrase,
    )


def _b64url_int(value: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes((value.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


class OidcIssuer:
    """An OpenID Connect issuer on ``https://127.0.0.1:<port>/<name>`` that signs federated tokens.

    Use it as a context manager; ``mint()`` signs a token, ``write_token_file()`` puts one where a
    workload would find it (as the kubelet projects a service-account token).
    """

    def __init__(self, cert_file: str | Path, key_file: str | Path, name: str = "issuer") -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = secrets.token_hex(8)
        self._name = name
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(str(cert_file), str(key_file))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        #: Discovery and JWKS requests served (the stand-in caches keys per issuer).
        self.requests = 0

    def __repr__(self) -> str:
        return f"OidcIssuer({self.issuer if self._server else 'stopped'})"

    @property
    def issuer(self) -> str:
        assert self._server is not None, "start the issuer first"
        return f"https://127.0.0.1:{self._server.server_address[1]}/{self._name}"

    def jwks(self) -> dict:
        numbers = self._key.public_key().public_numbers()
        return {
            "keys": [
                {
                    "kty": "RSA",
                    "use": "sig",
                    "alg": "RS256",
                    "kid": self.kid,
                    "n": _b64url_int(numbers.n),
                    "e": _b64url_int(numbers.e),
                }
            ]
        }

    def start(self) -> OidcIssuer:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.requests += 1
                prefix = f"/{issuer._name}"
                if self.path == f"{prefix}/.well-known/openid-configuration":
                    body = {
                        "issuer": issuer.issuer,
                        "jwks_uri": f"{issuer.issuer}/openid/v1/jwks",
                        "response_types_supported": ["id_token"],
                        "subject_types_supported": ["public"],
                        "id_token_signing_alg_values_supported": ["RS256"],
                    }
                elif self.path == f"{prefix}/openid/v1/jwks":
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                return None

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.socket = self._tls.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="oidc-issuer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OidcIssuer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def mint(
        self,
        subject: str,
        *,
        audience: str | list[str] = EXCHANGE_AUDIENCE,
        lifetime: float = 3600,
        issued_at: float | None = None,
        issuer: str | None = None,
        signing_key: rsa.RSAPrivateKey | None = None,
    ) -> str:
        """A federated token for ``subject``; ``issuer`` and ``signing_key`` override for refusal tests."""
        now = time.time() if issued_at is None else issued_at
        claims = {
            "iss": issuer or self.issuer,
            "sub": subject,
            "aud": audience,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + lifetime),
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(claims, signing_key or self._key, algorithm="RS256", headers={"kid": self.kid})

    def write_token_file(self, path: Path, subject: str, **kwargs: object) -> str:
        """Write a fresh token to ``path`` atomically (as the kubelet swaps a projected token)."""
        token = self.mint(subject, **kwargs)  # type: ignore[arg-type]
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token)
        tmp.replace(path)
        return token
