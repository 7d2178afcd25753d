"""The pure parts of field-manager fights and of the migration from the original operator:
when a writer "keeps rewriting", how a 409 names it, how the original's locks, Corefile line and
settings are read, and which Service ports an adoption renames."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from core import constants as c
from core.errors import PermanentError
from core.kube import field_conflicts
from core.settings import Settings
from reconcile.controller import Reconciler
from reconcile.fights import TakeBack, condition_message, encode, fights, memory
from reconcile.migration import (
    CrdState,
    is_original_lock,
    lock_from_record,
    map_settings,
    plugin_directive,
    port_renames,
)
from reconcile.status import status_equal

NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def live_with(manager: str, time: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "g",
            "namespace": "ns",
            "managedFields": [
                {"manager": c.FIELD_MANAGER, "operation": "Apply", "time": "2026-01-01T11:00:00Z"},
                {"manager": manager, "operation": "Update", "time": time},
            ],
        }
    }


CONFLICTS = {"manager": ['.spec.template.spec.containers[name="gateway"].image']}


def test_a_first_conflict_is_no_fight() -> None:
    assert fights("Deployment", live_with("manager", "2026-01-01T12:00:05Z"), CONFLICTS, None) == []


def test_the_same_manager_writing_again_after_our_take_back_is_a_fight() -> None:
    taken = TakeBack(("manager",), "2026-01-01T12:00:00Z")
    [fight] = fights("Deployment", live_with("manager", "2026-01-01T12:00:00Z"), CONFLICTS, taken)
    assert (fight.kind, fight.name, fight.namespace, fight.manager) == (
        "Deployment",
        "g",
        "ns",
        "manager",
    )
    assert fight.fields == tuple(CONFLICTS["manager"])
    assert "keeps rewriting Deployment ns/g" in fight.describe()
    assert "egressctl reconcile g --force-conflicts" in condition_message("g", [fight])


@pytest.mark.parametrize(
    ("remembered", "wrote"),
    [
        (("kubectl-edit",), "2026-01-01T12:00:05Z"),  # someone else was taken back
        (("manager",), "2026-01-01T11:59:59Z"),  # it wrote before our take-back
        (("manager",), "2026-01-01T13:00:01Z"),  # an hour later: repaired once more
        (("manager",), "garbage"),
    ],
)
def test_not_a_fight(remembered: tuple[str, ...], wrote: str) -> None:
    taken = TakeBack(remembered, "2026-01-01T12:00:00Z")
    assert fights("Deployment", live_with("manager", wrote), CONFLICTS, taken) == []


def test_memory_round_trips_and_survives_garbage() -> None:
    entries = {"Service": TakeBack(("a", "b"), "2026-01-01T12:00:00Z")}
    es = {"metadata": {"annotations": {c.ANNOTATION_TAKEN_BACK: encode(entries)}}}
    assert memory(es) == entries
    for raw in ("not json", "[]", '{"Deployment": 3}', '{"Deployment": {"managers": "x"}}'):
        assert memory({"metadata": {"annotations": {c.ANNOTATION_TAKEN_BACK: raw}}}) == {}
    assert memory({"metadata": {}}) == {}


def test_a_409_names_each_manager_and_field() -> None:
    body = {
        "kind": "Status",
        "code": 409,
        "reason": "Conflict",
        "details": {
            "causes": [
                {
                    "reason": "FieldManagerConflict",
                    "message": 'conflict with "manager" using apps/v1',
                    "field": '.spec.template.spec.containers[name="gateway"].image',
                },
                {
                    "reason": "FieldManagerConflict",
                    "message": 'conflict with "argocd-controller" with subresource "x" using v1',
                    "field": ".metadata.labels.app",
                },
                {"reason": "FieldValueInvalid", "message": "nope", "field": ".x"},
            ]
        },
    }
    exc = ApiException(status=409, reason="Conflict")
    exc.body = json.dumps(body).encode()
    wrapped = PermanentError("409", 409)
    wrapped.__cause__ = exc
    assert field_conflicts(wrapped) == {
        "manager": ['.spec.template.spec.containers[name="gateway"].image'],
        "argocd-controller": [".metadata.labels.app"],
    }
    other = ApiException(status=409, reason="Conflict")
    other.body = b"the object has been modified"
    assert field_conflicts(other) == {}


def test_a_condition_to_drop_is_a_status_change() -> None:
    cond = {"type": "Ready", "status": "True", "reason": "R", "message": "m"}
    conflict = {"type": "Conflict", "status": "True", "reason": "FieldManagerConflict"}
    assert status_equal({"conditions": [cond]}, {"conditions": [cond]})
    assert not status_equal({"conditions": [cond, conflict]}, {"conditions": [cond]})
    assert not status_equal({"conditions": [cond]}, {"conditions": [cond, conflict]})


class NoStatusKube:
    """A cluster whose ExternalService CRD serves no /status (the original's)."""

    def merge_patch(self, *args: Any, **kwargs: Any) -> Any:
        raise PermanentError("404 Not Found: the server could not find the requested resource", 404)

    def get(self, *args: Any) -> dict[str, Any]:
        return {"metadata": {"name": "google"}}


def test_a_status_404_under_the_original_crd_says_what_to_install() -> None:
    reconciler = Reconciler(NoStatusKube(), Settings())  # type: ignore[arg-type]
    es = {"metadata": {"name": "google", "generation": 1}}
    with pytest.raises(PermanentError, match="no status subresource") as err:
        reconciler._write_status(es, {"observedGeneration": 1})
    assert "egressctl migrate" in str(err.value) and err.value.status == 404


def test_leader_locks() -> None:
    fresh = lock_from_record(
        "Lease",
        "x",
        {"holderIdentity": "h", "leaseDurationSeconds": 30, "renewTime": "2026-01-01T11:59:50.5Z"},
        NOW,
    )
    assert fresh.fresh and fresh.remaining_s == pytest.approx(20.5)
    stale = lock_from_record(
        "ConfigMap",
        "x",
        {"holderIdentity": "h", "leaseDurationSeconds": 30, "renewTime": "2026-01-01T11:59:00Z"},
        NOW,
    )
    assert not stale.fresh
    released = lock_from_record("Lease", "x", {"holderIdentity": ""}, NOW)
    assert not released.fresh
    unknown = lock_from_record("Lease", "x", {"holderIdentity": "h"}, NOW)
    assert unknown.fresh, "a held lock without times counts as held"
    deployments = ["egress-operator-controller-manager"]
    names = ("controller-leader-election-helper",)
    assert is_original_lock("controller-leader-election-helper", "", deployments, names)
    assert is_original_lock(
        "abc.egress.monzo.com",
        "egress-operator-controller-manager-6d4f-x2_1a2b",
        deployments,
        names,
    )
    assert not is_original_lock("kube-scheduler", "node-1_abc", deployments, names)


def test_the_original_corefile_line() -> None:
    corefile = (
        ".:53 {\n    errors\n    egressoperator egress-operator-system cluster.local\n"
        "    kubernetes cluster.local\n    forward . /etc/resolv.conf\n}\n"
    )
    assert plugin_directive(corefile) == "egressoperator egress-operator-system cluster.local"
    assert plugin_directive(corefile.replace("    egressoperator", "    # egressoperator")) == ""
    assert plugin_directive('.:53 {\n    log "egressoperator"\n}\n') == ""


def test_the_original_settings_map_onto_ours() -> None:
    env = {
        "ENVOY_IMAGE": "envoyproxy/envoy-alpine:v1.16.5",
        "NODE_SELECTOR_KEY": "role",
        "NODE_SELECTOR_VALUE": "egress-pods",
        "ENABLE_POD_TOPOLOGY_SPREAD": "true",
        "POD_TOPOLOGY_ZONE_MAX_SKEW": "1",
        "SOMETHING_ELSE": "x",
    }
    args = ["--enable-leader-election", "--enable-pod-disruption-budgets", "--weird"]
    mapped, problems = map_settings(env, args)
    by = {m.original: m for m in mapped}
    assert by["ENVOY_IMAGE"].our_value == "(unset)" and "uid 101" in by["ENVOY_IMAGE"].note
    assert (by["NODE_SELECTOR_KEY"].ours, by["NODE_SELECTOR_KEY"].our_value) == (
        "NODE_SELECTOR_KEY",
        "role",
    )
    assert (
        by["--enable-pod-disruption-budgets"].ours,
        by["--enable-pod-disruption-budgets"].our_value,
    ) == (
        "ENABLE_PDB",
        "true",
    )
    assert by["--enable-leader-election"].ours == "-"
    assert by["--weird"].ours == "?" and by["SOMETHING_ELSE"].ours == "?"
    assert problems == []
    _, problems = map_settings({"ENABLE_POD_TOPOLOGY_SPREAD": "true"}, [])
    assert problems and "ENABLE_POD_TOPOLOGY_SPREAD" in problems[0]


def test_port_renames() -> None:
    live = {"spec": {"ports": [{"port": 443, "protocol": "TCP", "targetPort": 443}]}}
    desired = {"spec": {"ports": [{"name": "g-tcp-443", "port": 443, "protocol": "TCP"}]}}
    assert port_renames(live, desired) == {"": "g-tcp-443"}
    assert port_renames(desired, desired) == {}
    assert port_renames(None, desired) == {}


def test_crd_flavours() -> None:
    assert CrdState("x", False, False, ["(missing)"]).flavour == "missing"
    assert CrdState("x", True, True, []).flavour == "ours"
    assert CrdState("x", True, False, ["spec.versions"]).flavour == "original"
    assert CrdState("x", True, True, ["spec.versions"]).flavour == "outdated"
    assert "404" in CrdState("x", True, False, ["a"], controller_gen="v0.4.0").describe()
