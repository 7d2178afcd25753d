"""CoreDNS rules from claims: guards, oldest-wins, determinism, sharding and validation."""

from __future__ import annotations

import pytest

from dns.render import (
    HEADER,
    KEY_PREFIX,
    MAX_KEY_BYTES,
    REASON_DUPLICATE,
    REASON_FORBIDDEN,
    SETTLE_KEY,
    SETTLE_NAME,
    SETTLE_TEXT,
    Claim,
    InvalidSnippet,
    render,
    rules_only,
    settled,
    validate,
)

NS = "egress-operator-system"
DOMAIN = "cluster.local"


def claim(name: str, dns_name: str, at: str = "2026-01-01T00:00:00Z") -> Claim:
    return Claim(claimed_at=at, name=name, dns_name=dns_name)


def test_one_rule_per_hijacked_name_sorted_and_deterministic() -> None:
    claims = [
        claim("github", "github.com"),
        claim("google", "google.com"),
        claim("aws", "s3.amazonaws.com"),
    ]
    out = render(claims, NS, DOMAIN)
    (text,) = out.data.values()
    assert text == HEADER + (
        "rewrite stop name exact github.com github.egress-operator-system.svc.cluster.local\n"
        "rewrite stop name exact google.com google.egress-operator-system.svc.cluster.local\n"
        "rewrite stop name exact s3.amazonaws.com aws.egress-operator-system.svc.cluster.local\n"
    )
    assert render(list(reversed(claims)), NS, DOMAIN).data == out.data
    assert out.granted == {
        "github": "github.com",
        "google": "google.com",
        "aws": "s3.amazonaws.com",
    }
    assert out.refused == {}


def test_no_claims_no_keys() -> None:
    assert render([], NS, DOMAIN).data == {}


@pytest.mark.parametrize(
    "dns_name",
    [
        "kubernetes.default.svc.cluster.local",
        "cluster.local",
        "foo.svc.cluster.local",
        "localhost",
        "db.localhost",
        "1.0.0.10.in-addr.arpa",
        "intranet",
        "Bad_Name.com",
        "kubernetes.default.svc",
        "metadata.google.internal",
        # partial cluster names the search path completes
        "kubernetes.default",
        "api.kube-system",
        f"gw.{NS}",
        "10-0-0-1.default.pod",
        # reverse-zone apexes
        "in-addr.arpa",
        "ip6.arpa",
        # every cloud metadata name and alias
        "metadata.goog",
        "instance-data.ec2.internal",
        # cloud node names and private zones
        "instance-1.us-central1-a.c.my-project.internal",
        "ip-10-0-0-1.ec2.internal",
        "ip-10-0-0-1.eu-west-1.compute.internal",
        "vm1.internal.cloudapp.net",
        "vm1.reddog.microsoft.com",
        "printer.local",
        "router.home.arpa",
        # what the product itself needs
        "pubsub.googleapis.com",
        "oauth2.googleapis.com",
    ],
)
def test_forbidden_names_are_never_hijacked(dns_name: str) -> None:
    out = render([claim("evil", dns_name)], NS, DOMAIN)
    assert out.rules == []
    assert out.refused["evil"][0] == REASON_FORBIDDEN


def test_custom_cluster_domain_is_protected() -> None:
    out = render([claim("a", "api.k8s.example")], NS, "k8s.example")
    assert out.refused["a"][0] == REASON_FORBIDDEN
    assert render([claim("a", "api.k8s.example")], NS, DOMAIN).granted == {"a": "api.k8s.example"}


@pytest.mark.parametrize(
    "dns_name",
    ["google.com", "storage.googleapis.com", "api.default-service.com", "podcast.example.net"],
)
def test_ordinary_names_still_may_be_hijacked(dns_name: str) -> None:
    assert render([claim("a", dns_name)], NS, DOMAIN).granted == {"a": dns_name}


def test_duplicate_claim_goes_to_the_older_external_service() -> None:
    older = claim("zz-first", "google.com", "2026-01-01T00:00:00Z")
    newer = claim("aa-second", "google.com", "2026-02-01T00:00:00Z")
    out = render([newer, older], NS, DOMAIN)
    assert out.granted == {"zz-first": "google.com"}
    reason, message = out.refused["aa-second"]
    assert reason == REASON_DUPLICATE and "zz-first" in message


