"""Local drift detection: when is a live object already what we would apply?"""

from __future__ import annotations

import copy
from typing import Any

from core import constants as c
from reconcile.drift import applied_hash, diff, with_applied_hash


def desired() -> dict[str, Any]:
    return with_applied_hash(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "g",
                "namespace": "ns",
                "labels": {"app": "egress-gateway"},
                "annotations": {},
            },
            "spec": {
                "selector": {"matchLabels": {"a": "b"}},
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "gateway",
                                "image": "e:1",
                                "resources": {"limits": {"cpu": "2", "memory": "1Gi"}},
                            }
                        ],
                        "nodeSelector": {},
                    }
                },
            },
        }
    )


def live_from(obj: dict[str, Any]) -> dict[str, Any]:
    """What the API server returns: our fields plus defaults and other managers' fields."""
    live = copy.deepcopy(obj)
    live["metadata"]["resourceVersion"] = "42"
    live["metadata"]["labels"]["added-by-someone"] = "x"
    live["spec"]["replicas"] = 3
    container = live["spec"]["template"]["spec"]["containers"][0]
    container["imagePullPolicy"] = "IfNotPresent"
    container["resources"]["limits"]["cpu"] = "2000m"
    del live["spec"]["template"]["spec"]["nodeSelector"]
    live["status"] = {"readyReplicas": 1}
    return live


def test_defaults_and_foreign_fields_are_in_sync() -> None:
    assert diff(desired(), live_from(desired())) == []


def test_missing_object() -> None:
    assert [d.path for d in diff(desired(), None)] == [""]


def test_changed_scalar_is_reported_with_both_values() -> None:
    live = live_from(desired())
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"
    (d,) = diff(desired(), live)
    assert (d.path, d.desired, d.live) == (
        "spec.template.spec.containers[0].image",
        "e:1",
        "evil:1",
    )


def test_quantities_compare_by_value_not_text() -> None:
    live = live_from(desired())
    live["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "1025Mi"
    (d,) = diff(desired(), live)
    assert d.path.endswith("resources.limits.memory")


def test_list_length_change_is_drift() -> None:
    live = live_from(desired())
    live["spec"]["template"]["spec"]["containers"].append({"name": "sidecar"})
    assert [d.path for d in diff(desired(), live)] == ["spec.template.spec.containers"]


def test_type_change_is_drift() -> None:
    live = live_from(desired())
    live["spec"]["selector"]["matchLabels"]["a"] = 1
    assert [d.path for d in diff(desired(), live)] == ["spec.selector.matchLabels.a"]


def test_a_removed_field_shows_through_the_applied_hash() -> None:
    old = desired()
    new_obj = copy.deepcopy(old)
    del new_obj["metadata"]["annotations"][c.ANNOTATION_APPLIED_HASH]
    new_obj["spec"]["template"]["spec"].pop("nodeSelector")
    new = with_applied_hash(new_obj)
    paths = [d.path for d in diff(new, live_from(old))]
    assert paths == [f"metadata.annotations.{c.ANNOTATION_APPLIED_HASH}"]


def test_applied_hash_ignores_itself_and_is_stable() -> None:
    obj = desired()
    assert applied_hash(obj) == applied_hash(with_applied_hash(obj))
    assert with_applied_hash(obj) == with_applied_hash(with_applied_hash(obj))
