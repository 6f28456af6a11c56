"""TLS on the receiver and towards destinations, with a CA and certificates made by the test;
DCMTK's storescu and storescp (Debian's build, with OpenSSL) as the peers on the other side."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import subprocess
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from daemon.config import DestinationConfig, TLSConfig
from daemon.dicom.sender import send_one
from daemon.results.report import ImageOutcome, build_sr
from model.manifest import read_manifest
from tests.conftest import DCMTK_ENV, Pacs, free_port, require, running_receiver
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


def test_dcmtk_storescu_over_tls_stores_into_the_receiver(tmp_path: Path, pki: Path) -> None:
    require("/usr/bin/storescu")
    path = tmp_path / "image.dcm"
    make_dx().save_as(path, enforce_file_format=True)
    with running_receiver(tmp_path, _tls_config(pki, True)) as h:
        tls = ["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")]
        proc = subprocess.run(["/usr/bin/storescu", *tls, "-aec", "OPACITYD", "127.0.0.1", str(h.port),
                               str(path)], env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert len(list(h.spool.root.rglob("*.dcm"))) == 1


def _tls_pacs(tmp_path: Path, pki: Path, server: str) -> Pacs:
    """DCMTK storescp with TLS, its certificate from ``server``, client certificates required."""
    scp = ["+tls", str(pki / f"{server}.key"), str(pki / f"{server}.crt"), "+cf", str(pki / "ca.crt"),
           "-rc"]
    # storescp with the rogue certificate cannot be reached by a verifying echoscu: -ic.
    scu = ["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt"), "-ic"]
    return Pacs(tmp_path / f"pacs-{server}", free_port(), (scp, scu)).start()


def _destination(port: int, pki: Path, client_certificate: bool) -> DestinationConfig:
    tls = TLSConfig(enabled=True, ca_certificates=str(pki / "ca.crt"),
                    certificate=str(pki / "client.crt") if client_certificate else "",
                    private_key=str(pki / "client.key") if client_certificate else "")
    return DestinationConfig(name="pacs", host="localhost", port=port, called_ae="PACS", tls=tls)


def test_srs_go_to_a_tls_pacs_and_each_tls_failure_is_named(tmp_path: Path, pki: Path,
                                                            demo_bundle: Path) -> None:
    image = make_dx()
    sr = build_sr(image.StudyInstanceUID, [ImageOutcome(image, 0.42)], read_manifest(demo_bundle))
    pacs = _tls_pacs(tmp_path, pki, "server")
    try:
        outcome = send_one(_destination(pacs.port, pki, True), sr, timeout=10)
        assert outcome.delivered, outcome
        assert [pydicom.dcmread(p).SOPInstanceUID for p in pacs.srs()] == [sr.SOPInstanceUID]
        outcome = send_one(_destination(pacs.port, pki, False), sr, timeout=10)
        assert (outcome.reason, outcome.delivered) == ("tls_failed", False)
        assert "CERTIFICATE_REQUIRED" in outcome.detail, outcome
    finally:
        pacs.stop()
    rogue = _tls_pacs(tmp_path, pki, "rogue")
    try:
        outcome = send_one(_destination(rogue.port, pki, True), sr, timeout=10)
        assert outcome.reason == "tls_failed" and "CERTIFICATE_VERIFY_FAILED" in outcome.detail, outcome
        assert rogue.srs() == []
    finally:
        rogue.stop()
    plain = Pacs(tmp_path / "pacs-plain", free_port()).start()
    try:
        outcome = send_one(_destination(plain.port, pki, True), sr, timeout=10)
        assert outcome.reason == "tls_failed" and "a TLS port?" in outcome.detail, outcome
    finally:
        plain.stop()
    # Nothing listening at all is not a TLS problem.
    assert send_one(_destination(free_port(), pki, True), sr, timeout=5).reason == "unreachable"
