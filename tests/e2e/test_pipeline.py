"""End to end through the whole path: API server → exporter → Pub/Sub → functions → API server.

Nothing here calls the reconciler directly: every test changes the cluster (or the pipeline's
processes) and then polls the resulting state against a deadline.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core import constants as c
from core.kube import (
    CONFIGMAP,
    DEPLOYMENT,
    EXTERNAL_SERVICE,
    SERVICE,
    Kube,
    api_client_from_kubeconfig,
)
from core.kubehttp import KubeHttp
from core.notice import Notice
from egressctl.devstack.procs import spawn, stop, wait_for
from egressctl.devstack.stack import Layout, load_state, pubsub_emulator_command, save_state
from egressctl.pipeline import EVENT_FUNCTION, REPAIR_FUNCTION, LocalPipeline
from exporter.publisher import PubSubPublisher
from exporter.settings import ExporterSettings
from exporter.watch import Exporter
from tests.conftest import REPO, DevStack
from tests.e2e.conftest import DELETE_GRACE_S
from tests.e2e.helpers import HoldProxy, fingerprint, log_entries, log_size
from tests.integration.helpers import (
    GATEWAY_NS,
    children,
    create_es,
    eventually,
    external_service,
    purge,
    set_pods_ready,
    update_spec,
)

pytestmark = pytest.mark.cluster
CONVERGE_S = 30.0


@pytest.fixture(scope="module")
def admin(dev_stack: DevStack) -> Kube:
    return Kube(api_client_from_kubeconfig(dev_stack.kubeconfig))


@pytest.fixture
def es_name(admin: Kube, unique: str) -> Iterator[str]:
    name = f"e2e-{unique}"
    yield name
    purge(admin, name)


def converged(admin: Kube, name: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        es = admin.get(EXTERNAL_SERVICE, name)
        if not es:
            return None
        status = es.get("status") or {}
        if status.get("observedGeneration") != es["metadata"]["generation"]:
            return None
        kids = children(admin, name)
        if not {"ConfigMap", "Service", "Deployment", "HorizontalPodAutoscaler"} <= set(kids):
            return None
        return es

    return check


def gone(admin: Kube, name: str) -> Callable[[], bool]:
    return lambda: admin.get(EXTERNAL_SERVICE, name) is None and not children(admin, name)


@contextlib.contextmanager
def events_paused(pipeline: LocalPipeline) -> Iterator[None]:
    """Stop the event function, so that late notices cannot repair drift a test sets up for
    the sweep or the repair function to find; notices are redelivered once it is back."""
    pipeline.kill_function(EVENT_FUNCTION)
    try:
        yield
    finally:
        pipeline.start_function(EVENT_FUNCTION)


def notice(name: str, change: str = "spec", rv: str = "1", age_s: float = 0.0) -> Notice:
    when = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)
    return Notice(name, c.KIND, change, "MODIFIED", rv, when)


def test_create_update_delete_converge_with_no_manual_call(
    pipeline: LocalPipeline, admin: Kube, es_name: str
) -> None:
    create_es(admin, external_service(es_name))
    es = eventually(converged(admin, es_name), CONVERGE_S, f"{es_name} to converge after create")
    assert es["status"]["hijackState"] == "false"
    assert c.FINALIZER in es["metadata"]["finalizers"]

    update_spec(admin, es_name, {"ports": [{"port": 443}, {"port": 8443}]})

    def two_ports() -> bool:
        svc = admin.get(SERVICE, es_name, GATEWAY_NS) or {}
        return len((svc.get("spec") or {}).get("ports") or []) == 2

    eventually(two_ports, CONVERGE_S, "the Service to get the new port")
    eventually(converged(admin, es_name), CONVERGE_S, "status to follow the update")

    # Readiness is a Deployment change: the exporter's notice moves the hijack state. The
    # real pods are held unready first (Envoy fails its probe on purpose), then let go.
    set_pods_ready(admin, es_name, False)
    update_spec(admin, es_name, {"hijackDns": True})
    eventually(
        lambda: (
            (admin.get(EXTERNAL_SERVICE, es_name) or {}).get("status", {}).get("hijackState")
            == "waiting-for-pods"
        ),
        CONVERGE_S,
        "hijack state waiting-for-pods",
    )
    set_pods_ready(admin, es_name, True)
    eventually(
        lambda: (
            (admin.get(EXTERNAL_SERVICE, es_name) or {}).get("status", {}).get("hijackState")
            == "true"
        ),
        CONVERGE_S,
        "hijack state true once a pod is ready (no manual call)",
    )

    t0 = time.monotonic()
    admin.delete(EXTERNAL_SERVICE, es_name)
    eventually(gone(admin, es_name), CONVERGE_S, "the gateway and the ExternalService to go")
    assert time.monotonic() - t0 >= DELETE_GRACE_S * 0.9, "deleted before the DNS grace period"


def test_duplicated_and_reordered_deliveries_are_harmless(
    pipeline: LocalPipeline, admin: Kube, unique: str, cleanup: Callable[..., None]
) -> None:
    keep, dropped = f"e2e-keep-{unique}", f"e2e-drop-{unique}"
    for name in (keep, dropped):
        cleanup(lambda name=name: purge(admin, name))
        create_es(admin, external_service(name))
    for name in (keep, dropped):
        eventually(converged(admin, name), CONVERGE_S, f"{name} to converge")
    admin.delete(EXTERNAL_SERVICE, dropped)
    eventually(gone(admin, dropped), CONVERGE_S, f"{dropped} to be deleted")
    before = fingerprint(children(admin, keep))
    log = pipeline.log_path(EVENT_FUNCTION)
    since = log_size(log)

    # Out of order and duplicated: "deleted" for the live one, "created"/"spec" for the deleted
    # one, each several times, on different ordering keys and on none.
    for _ in range(3):
        pipeline.publish("egress-events", notice(keep, "deleted", rv="1").encode(), keep, name=keep)
        pipeline.publish("egress-events", notice(dropped, "created").encode(), name=dropped)
        pipeline.publish("egress-events", notice(keep, "spec", rv="2").encode(), name=keep)
        pipeline.publish("egress-events", notice(dropped, "spec").encode(), dropped, name=dropped)

    def handled() -> bool:
        outcomes = [
            e.get("outcome")
            for e in log_entries(log, since)
            if e.get("externalService") in (keep, dropped)
            and (e.get("notice") or {}).get("resourceVersion") in ("1", "2")
        ]
        return len(outcomes) >= 12

    eventually(handled, CONVERGE_S, "all 12 injected notices to be handled")
    after = fingerprint(children(admin, keep))
    assert after == before, "duplicates or stale notices rewrote a converged gateway"
    assert admin.get(EXTERNAL_SERVICE, dropped) is None
    assert children(admin, dropped) == {}, "a stale notice resurrected a deleted gateway"


def test_function_killed_mid_reconcile_converges_on_redelivery(
    pipeline: LocalPipeline, admin: Kube, dev_stack: DevStack, es_name: str, tmp_path: Path
) -> None:
    # The Deployment's apply is held by a proxy: the function is mid-reconcile (ConfigMap,
    # NetworkPolicy and Service written) when it is killed.
    proxy = HoldProxy(dev_stack.identity_kubeconfig("egress-reconciler"), "PATCH", "/deployments/")
    proxy.start()
    try:
        kubeconfig = proxy.write_kubeconfig(tmp_path / "kubeconfig-held")
        pipeline.kill_function(EVENT_FUNCTION)
        pipeline.start_function(EVENT_FUNCTION, {"KUBECONFIG": kubeconfig})
        create_es(admin, external_service(es_name))
        assert proxy.held.wait(CONVERGE_S), "the function never reached the Deployment apply"
        assert admin.get(CONFIGMAP, es_name, GATEWAY_NS) is not None
        assert admin.get(DEPLOYMENT, es_name, GATEWAY_NS) is None
        pipeline.kill_function(EVENT_FUNCTION)
    finally:
        proxy.stop()
    pipeline.start_function(EVENT_FUNCTION)
    es = eventually(converged(admin, es_name), CONVERGE_S, "convergence after redelivery")
    assert es["status"]["observedGeneration"] == es["metadata"]["generation"]


def test_exporter_restarted_while_objects_change_misses_nothing(
    pipeline: LocalPipeline, admin: Kube, unique: str, cleanup: Callable[..., None]
) -> None:
    created, updated, deleted = (f"e2e-{k}-{unique}" for k in ("new", "upd", "del"))
    for name in (created, updated, deleted):
        cleanup(lambda name=name: purge(admin, name))
    for name in (updated, deleted):
        create_es(admin, external_service(name))
        eventually(converged(admin, name), CONVERGE_S, f"{name} to converge")

    pipeline.stop_process("exporter")
    create_es(admin, external_service(created))
    update_spec(admin, updated, {"ports": [{"port": 443}, {"port": 9443}]})
    admin.delete(EXTERNAL_SERVICE, deleted)
    pipeline.start_exporter()

    eventually(converged(admin, created), CONVERGE_S, "an ExternalService created while down")
    eventually(
        lambda: (
            len((admin.get(SERVICE, updated, GATEWAY_NS) or {}).get("spec", {}).get("ports", []))
            == 2
        ),
        CONVERGE_S,
        "an update made while down",
    )
    eventually(gone(admin, deleted), CONVERGE_S, "a delete made while down")


def test_exporter_relists_and_republishes_after_410(
    dev_stack: DevStack, admin: Kube, unique: str, cleanup: Callable[..., None]
) -> None:
    """A watch from a resourceVersion etcd no longer has gets 410: the exporter re-lists and
    publishes a notice for everything it re-listed (on its own topic here, pulled back)."""
    os.environ["PUBSUB_EMULATOR_HOST"] = dev_stack.pubsub_host
    from google.cloud import pubsub_v1

    project = dev_stack.pubsub_project
    topic, sub = f"t410-{unique}", f"t410-{unique}-pull"
    pub_admin, sub_admin = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    pub_admin.create_topic(name=pub_admin.topic_path(project, topic))
    sub_path = sub_admin.subscription_path(project, sub)
    sub_admin.create_subscription(name=sub_path, topic=pub_admin.topic_path(project, topic))
    cleanup(lambda: pub_admin.delete_topic(topic=pub_admin.topic_path(project, topic)))
    cleanup(lambda: sub_admin.delete_subscription(subscription=sub_path))

    name = f"e2e-410-{unique}"
    cleanup(lambda: purge(admin, name))
    create_es(admin, external_service(name))

    fatal: list[BaseException] = []
    settings = ExporterSettings(project=project, events_topic=topic, watch_timeout_s=5)
    publisher = PubSubPublisher(
        project, topic, timeout_s=10, on_fatal=lambda exc, n: fatal.append(exc)
    )
    exporter = Exporter(
        Kube(KubeHttp.from_kubeconfig(dev_stack.identity_kubeconfig("egress-exporter"))),
        publisher,
        settings,
    )
    thread = threading.Thread(
        target=exporter.watch_loop, args=("externalservices", "1"), daemon=True
    )
    thread.start()
    try:
        received: list[dict[str, Any]] = []

        def pulled(predicate: Callable[[dict[str, Any]], bool]) -> bool:
            response = sub_admin.pull(subscription=sub_path, max_messages=100, timeout=5)
            if response.received_messages:
                sub_admin.acknowledge(
                    subscription=sub_path,
                    ack_ids=[m.ack_id for m in response.received_messages],
                )
            for m in response.received_messages:
                body = json.loads(m.message.data)
                assert m.message.ordering_key == body["name"]
                assert m.message.attributes["name"] == body["name"]
                received.append(body)
            return any(predicate(b) for b in received)

        eventually(
            lambda: pulled(lambda b: b["name"] == name and b["type"] == "RELIST"),
            CONVERGE_S,
            "a RELIST notice after the 410",
        )
        assert exporter.watches["externalservices"].relists == 1
        # And watching resumed from the list: a change now is published as an event.
        update_spec(admin, name, {"ports": [{"port": 443}, {"port": 444}]})
        eventually(
            lambda: pulled(lambda b: b["name"] == name and b["change"] == "spec"),
            CONVERGE_S,
            "a spec notice after the re-list",
        )
        assert not fatal
    finally:
        exporter.stop()
        thread.join(timeout=10)
        publisher.stop()


def test_pubsub_emulator_restarted(
    pipeline: LocalPipeline, admin: Kube, dev_stack: DevStack, es_name: str
) -> None:
    layout = Layout(REPO)
    state = load_state(layout)
    assert state is not None
    rec = state.proc("pubsub")
    assert rec is not None
    stop(rec)
    port = state.ports["pubsub"]
    fresh = spawn("pubsub", pubsub_emulator_command(port), Path(rec.log))
    state.procs = [fresh if p.name == "pubsub" else p for p in state.procs]
    save_state(layout, state)
    assert wait_for(lambda: pipeline._http_up(f"http://127.0.0.1:{port}/"), 60)

    # The emulator forgot every topic: the supervisor re-creates them, the exporter (which
    # exits when it cannot publish) is restarted and re-lists. A change made now converges.
    create_es(admin, external_service(es_name))
    eventually(converged(admin, es_name), 60, "convergence after the emulator restarted")


def test_sweep_repairs_drift_and_reports_it(
    pipeline: LocalPipeline, admin: Kube, es_name: str
) -> None:
    create_es(admin, external_service(es_name))
    eventually(converged(admin, es_name), CONVERGE_S, f"{es_name} to converge")
    log = pipeline.log_path("on_sweep")
    since = log_size(log)
    with events_paused(pipeline):
        # A ConfigMap is not watched: only the scheduled sweep notices it is gone.
        admin.delete(CONFIGMAP, es_name, GATEWAY_NS)
        pipeline.trigger_sweep()
        eventually(
            lambda: admin.get(CONFIGMAP, es_name, GATEWAY_NS),
            CONVERGE_S,
            "the sweep to restore it",
        )
        eventually(
            lambda: any(
                e.get("externalService") == es_name
                and any(ch["kind"] == "ConfigMap" for ch in e.get("changes") or [])
                for e in log_entries(log, since)
            ),
            CONVERGE_S,
            "a drift line naming the ConfigMap",
        )


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_repair_function_dry_run_and_bad_bodies(
    pipeline: LocalPipeline, admin: Kube, es_name: str
) -> None:
    url = pipeline.url(REPAIR_FUNCTION)
    create_es(admin, external_service(es_name))
    eventually(converged(admin, es_name), CONVERGE_S, f"{es_name} to converge")
    with events_paused(pipeline):
        admin.delete(CONFIGMAP, es_name, GATEWAY_NS)
        status, body = _post(url, json.dumps({"name": es_name, "dryRun": True}).encode())
        assert status == 200, body
        assert body["dryRun"] is True
        assert [ch["kind"] for ch in body["result"]["changes"]] == ["ConfigMap"]
        assert admin.get(CONFIGMAP, es_name, GATEWAY_NS) is None, "dry run wrote"

        status, body = _post(url, json.dumps({"name": es_name}).encode())
        assert status == 200 and body["result"]["outcome"] == "converged", body
        assert admin.get(CONFIGMAP, es_name, GATEWAY_NS) is not None

    status, body = _post(url, b'{"dryRun": true}')
    assert status == 200 and "sweep" in body

    status, body = _post(url, json.dumps({"name": f"{es_name}-nope"}).encode())
    assert status == 404 and body["result"]["outcome"] == "not-found"

    for bad, reason in [
        (b"{not json", "not JSON"),
        (b"[1]", "JSON object"),
        (b'{"name": 5}', "name must be"),
        (b'{"name": "Bad_Name"}', "name must be"),
        (b'{"dryRun": "yes"}', "dryRun must be"),
        (b'{"nmae": "x"}', "unknown field"),
    ]:
        status, body = _post(url, bad)
        assert status == 400, (bad, body)
        assert reason in body["error"], (bad, body)
