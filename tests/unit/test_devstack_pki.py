"""The dev stack's CA can be loaded again to issue identities a running stack lacks (an identity
added since it started, such as egress-auditor), and what it issues chains to the same CA."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from egressctl.devstack.pki import CertificateAuthority


def test_a_loaded_ca_issues_certificates_the_original_ca_verifies(tmp_path: Path) -> None:
    original = CertificateAuthority(tmp_path, "ca")
    loaded = CertificateAuthority.load(tmp_path, "ca")
    assert loaded.pair == original.pair
    pair = loaded.issue("egress-auditor", "egress-auditor", organizations=("egress-auditors",))
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(original.pair.cert.read_bytes())
    assert cert.issuer == ca.subject
    public_key = ca.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    public_key.verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )
    subject = {a.oid: a.value for a in cert.subject}
    assert subject[NameOID.COMMON_NAME] == "egress-auditor"
    assert subject[NameOID.ORGANIZATION_NAME] == "egress-auditors"
    # Loading never rewrote the CA.
    assert x509.load_pem_x509_certificate(original.pair.cert.read_bytes()) == ca
