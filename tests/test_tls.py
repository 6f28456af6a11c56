"""TLS on the receiver, with a CA and certificates made by the test."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from tests.conftest import running_receiver
from tests.factories import make_dx


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer.subject if issuer else
                     x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    folder = tmp_path / "pki"
    folder.mkdir()
    ca_key = _key()
    ca = _cert("opacityd test CA", ca_key, None, ca_key, ca=True)
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in ("server", "client"):
        key = _key()
        _write(folder, name, _cert(name, key, ca, ca_key, ca=False), key)
    rogue_key = _key()
    rogue_ca = _cert("rogue CA", rogue_key, None, rogue_key, ca=True)
    key = _key()
    _write(folder, "rogue", _cert("rogue", key, rogue_ca, rogue_key, ca=False), key)
    return folder


def _client_context(pki: Path, cert: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    return ctx


def _tls_config(pki: Path, require_client: bool) -> str:
    return (f'[receiver.tls]\nenabled = true\ncertificate = "{pki / "server.crt"}"\n'
            f'private_key = "{pki / "server.key"}"\nca_certificates = "{pki / "ca.crt"}"\n'
            f"require_client_certificate = {str(require_client).lower()}\n")


def _associate(port: int, tls: ssl.SSLContext | None):  # type: ignore[no-untyped-def]
    ae = AE(ae_title="TLSCLIENT")
    ae.add_requested_context(Verification)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    ae.acse_timeout = ae.network_timeout = 5
    args = (tls, "localhost") if tls else None
    return ae.associate("127.0.0.1", port, ae_title="OPACITYD", tls_args=args)


def test_tls_with_client_certificate_accepts_a_store(tmp_path: Path, pki: Path) -> None:
    with running_receiver(tmp_path, _tls_config(pki, True)) as h:
        assoc = _associate(h.port, _client_context(pki, "client"))
        assert assoc.is_established
        try:
            assert assoc.send_c_echo().Status == 0
            assert assoc.send_c_store(make_dx()).Status == 0
        finally:
            assoc.release()
        assert len(list(h.spool.root.rglob("*.dcm"))) == 1


@pytest.mark.parametrize("client", [None, "no-cert", "rogue"])
def test_tls_required_refuses_plain_unauthenticated_and_foreign_clients(
        tmp_path: Path, pki: Path, client: str | None) -> None:
    with running_receiver(tmp_path, _tls_config(pki, True)) as h:
        if client is None:
            assoc = _associate(h.port, None)
        else:
            assoc = _associate(h.port, _client_context(pki, None if client == "no-cert" else client))
        established = assoc.is_established
        if established:
            assoc.release()
        assert not established
        # The receiver keeps serving good clients afterwards.
        good = _associate(h.port, _client_context(pki, "client"))
        assert good.is_established
        good.release()


def test_tls_without_client_certificates_accepts_anonymous_tls_clients(tmp_path: Path,
                                                                       pki: Path) -> None:
    with running_receiver(tmp_path, _tls_config(pki, False)) as h:
        assoc = _associate(h.port, _client_context(pki, None))
        assert assoc.is_established
        assoc.release()
