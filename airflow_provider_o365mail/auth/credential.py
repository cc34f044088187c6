"""The app's credential at the token endpoint: a client secret, a certificate or a federated token.

MSAL takes each in its own ``client_credential`` form (``msal.ClientApplication``):

- a client secret: the string;
- a certificate: ``{"private_key", "public_certificate", "passphrase"}``. MSAL signs a client
  assertion with PS256 and sends the certificate's SHA-256 thumbprint (``x5t#S256``) and the
  certificate itself (``x5c``, what subject name/issuer authentication needs). With
  ``certificate_sha1`` the form is ``{"private_key", "thumbprint", "public_certificate"}``: RS256,
  the SHA-1 thumbprint (``x5t``) and every certificate of the PEM in ``x5c``;
- a federated token: ``{"client_assertion": callable}``; the callable reads the token file on every
  token request, since the file rotates (AKS refreshes it hourly);
- a public client: none (MSAL's ``PublicClientApplication``).

Files are read when a token request is due (:func:`client_credential`), never when settings are
parsed. Every secret read (private key, passphrase, federated token) is registered with the log
maskers before MSAL sees it, and no error message here quotes one.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from airflow_provider_o365mail.auth.masking import mask, mask_assertion, mask_pem
from airflow_provider_o365mail.connection import O365MailSettings
from airflow_provider_o365mail.connection_defaults import (
    CREDENTIAL_CERTIFICATE,
    CREDENTIAL_FEDERATED,
    CREDENTIAL_PUBLIC,
)
from airflow_provider_o365mail.exceptions import ConnectionConfigError

_KEY_BLOCK = re.compile(r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.DOTALL)
_CERT_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.DOTALL)


@dataclass(frozen=True)
class CertificateInfo:
    """What ``doctor`` and the docs show of a certificate credential (no secret in it)."""

    subject: str
    issuer: str
    #: Upper-case hex SHA-1, as the app registration's Certificates & secrets page shows it.
    thumbprint_sha1: str
    #: The ``x5t#S256`` header value: base64url of the SHA-256 of the DER certificate.
    x5t_s256: str
    not_before: dt.datetime
    not_after: dt.datetime
    chain_length: int

    @property
    def days_left(self) -> int:
        return (self.not_after - dt.datetime.now(dt.UTC)).days


@dataclass(frozen=True)
class CertificateMaterial:
    """The PEM texts of one certificate credential, read and checked."""

    key_pem: str
    certificates_pem: str
    leaf: x509.Certificate

    def __repr__(self) -> str:
        return f"CertificateMaterial(subject={self.leaf.subject.rfc4514_string()!r})"


def _read(settings: O365MailSettings, inline: str | None, path: str | None, what: str) -> str | None:
    if inline:
        return inline.replace("\\n", "\n")  # a PEM pasted into one line of a JSON/URI extra
    if not path:
        return None
    try:
        return Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConnectionConfigError(
            f"Connection {settings.conn_id!r}: cannot read the {what} file {path!r} ({type(err).__name__}: "
            f"{getattr(err, 'strerror', None) or 'not a PEM text file'}). Check the path and that this process may "
            "read it."
        ) from None


def _x5t_s256(certificate: x509.Certificate) -> str:
    digest = certificate.fingerprint(hashes.SHA256())
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def load_certificate(settings: O365MailSettings) -> CertificateMaterial:
    """Read and check the certificate and its private key; the key is masked before anything else.

    :raises ConnectionConfigError: a file is missing, the PEM holds no certificate or key, the key
        is encrypted and no (or a wrong) passphrase is set, or key and certificate do not match.
    """
    where = f"Connection {settings.conn_id!r}"
    cert_text = _read(settings, settings.certificate, settings.certificate_path, "certificate") or ""
    key_text = _read(settings, settings.certificate_key, settings.certificate_key_path, "private key") or cert_text
    key_match = _KEY_BLOCK.search(key_text)
    if key_match:
        mask_pem(key_match.group(0))
    mask(settings.certificate_passphrase)
    blocks = _CERT_BLOCK.findall(cert_text)
    if not blocks:
        raise ConnectionConfigError(
            f"{where}: the certificate PEM holds no '-----BEGIN CERTIFICATE-----' block. Use the certificate "
            "(.pem or .crt in PEM form) whose public part is uploaded to the app registration."
        )
    if key_match is None:
        raise ConnectionConfigError(
            f"{where}: no private key found (no '-----BEGIN ... PRIVATE KEY-----' block in certificate_private_key or certificate_key_path "
            "or in the certificate PEM). Set certificate_key_path to the key file."
        )
    try:
        leaf = x509.load_pem_x509_certificate(blocks[0].encode())
    except ValueError:
        raise ConnectionConfigError(f"{where}: the certificate PEM is not a valid X.509 certificate.") from None
    passphrase = settings.certificate_passphrase.encode() if settings.certificate_passphrase else None
    try:
        key = serialization.load_pem_private_key(key_match.group(0).encode(), passphrase)
    except TypeError:
        fix = "set certificate_passphrase" if passphrase is None else "remove certificate_passphrase"
        state = "encrypted" if passphrase is None else "not encrypted"
        raise ConnectionConfigError(f"{where}: the private key is {state}: {fix}.") from None
    except ValueError:
        raise ConnectionConfigError(
            f"{where}: the private key cannot be read: the passphrase is wrong or the key is damaged."
        ) from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ConnectionConfigError(
            f"{where}: the private key does not belong to the certificate "
            f"(subject {leaf.subject.rfc4514_string()}). Pair the key with the certificate it was issued for."
        )
    return CertificateMaterial(key_pem=key_match.group(0), certificates_pem="\n".join(blocks) + "\n", leaf=leaf)


def certificate_info(settings: O365MailSettings) -> CertificateInfo:
    """Subject, thumbprints and validity of the connection's certificate."""
    material = load_certificate(settings)
    leaf = material.leaf
    return CertificateInfo(
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        thumbprint_sha1=leaf.fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S303 - the thumbprint Entra shows
        x5t_s256=_x5t_s256(leaf),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        chain_length=len(_CERT_BLOCK.findall(material.certificates_pem)),
    )


