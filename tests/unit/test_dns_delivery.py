"""DNS delivery without a cluster: CLUSTER_DNS=none sends nothing and refuses every claim."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable
from typing import Any, NoReturn

import pytest

from core import constants as c
from core.errors import PermanentError
from core.kube import SERVICE, Resource
from core.settings import Settings
from dns.delivery import REASON_UNAVAILABLE, SETTLE_AFTER_S, DnsDelivery
from dns.render import SETTLE_KEY, Claim, render, rules_only, shard_of


class NoKube:
    """A client that fails the test on any request: with CLUSTER_DNS=none nothing is sent."""

    def __getattr__(self, name: str) -> NoReturn:
        raise AssertionError(f"CLUSTER_DNS=none sent a request: Kube.{name}")


NONE = Settings(cluster_dns="none")


def test_cluster_dns_none_sends_no_request_and_says_why_for_every_claim() -> None:
    kube: Any = NoKube()
    delivery = DnsDelivery(NONE)
    report = delivery.sync(kube)
    assert not report.written and not report.settled and report.nudged == []
    reason, message = report.refusal("google") or ("", "")
    assert reason == REASON_UNAVAILABLE
    assert "not available in this cluster" in message and "CLUSTER_DNS=none" in message
    assert "google.egress-operator-system.svc.cluster.local" in message
    assert report.to_dict()["corefile"] == "not used" and report.to_dict()["unavailable"]
    assert delivery.ensure_corefile(kube) == ("", "", "")
    assert delivery.nudge(kube, "123") == ([], "")
    rendered = render(
        [Claim("2024-01-01T00:00:00Z", "google", "google.com")], "ns", "cluster.local"
    )
    verdicts = delivery.verdicts(kube, rendered)
    assert (verdicts.refusal("google") or ("",))[0] == REASON_UNAVAILABLE


def test_with_coredns_a_granted_claim_has_no_refusal() -> None:
    rendered = render(
        [Claim("2024-01-01T00:00:00Z", "google", "google.com")], "ns", "cluster.local"
    )

    class Unwired:
        """Reading the Corefile finds no ConfigMap: reported, not raised."""

        def get(self, *args: Any) -> None:
            return None

    verdicts = DnsDelivery(Settings()).verdicts(Unwired(), rendered)  # type: ignore[arg-type]
    assert verdicts.refusal("google") is not None  # CoreDNSNotWired: no Corefile found
    assert verdicts.refusal("google") != (REASON_UNAVAILABLE, "")
    assert verdicts.unavailable_in == ""


# -- several ConfigMaps, against an in-memory API server ----------------------------------------

SHARDED = Settings(dns_configmap_shards=4, nudge_coredns_pods=False)
SMALL = 2000  # bytes per ConfigMap: about twenty rules, so forty names need several


class FakeApi:
    """ConfigMaps with resourceVersion preconditions, and the gateway Services' list. Every write
    is recorded with the state after it; ``before_write`` runs just before each one (a way to
    interleave another writer deterministically)."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}  # path -> object
        self.services: list[dict[str, Any]] = []
        self.version = 100
        self.writes: list[tuple[str, str]] = []
        self.snapshots: list[dict[str, dict[str, str]]] = []  # ConfigMap name -> data, per write
        self.before_write: Callable[[str, str], None] | None = None
        self.conflicts = 0

    def add(self, name: str, dns_name: str) -> None:
        self.services.append(
            {
                "metadata": {
                    "name": name,
                    "creationTimestamp": "2026-01-01T00:00:00Z",
                    "labels": {c.LABEL_HIJACK_DNS: "true", c.LABEL_GATEWAY: name},
                    "annotations": {c.ANNOTATION_DNS_NAME: dns_name},
                }
            }
        )

    def remove(self, name: str) -> None:
        self.services = [s for s in self.services if s["metadata"]["name"] != name]

    def get(self, resource: Resource, name: str, namespace: str | None = None) -> Any:
        obj = self.objects.get(resource.path(namespace, name))
        return copy.deepcopy(obj)

    def list_all(self, resource: Resource, namespace: str | None = None, **_: Any) -> Any:
        assert resource is SERVICE
        return copy.deepcopy(self.services), str(self.version)

    def create(self, resource: Resource, body: Any, **_: Any) -> Any:
        return self._write("POST", resource.path(body["metadata"]["namespace"]), body)

    def replace(self, resource: Resource, body: Any, **_: Any) -> Any:
        meta = body["metadata"]
        return self._write("PUT", resource.path(meta["namespace"], meta["name"]), body)

    def _write(self, method: str, path: str, body: Any) -> Any:
        """Kube.create and Kube.replace: None on 409."""
        if self.before_write is not None:
            hook, self.before_write = self.before_write, None
            hook(method, path)
        if method == "POST":
            path = f"{path}/{body['metadata']['name']}"
            if path in self.objects:
                self.conflicts += 1
                return None
        else:
            live = self.objects.get(path)
            if live is None:
                raise PermanentError("not found", 404)
            if body["metadata"].get("resourceVersion") != live["metadata"]["resourceVersion"]:
                self.conflicts += 1
                return None
        self.version += 1
        obj = copy.deepcopy(body)
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.objects[path] = obj
        self.writes.append((method, path.rsplit("/", 1)[1]))
        self.snapshots.append(self.configmaps())
        return copy.deepcopy(obj)

    def configmaps(self) -> dict[str, dict[str, str]]:
        return {
            path.rsplit("/", 1)[1]: dict(obj.get("data") or {})
            for path, obj in self.objects.items()
            if "/configmaps/" in path
        }

    def rules(self, snapshot: dict[str, dict[str, str]] | None = None) -> list[str]:
        """Every rule line in every ConfigMap (duplicates kept)."""
        found = snapshot if snapshot is not None else self.configmaps()
        return sorted(
            line
            for data in found.values()
            for text in rules_only(data).values()
            for line in text.splitlines()
            if line and not line.startswith("#")
        )


