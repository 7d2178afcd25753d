"""Adding our import line to a cluster's Corefile: once, in the right block, nothing else touched."""

from __future__ import annotations

import pytest

from dns.corefile import check, ensure_import

IMPORT = "import /etc/coredns/egress-gateways/*.override"

KUBEADM = """\
.:53 {
    errors
    health {
       lameduck 5s
    }
    ready
    kubernetes cluster.local in-addr.arpa ip6.arpa {
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }
    prometheus :9153
    forward . /etc/resolv.conf {
       max_concurrent 1000
    }
    cache 30
    loop
    reload
    loadbalance
}
"""

WITH_COMMENTS_NO_RELOAD = """\
# Our cluster DNS. Keep this comment.
example.org:53 {
    forward . 10.0.0.1  # corporate resolver
}
.:53 {
    errors
    kubernetes cluster.local {   # cluster names
    }
    forward . /etc/resolv.conf
}
"""


def test_adds_the_import_line_once_before_the_block_closes() -> None:
    out = ensure_import(KUBEADM, IMPORT, "cluster.local")
    assert out.count(IMPORT) == 1
    assert out.replace(f"    {IMPORT}\n", "") == KUBEADM
    assert out.splitlines()[-2] == f"    {IMPORT}"
    assert ensure_import(out, IMPORT, "cluster.local") == out
    assert check(out, IMPORT, "cluster.local").ok


def test_adds_reload_when_missing_and_keeps_comments_and_other_blocks() -> None:
    out = ensure_import(WITH_COMMENTS_NO_RELOAD, IMPORT, "cluster.local")
    assert out.startswith(
        "# Our cluster DNS. Keep this comment.\nexample.org:53 {\n    forward . 10.0.0.1  # corporate resolver\n}"
    )
    tail = out.split(".:53 {", 1)[1]
    assert f"    {IMPORT}\n    reload 2s\n}}" in tail
    assert "reload" not in out.split(".:53 {", 1)[0]
    assert ensure_import(out, IMPORT, "cluster.local") == out


def test_check_reports_what_is_missing() -> None:
    state = check(WITH_COMMENTS_NO_RELOAD, IMPORT, "cluster.local")
    assert state.server_block_found and not state.has_import and not state.has_reload
    assert check(KUBEADM, IMPORT, "cluster.local").has_reload


def test_commented_out_import_does_not_count() -> None:
    text = KUBEADM.replace("    reload\n", f"    reload\n    # {IMPORT}\n")
    assert not check(text, IMPORT, "cluster.local").has_import


def test_no_block_for_the_cluster_domain_is_an_error_not_a_guess() -> None:
    with pytest.raises(ValueError, match=r"corp\.internal"):
        ensure_import(KUBEADM, IMPORT, "corp.internal")