class FederatedTokenFile:
    """MSAL's ``client_assertion`` callable: the federated token, read from its file on every call."""

    def __init__(self, path: str, conn_id: str) -> None:
        self.path = path
        self.conn_id = conn_id

    def __repr__(self) -> str:
        return f"FederatedTokenFile({self.path!r})"

    def __call__(self) -> str:
        try:
            token = Path(self.path).expanduser().read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConnectionConfigError(
                f"Connection {self.conn_id!r}: cannot read the federated token file {self.path!r} "
                f"({type(err).__name__}). On AKS, label the pod azure.workload.identity/use=true and use a "
                "service account annotated with the app's client ID; elsewhere, check federated_assertion_file."
            ) from None
        if not token:
            raise ConnectionConfigError(
                f"Connection {self.conn_id!r}: the federated token file {self.path!r} is empty."
            )
        mask_assertion(token)
        return token


def client_credential(settings: O365MailSettings) -> str | dict | None:
    """MSAL's ``client_credential`` for ``settings`` (files are read now: call it per token request);
    ``None`` for a public client, which has none."""
    if settings.credential_type == CREDENTIAL_PUBLIC:
        return None
    if settings.credential_type == CREDENTIAL_FEDERATED:
        assert settings.federated_assertion_file is not None  # validated in connection.settings_from_fields
        return {"client_assertion": FederatedTokenFile(settings.federated_assertion_file, settings.conn_id)}
    if settings.credential_type == CREDENTIAL_CERTIFICATE:
        material = load_certificate(settings)
        credential: dict = {"private_key": material.key_pem, "public_certificate": material.certificates_pem}
        if settings.certificate_passphrase:
            credential["passphrase"] = settings.certificate_passphrase
        if settings.certificate_sha1:
            credential["thumbprint"] = material.leaf.fingerprint(hashes.SHA1()).hex()  # noqa: S303 - x5t
        return credential
    return settings.client_secret