def _names(api: FakeApi) -> set[str]:
    return {rule.split()[4] for rule in api.rules()}


def _delivery(settings: Settings = SHARDED, **kw: Any) -> DnsDelivery:
    return DnsDelivery(settings, max_configmap_bytes=SMALL, **kw)


def test_rules_beyond_one_configmap_are_spread_by_name_and_the_first_holds_none() -> None:
    api: Any = FakeApi()
    for i in range(40):
        api.add(f"gw{i:02d}", f"name-{i:02d}.example.com")
    report = _delivery().sync(api)
    assert report.written and report.rendered.refused == {}
    found = api.configmaps()
    base = SHARDED.dns_configmap_name
    assert rules_only(found[base]) == {}, "the first ConfigMap only commits"
    assert set(found) <= set(SHARDED.dns_configmap_names) and len(found) == 4
    assert len(api.rules()) == 40 and _names(api) == {
        f"name-{i:02d}.example.com" for i in range(40)
    }
    for i in range(40):
        dns_name = f"name-{i:02d}.example.com"
        (holder,) = [n for n, data in found.items() if dns_name in "".join(data.values())]
        assert holder == f"{base}-{shard_of(dns_name, 4)}"
    keys = [k for data in found.values() for k in data]
    assert len(keys) == len(set(keys)), "distinct files in the one projected directory"
    assert api.writes[-1] == ("POST", base), "the first ConfigMap commits last"
    # In sync: no write; one more name rewrites its own ConfigMap and commits the first one.
    writes = len(api.writes)
    assert not _delivery().sync(api).written and len(api.writes) == writes
    api.add("gw-new", "new.example.com")
    assert _delivery().sync(api).written
    target = f"{base}-{shard_of('new.example.com', 4)}"
    assert [name for _, name in api.writes[writes:]] == [target, base]


def test_a_few_rules_stay_in_the_first_configmap_alone() -> None:
    api: Any = FakeApi()
    api.add("github", "github.com")
    _delivery().sync(api)
    assert list(api.configmaps()) == [SHARDED.dns_configmap_name]
    assert api.writes == [("POST", SHARDED.dns_configmap_name)]


