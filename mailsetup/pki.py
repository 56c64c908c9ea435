"""Keys, self-signed certificates and CSRs for the mail host, and inspection of existing ones.

Everything returns PEM bytes; writing (0600 from the first byte) is files.py's job.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailsetup.errors import MailsetupError
from mailsetup.files import read_secret

KEY_MODE = 0o600
CERT_MODE = 0o644


def generate_key(key_type: str):
    from mailsetup.model import validate_key_type

    key_type = validate_key_type(key_type)
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=4096 if key_type == "rsa-4096" else 2048)


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(hostname: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])


def _key_usage(key) -> x509.KeyUsage:
    # RSA key exchange (TLS 1.2 non-ECDHE suites) needs keyEncipherment; ECDSA keys must not claim it.
    return x509.KeyUsage(
        digital_signature=True,
        key_encipherment=isinstance(key, rsa.RSAPrivateKey),
        content_commitment=False, data_encipherment=False, key_agreement=False,
        key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
    )


def self_signed_cert(key, hostname: str, days: int, now: dt.datetime | None = None) -> bytes:
    """A self-signed server certificate: SAN dNSName, CA:FALSE, serverAuth, key ids."""
    now = now or dt.datetime.now(dt.UTC)
    pub = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(hostname))
        .issuer_name(_name(hostname))
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate a little clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(pub), critical=False)
    )
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM)


def csr(key, hostname: str) -> bytes:
    """A certificate signing request for a CA, with the same SAN and serverAuth."""
    req = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(hostname))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return req.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CertInfo:
    subject: str
    names: tuple[str, ...]
    not_after: dt.datetime
    key_type: str
    fingerprint_sha256: str

    def days_left(self, now: dt.datetime | None = None) -> int:
        now = now or dt.datetime.now(dt.UTC)
        return (self.not_after - now).days


def _describe_key(pub) -> str:
    if isinstance(pub, rsa.RSAPublicKey):
        return f"rsa-{pub.key_size}"
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ecdsa-p256"}.get(pub.curve.name, f"ecdsa-{pub.curve.name}")
    return type(pub).__name__


def load_cert(path: Path, flag: str = "--cert") -> x509.Certificate:
    try:
        data = read_secret(Path(path))  # smtpd will serve it: as root, only a certificate no user can swap
    except OSError as exc:
        raise MailsetupError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise MailsetupError(f"{flag}: {path} is not a PEM certificate") from None


def load_key(path: Path, flag: str = "--key"):
    try:
        data = read_secret(Path(path))
    except OSError as exc:
        raise MailsetupError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise MailsetupError(
            f"{flag}: {path} is not an unencrypted PEM private key (smtpd cannot ask for a passphrase)"
        ) from None


def inspect_cert(cert: x509.Certificate) -> CertInfo:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = tuple(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        names=names,
        not_after=cert.not_valid_after_utc,
        key_type=_describe_key(cert.public_key()),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
    )


def _public_der(pub) -> bytes:
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def is_pair(cert: x509.Certificate, key) -> bool:
    return _public_der(cert.public_key()) == _public_der(key.public_key())


def check_existing_pair(cert_path: Path, key_path: Path, hostname: str) -> CertInfo:
    """Validate a user's own cert and key (e.g. Let's Encrypt): readable, a pair, naming the host."""
    cert = load_cert(cert_path)
    key = load_key(key_path)
    if not is_pair(cert, key):
        raise MailsetupError(f"--key: {key_path} is not the private key of the certificate {cert_path}")
    info = inspect_cert(cert)
    if not _covers(info.names, hostname):
        raise MailsetupError(
            f"--cert: {cert_path} names {', '.join(info.names) or 'no DNS names'}, not {hostname}"
        )
    return info


def _covers(names: tuple[str, ...], hostname: str) -> bool:
    for name in names:
        name = name.lower()
        if name == hostname:
            return True
        if name.startswith("*.") and hostname.split(".", 1)[-1] == name[2:] and hostname.count(".") >= 2:
            return True
    return False


def load_chain(path: Path, flag: str = "--cert") -> list[x509.Certificate]:
    """Every certificate of a chain file (certbot's fullchain.pem: the leaf first)."""
    try:
        data = read_secret(Path(path))
    except OSError as exc:
        raise MailsetupError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise MailsetupError(f"{flag}: {path} is not a PEM certificate chain") from None


def chain_break(certs: list[x509.Certificate]) -> str | None:
    """Where a chain does not hold together: a certificate not issued by the next one; None when it does."""
    for n, (cert, issuer) in enumerate(zip(certs, certs[1:], strict=False), 1):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            return f"certificate {n} of the chain is not issued by certificate {n + 1}"
    return None


def verify_chain(certs: list[x509.Certificate], roots_pem: bytes, hostname: str, now: dt.datetime) -> None:
    """The leaf, through the chain's intermediates, to one of the roots, valid for `hostname` at `now`
    (a server's chain as a client judges it). MailsetupError with the verifier's reason when not."""
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    try:
        roots = Store(x509.load_pem_x509_certificates(roots_pem))
    except ValueError:
        raise MailsetupError("the trust store holds no PEM certificates") from None
    verifier = PolicyBuilder().store(roots).time(now).build_server_verifier(x509.DNSName(hostname))
    try:
        verifier.verify(certs[0], certs[1:])
    except VerificationError as exc:
        raise MailsetupError(str(exc)) from None