def test_same_age_tie_is_broken_by_name() -> None:
    out = render([claim("b", "google.com"), claim("a", "google.com")], NS, DOMAIN)
    assert out.granted == {"a": "google.com"}


def test_rules_are_sharded_into_keys_before_a_key_gets_too_big() -> None:
    claims = [claim(f"gw{i:05d}", f"host{i:05d}.example.com") for i in range(3000)]
    out = render(claims, NS, DOMAIN)
    assert len(out.rules) == 3000
    assert len(out.data) > 1
    assert all(k.startswith(KEY_PREFIX) and len(v) <= MAX_KEY_BYTES for k, v in out.data.items())
    lines = [line for v in out.data.values() for line in v.splitlines() if not line.startswith("#")]
    assert lines == sorted(lines) and len(lines) == 3000


def test_capacity_is_enforced_with_a_reason() -> None:
    claims = [
        claim(f"gw{i:05d}", f"a-rather-long-hostname-number-{i:05d}.example.com")
        for i in range(12000)
    ]
    out = render(claims, NS, DOMAIN)
    assert sum(len(v.encode()) for v in out.data.values()) < 1024 * 1024
    assert out.refused and {r for r, _ in out.refused.values()} == {"DnsCapacityExceeded"}


def test_capacity_goes_to_the_oldest_claims_not_to_the_first_names() -> None:
    """Names late in the alphabet but early in time keep their rules when the ConfigMap fills."""
    claims = [
        claim(
            f"gw{i:05d}",
            f"{'z' if i % 2 else 'a'}-long-hostname-number-{i:05d}.example.com",
            f"2026-01-01T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z",
        )
        for i in range(12000)
    ]
    out = render(claims, NS, DOMAIN)
    kept = {int(name[2:]) for name in out.granted}
    refused = {int(name[2:]) for name in out.refused}
    assert kept and refused and max(kept) < min(refused)
    lines = [line for v in out.data.values() for line in v.splitlines() if not line.startswith("#")]
    assert lines == sorted(lines)


def test_names_compare_without_case_or_the_root_dot() -> None:
    older = claim("first", "Google.COM.", "2026-01-01T00:00:00Z")
    newer = claim("second", "google.com", "2026-02-01T00:00:00Z")
    out = render([newer, older], NS, DOMAIN)
    assert out.granted == {"first": "google.com"}
    assert out.refused["second"][0] == REASON_DUPLICATE
    assert [r.dns_name for r in out.rules] == ["google.com"]


@pytest.mark.parametrize(
    "text",
    [
        HEADER + "forward . 8.8.8.8\n",
        HEADER
        + "rewrite stop name exact kubernetes.default.svc.cluster.local x.egress-operator-system.svc.cluster.local\n",
        HEADER + "rewrite stop name exact google.com google.other-namespace.svc.cluster.local\n",
        HEADER + "rewrite stop name exact a.com a.egress-operator-system.svc.cluster.local\n" * 2,
        HEADER + "rewrite stop name regex .* x.egress-operator-system.svc.cluster.local\n",
    ],
    ids=["other-plugin", "hijacks-cluster-name", "wrong-namespace", "duplicate", "regex"],
)
def test_validation_refuses_anything_but_our_rules(text: str) -> None:
    with pytest.raises(InvalidSnippet):
        validate({f"{KEY_PREFIX}000.override": text}, NS, DOMAIN)


def test_the_settle_marker_is_its_own_imported_key_for_a_name_nobody_can_ask() -> None:
    data = render([claim("github", "github.com")], NS, DOMAIN).data
    assert SETTLE_KEY not in data, "a rules write never carries the marker"
    marked = settled(data)
    assert set(marked) == set(data) | {SETTLE_KEY}
    assert rules_only(marked) == data and rules_only(data) == data
    assert SETTLE_KEY.startswith(KEY_PREFIX) and SETTLE_KEY.endswith(".override"), "imported"
    assert SETTLE_NAME.endswith(".invalid"), "RFC 6761: never resolves anywhere"
    rules = [line for line in SETTLE_TEXT.splitlines() if not line.startswith("#")]
    assert rules == [f"rewrite stop name exact {SETTLE_NAME} {SETTLE_NAME}"]