@pytest.mark.parametrize("grow", [True, False])
def test_no_rule_is_ever_absent_from_every_configmap_while_they_move(grow: bool) -> None:
    """Crossing the first ConfigMap's budget moves every rule between it and the others, both
    ways: after each single write, every rule of the old and the new state is somewhere."""
    api: Any = FakeApi()
    small, large = 6, 40
    for i in range(small if grow else large):
        api.add(f"gw{i:02d}", f"name-{i:02d}.example.com")
    _delivery().sync(api)
    kept = {f"name-{i:02d}.example.com" for i in range(small)}
    if grow:
        for i in range(small, large):
            api.add(f"gw{i:02d}", f"name-{i:02d}.example.com")
    else:
        for i in range(small, large):
            api.remove(f"gw{i:02d}")
    start = len(api.snapshots)
    _delivery().sync(api)
    assert len(api.snapshots) - start >= 2, "several ConfigMaps written"
    for snapshot in api.snapshots[start:]:
        present = {rule.split()[4] for rule in api.rules(snapshot)}
        assert kept <= present, sorted(kept - present)
    assert len(api.rules()) == (large if grow else small), "and no duplicate at the end"


def test_a_concurrent_writer_between_read_and_write_is_never_lost() -> None:
    """A second sync (a new name) lands while the first is about to write: the first one's
    write fails its precondition, and it starts over from fresh state with both names."""
    api: Any = FakeApi()
    for i in range(40):
        api.add(f"gw{i:02d}", f"name-{i:02d}.example.com")
    _delivery().sync(api)

    def other_writer(method: str, path: str) -> None:
        api.add("late", "late.example.com")
        assert _delivery().sync(api).written

    api.add("early", "early.example.com")
    api.before_write = other_writer
    writes = len(api.writes)
    _delivery().sync(api)
    # The other writer's sync wrote both names; ours, refused, found them there on its retry.
    assert len(api.writes) > writes and api.conflicts == 1
    assert {"early.example.com", "late.example.com"} <= _names(api)
    assert len(api.rules()) == 42, "each rule exactly once"


def test_the_settle_marker_goes_to_the_first_configmap_once_every_one_is_quiet() -> None:
    api: Any = FakeApi()
    for i in range(40):
        api.add(f"gw{i:02d}", f"name-{i:02d}.example.com")
    now = [dt.datetime(2026, 1, 1, tzinfo=dt.UTC)]
    delivery = _delivery(clock=lambda: now[0])
    delivery.sync(api)
    assert not delivery.sync(api).settled, "not quiet yet"
    now[0] += dt.timedelta(seconds=SETTLE_AFTER_S + 1)
    assert delivery.sync(api).settled
    found = api.configmaps()
    assert [n for n, data in found.items() if SETTLE_KEY in data] == [SHARDED.dns_configmap_name]
    api.add("gw-new", "new.example.com")  # the next rules write drops the marker
    delivery.sync(api)
    assert SETTLE_KEY not in api.configmaps()[SHARDED.dns_configmap_name]


def test_capacity_is_per_configmap_and_goes_to_the_oldest() -> None:
    claims = [
        Claim(f"2026-01-01T00:00:{i:02d}Z", f"gw{i:02d}", f"name-{i:02d}.example.com")
        for i in range(60)
    ]
    out = render(claims, "ns", "cluster.local", shards=2, max_configmap_bytes=SMALL)
    assert out.refused and {r for r, _ in out.refused.values()} == {"DnsCapacityExceeded"}
    kept = sorted(int(n[2:]) for n in out.granted)
    assert kept == list(range(len(kept))), "all in one shard beyond the first: oldest first"
    assert all(sum(len(t) for t in data.values()) <= SMALL for data in out.shards)


def test_coredns_and_rbac_name_every_configmap_the_rules_may_spread_over() -> None:
    """infra/coredns mounts, and infra/rbac grants, exactly the default settings' ConfigMaps."""
    from pathlib import Path

    import yaml

    infra = Path(__file__).resolve().parents[2] / "infra"
    names = list(Settings().dns_configmap_names)
    patch = yaml.safe_load((infra / "coredns" / "deployment-patch.yaml").read_text())
    (volume,) = patch["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"] is None, "replaces the single configMap volume of old"
    assert volume["projected"]["sources"] == [
        {"configMap": {"name": name, "optional": True}} for name in names
    ]
    docs = list(yaml.safe_load_all((infra / "rbac" / "reconciler.yaml").read_text()))
    (role,) = [
        d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == "kube-system"
    ]
    by_verb = {
        tuple(r["verbs"]): r.get("resourceNames")
        for r in role["rules"]
        if "configmaps" in r["resources"]
    }
    assert sorted(by_verb[("get",)]) == sorted([*names, "coredns"])
    assert by_verb[("update",)] == names
