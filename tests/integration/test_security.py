"""Access control, DICOM TLS and limits against the real node process, with DCMTK as the peer."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from pathlib import Path

import pytest

from tests.peers import NodeProcess, Sink, free_port, require_shared, require_tool, small_fixtures, storescu, write_fixture_dicoms, wait_port

pytestmark = pytest.mark.network


# -- throwaway PKI -----------------------------------------------------------
def _pki(d: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem, k, cert):
        (d / f"{stem}.key").write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
        (d / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def ca(cn):
        k = key()
        c = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(k.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .sign(k, hashes.SHA256()))
        return k, c

    def leaf(cn, ca_key, ca_cert, server):
        k = key()
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject).public_key(k.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return k, b.sign(ca_key, hashes.SHA256())

    ca_k, ca_c = ca("dermnode test CA")
    write("ca", ca_k, ca_c)
    rogue_k, rogue_c = ca("rogue CA")
    for stem, issuer, server in (("server", (ca_k, ca_c), True), ("client", (ca_k, ca_c), False),
                                 ("sink", (ca_k, ca_c), True), ("rogue-client", (rogue_k, rogue_c), False)):
        k, c = leaf(stem, *issuer, server)
        write(stem, k, c)
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return _pki(tmp_path_factory.mktemp("pki"))


def _echo(port: int, calling: str, called: str = "DERMNODE", extra: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("echoscu"), "-v", "-aet", calling, "-aec", called, *(extra or []),
                           "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60)


# -- access control ------------------------------------------------------------
def test_calling_aet_allowlist_and_host_binding(tmp_path):
    audit = tmp_path / "audit.log"
    node = NodeProcess(tmp_path / "node", free_port(), extra_env={
        "DERMNODE_NODE__ALLOWED_CALLING_AETS": '["GOODAE", "BOUNDAE"]',
        "DERMNODE_NODE__CALLING_AET_HOSTS": '{"BOUNDAE": ["10.254.254.254"]}',
        "DERMNODE_LOGGING__AUDIT_FILE": str(audit),
    }).start()
    try:
        ok = _echo(node.port, "GOODAE")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        bad = _echo(node.port, "BADAE")
        assert bad.returncode != 0
        assert "Association Rejected" in bad.stdout + bad.stderr
        assert "Calling AE Title Not Recognized" in bad.stdout + bad.stderr
        bound = _echo(node.port, "BOUNDAE")  # allowed AE, wrong source address
        assert bound.returncode != 0 and "Calling AE Title Not Recognized" in bound.stdout + bound.stderr
        wrong_called = _echo(node.port, "GOODAE", called="NOTME")
        assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stdout + wrong_called.stderr
    finally:
        node.stop()
    lines = audit.read_text().splitlines()
    assert any("rejected calling=BADAE" in l and "allowed_calling_aets" in l for l in lines), lines
    assert any("rejected calling=BOUNDAE" in l and "not allowed from 127.0.0.1" in l for l in lines), lines
    assert any("released calling=GOODAE called=DERMNODE" in l and "tls=no" in l for l in lines), lines
    assert any("rejected calling=GOODAE called=NOTME" in l for l in lines), lines


# -- TLS ---------------------------------------------------------------------------
def _tls_args(pki, who: str) -> list[str]:
    return ["+tls", str(pki[f"{who}_key"]), str(pki[f"{who}_crt"]), "+cf", str(pki["ca_crt"])]


def test_dicom_tls_both_ways(tmp_path, pki):
    require_shared()
    # The destination is DCMTK storescp over TLS, requiring our client certificate.
    sink_port = free_port()
    sink_dir = tmp_path / "sink"
    sink_dir.mkdir()
    sink = subprocess.Popen([require_tool("storescp"), "-aet", "SINK", "-od", str(sink_dir), "+xa",
                             *_tls_args(pki, "sink"), "-rc", str(sink_port)],
                            stdout=open(tmp_path / "sink.log", "wb"), stderr=subprocess.STDOUT)
    wait_port(sink_port, 20, sink)
    node = NodeProcess(tmp_path / "node", sink_port, extra_env={
        "DERMNODE_TLS__ENABLED": "true",
        "DERMNODE_TLS__CERT": pki["server_crt"], "DERMNODE_TLS__KEY": pki["server_key"],
        "DERMNODE_TLS__CA": pki["ca_crt"], "DERMNODE_TLS__REQUIRE_CLIENT_CERT": "true",
        "DERMNODE_DESTINATION__TLS": "true", "DERMNODE_DESTINATION__TLS_CA": pki["ca_crt"],
        "DERMNODE_DESTINATION__TLS_CERT": pki["client_crt"], "DERMNODE_DESTINATION__TLS_KEY": pki["client_key"],
    }).start()
    try:
        inputs = write_fixture_dicoms(tmp_path / "in", small_fixtures(1))
        # a TLS client with a valid certificate works (DCMTK storescu +tls)
        storescu(node.port, inputs, extra=_tls_args(pki, "client"))
        # plain TCP fails
        plain = storescu(node.port, inputs, check=False)
        assert plain.returncode != 0
        # a certificate from an untrusted CA fails
        rogue = storescu(node.port, inputs, check=False, extra=_tls_args(pki, "rogue-client"))
        assert rogue.returncode != 0
        # no client certificate at all fails (mutual TLS)
        anon = storescu(node.port, inputs, check=False, extra=["+tla", "+cf", str(pki["ca_crt"])])
        assert anon.returncode != 0
        # the node sent the 4 results to the TLS destination
        import time

        deadline = time.time() + 120
        while time.time() < deadline and len(list(sink_dir.iterdir())) < 4:
            time.sleep(0.3)
        assert len(list(sink_dir.iterdir())) == 4, node.log_text()[-2000:]
    finally:
        node.stop()
        sink.terminate()
        sink.wait(10)
    assert "DICOM TLS" in node.log_text()


def test_tls_config_errors_name_the_setting(tmp_path):
    from node.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="tls.cert is required"):
        load_settings(env={"DERMNODE_TLS__ENABLED": "true"})
    with pytest.raises(ConfigError, match="tls.cert: file not found"):
        load_settings(env={"DERMNODE_TLS__ENABLED": "true", "DERMNODE_TLS__CERT": str(tmp_path / "nope.pem"),
                           "DERMNODE_TLS__KEY": str(tmp_path / "nope.key")})


def test_tls_minimum_version_is_1_2(pki):
    import ssl

    from node.network.tls import client_context, server_context

    assert server_context(str(pki["server_crt"]), str(pki["server_key"])).minimum_version == ssl.TLSVersion.TLSv1_2
    assert client_context(str(pki["ca_crt"])).minimum_version == ssl.TLSVersion.TLSv1_2


# -- limits ------------------------------------------------------------------------
def test_dataset_size_limit_refuses_with_c000(tmp_path):
    require_shared()
    from tests.peers import fixture_rows

    biggest = sorted(fixture_rows(), key=lambda r: int(r["width"]) * int(r["height"]))[-1:]
    inputs = write_fixture_dicoms(tmp_path / "in", biggest)
    assert inputs[0].stat().st_size > 2**20
    sink = Sink(tmp_path / "sink", free_port()).start()
    node = NodeProcess(tmp_path / "node", sink.port, extra_env={"DERMNODE_LIMITS__MAX_DATASET_MB": "1"}).start()
    try:
        res = storescu(node.port, inputs, check=False, extra=["-v"])
        assert "Error: CannotUnderstand" in res.stdout + res.stderr or "0xc000" in (res.stdout + res.stderr).lower()
        assert list((tmp_path / "node" / "spool" / "in").iterdir()) == []
        assert "exceeds limits.max_dataset_mb" in node.log_text()
    finally:
        node.stop()
        sink.stop()
