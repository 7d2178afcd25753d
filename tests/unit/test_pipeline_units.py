"""Pure parts of the pipeline: the notice format, status-write filtering, settings, repair
bodies and the JSON log shape."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import logging

import pytest

from core import logs
from core.notice import BadNotice, Notice, decode_data, parse_notice
from exporter.settings import ExporterSettings, ExporterSettingsError
from exporter.watch import (
    SeenDeployment,
    SeenExternalService,
    deployment_change,
    external_service_change,
)
from functions.handlers import BadRequest, parse_repair_body
from functions.settings import PipelineSettings, PipelineSettingsError

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)


def test_notice_round_trip_and_attributes() -> None:
    notice = Notice("google", "ExternalService", "spec", "MODIFIED", "42", NOW)
    data = notice.encode()
    assert len(data) < 200
    assert parse_notice(data) == notice
    assert notice.attributes() == {"name": "google", "change": "spec", "type": "MODIFIED"}
    raw = base64.b64encode(data).decode()
    assert parse_notice(decode_data(raw, 4096)) == notice


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"{", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"v": 1}', "missing field"),
        (b'{"v": 1, "x": 1}', "unknown field"),
        (b'{"v": "1"}', "unsupported notice version"),
    ],
)
def test_bad_notices_say_why(data: bytes, reason: str) -> None:
    with pytest.raises(BadNotice, match=reason):
        parse_notice(data)


def test_decode_refuses_oversize_before_decoding_and_bad_base64() -> None:
    with pytest.raises(BadNotice, match="larger than"):
        decode_data(base64.b64encode(b"x" * 5000).decode(), 4096)
    with pytest.raises(BadNotice, match="base64"):
        decode_data("***", 4096)
    with pytest.raises(BadNotice, match="no data"):
        decode_data(None, 4096)


def _es(generation: int, *, uid: str = "u1", deleting: bool = False, fin: tuple[str, ...] = ()):
    meta: dict[str, object] = {"uid": uid, "generation": generation, "finalizers": list(fin)}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"observedGeneration": generation}}


def test_status_writes_are_not_notices_but_spec_deletion_and_finalizers_are() -> None:
    seen = SeenExternalService.of(_es(3))
    assert external_service_change(seen, "MODIFIED", _es(3)) is None  # status write
    assert external_service_change(seen, "MODIFIED", _es(4)) == "spec"
    assert external_service_change(seen, "MODIFIED", _es(3, deleting=True)) == "deleting"
    assert external_service_change(seen, "MODIFIED", _es(3, fin=("x",))) == "finalizers"
    assert external_service_change(seen, "MODIFIED", _es(1, uid="u2")) == "created"
    assert external_service_change(None, "ADDED", _es(1)) == "created"
    assert external_service_change(seen, "DELETED", _es(3)) == "deleted"


def test_deployment_notices_follow_readiness_and_deletion() -> None:
    def dep(ready: int, uid: str = "d1") -> dict[str, object]:
        return {"metadata": {"uid": uid}, "status": {"readyReplicas": ready}}

    seen = SeenDeployment.of(dep(0))
    assert deployment_change(None, "ADDED", dep(0)) is None  # our own create
    assert deployment_change(seen, "MODIFIED", dep(0)) is None
    assert deployment_change(seen, "MODIFIED", dep(1)) == "readiness"
    assert deployment_change(seen, "DELETED", dep(1)) == "gateway-deleted"


def test_pipeline_settings_name_bad_variables() -> None:
    with pytest.raises(PipelineSettingsError) as err:
        PipelineSettings.from_env(
            {
                "MAX_EVENT_AGE_SECONDS": "soon",
                "KUBE_CREDENTIALS": "magic",
                "EGRESS_EVENTS_TOPIC": "a b",
            }
        )
    text = str(err.value)
    for name in ("MAX_EVENT_AGE_SECONDS", "KUBE_CREDENTIALS", "EGRESS_EVENTS_TOPIC"):
        assert name in text
    with pytest.raises(PipelineSettingsError, match="GKE_ENDPOINT"):
        PipelineSettings.from_env({"KUBE_CREDENTIALS": "gke"})
    env = {"GKE_ENDPOINT": "1.2.3.4"}
    settings = PipelineSettings.from_env(env)
    assert settings.gke_endpoint == "https://1.2.3.4"
    assert settings.credential_mode(env) == "gke"
    assert PipelineSettings.from_env({}).credential_mode({"KUBERNETES_SERVICE_HOST": "x"}) == (
        "in-cluster"
    )
    with pytest.raises(ExporterSettingsError, match="GOOGLE_CLOUD_PROJECT"):
        ExporterSettings.from_env({})


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", (None, False)),
        (b'{"name": "google"}', ("google", False)),
        (b'{"dryRun": true}', (None, True)),
    ],
)
def test_repair_body(body: bytes, expected: tuple[str | None, bool]) -> None:
    assert parse_repair_body(body, "application/json") == expected


@pytest.mark.parametrize("body", [b"{", b"1", b'{"name": ""}', b'{"dryRun": 1}', b'{"x": 1}'])
def test_bad_repair_body(body: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_repair_body(body, "application/json")


def test_log_lines_are_cloud_logging_json() -> None:
    stream = io.StringIO()
    logs.setup("proj", stream)
    trace, span = logs.trace_from("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    with logs.context(externalService="google", trace=trace, spanId=span, eventId="9"):
        logs.log(logs.get("t"), logging.WARNING, "hello", outcome="converged")
    entry = json.loads(stream.getvalue())
    assert entry["severity"] == "WARNING"
    assert entry["message"] == "hello"
    assert entry["logging.googleapis.com/trace"] == (
        "projects/proj/traces/0af7651916cd43dd8448eb211c80319c"
    )
    assert entry["logging.googleapis.com/spanId"] == "b7ad6b7169203331"
    assert entry["logging.googleapis.com/labels"]["externalService"] == "google"
    assert entry["outcome"] == "converged" and entry["eventId"] == "9"
    assert logs.trace_from(None, "105445aa7843bc8bf206b12000100000/1;o=1")[0] == (
        "105445aa7843bc8bf206b12000100000"
    )
