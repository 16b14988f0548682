"""`proper certs` and `proper keygen`: the federation's local CA, the SuperLink's TLS certificate
and SuperNode key pairs (server/deploy.py parses the commands). Private keys are written owner-only.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path


def _write_private(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def keygen(out: str | Path, force: bool = False) -> tuple[Path, Path]:
    """A SuperNode key pair: OpenSSH-format ECDSA P-384 (what flower-supernode and
    `flwr supernode register` accept). The private key stays on the client host; the server
    operator registers only FILE.pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key_path = Path(out)
    pub_path = key_path.with_name(key_path.name + ".pub") if key_path.suffix != ".key" else key_path.with_suffix(".pub")
    if key_path.exists() and not force:
        if not pub_path.exists():
            raise SystemExit(f"{key_path} exists without {pub_path}; remove it or pass --force")
        return key_path, pub_path
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()))
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                       serialization.PublicFormat.OpenSSH) + b"\n")
    return key_path, pub_path


def make_certs(out: str | Path, hosts=(), nodes: int = 0, days: int = 365, force: bool = False) -> dict:
    """A local CA (ca.crt, ca.key), the SuperLink's certificate (server.crt, server.key) signed by
    it for localhost, 127.0.0.1, ::1 and every name or address in `hosts`, and `nodes` SuperNode key
    pairs node-<i>.key / node-<i>.pub. Existing files are kept (so adding nodes later does not
    invalidate anything) unless force; a --host the server certificate lacks gets a new server
    certificate from the same CA (clients keep their ca.crt)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5),
                 not_valid_after=now + datetime.timedelta(days=days))
    made = {}

    def private_pem(key) -> bytes:
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    if force or not (out / "ca.crt").exists() or not (out / "ca.key").exists():
        ca_key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "proper-fl federation CA")])
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False,
                                           encipher_only=False, decipher_only=False), critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA384()))
        _write_private(out / "ca.key", private_pem(ca_key))
        (out / "ca.crt").write_bytes(ca.public_bytes(pem))
        made["ca"] = out / "ca.crt"
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)

    names = ["localhost", "127.0.0.1", "::1", *hosts]
    reissue = force or "ca" in made or not (out / "server.crt").exists() or not (out / "server.key").exists()
    if not reissue:  # an existing certificate that lacks a requested name: a new one, same CA
        san = x509.load_pem_x509_certificate((out / "server.crt").read_bytes()).extensions \
            .get_extension_for_class(x509.SubjectAlternativeName).value
        have = set(san.get_values_for_type(x509.DNSName)) | {str(a) for a in san.get_values_for_type(x509.IPAddress)}
        reissue = any(_canon(h) not in have for h in hosts)
    if reissue:
        sans, seen = [], set()
        for h in names:
            if _canon(h) in seen:
                continue
            seen.add(_canon(h))
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        key = ec.generate_private_key(ec.SECP384R1())
        cn = hosts[0] if hosts else "localhost"
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA384()))
        _write_private(out / "server.key", private_pem(key))
        (out / "server.crt").write_bytes(cert.public_bytes(pem))
        made["server"] = out / "server.crt"
    for i in range(1, nodes + 1):
        key_path = out / f"node-{i}.key"
        if force or not key_path.exists():
            keygen(key_path, force=True)
            made[f"node-{i}"] = key_path
    return made


def _canon(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host
