"""cloudbuild.yaml agrees with the code it deploys.

Why: a deploy file is only ever run for real in a user's project, so a renamed entry point, a
topic that differs from the settings' default, a missing --retry or an HTTP function open to
everyone would be found there, in production. These checks read the file and main.py (without
importing it) and compare.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from egressctl.pipeline import DEAD_LETTER_SUBSCRIPTION, DEAD_LETTER_TOPIC, FUNCTIONS
from functions.settings import DEFAULT_EVENTS_TOPIC, DEFAULT_SWEEP_TOPIC

REPO = Path(__file__).resolve().parents[2]
BUILD: dict[str, Any] = yaml.safe_load((REPO / "cloudbuild.yaml").read_text())
SUBS: dict[str, str] = BUILD["substitutions"]
STEPS: dict[str, dict[str, Any]] = {step["id"]: step for step in BUILD["steps"]}
BUILT_INS = {"PROJECT_ID", "BUILD_ID", "PROJECT_NUMBER", "LOCATION", "SHORT_SHA", "COMMIT_SHA"}


def entry_points() -> dict[str, str]:
    """Module-level functions of main.py and their functions-framework decorator."""
    tree = ast.parse((REPO / "main.py").read_text())
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                if (
                    isinstance(deco, ast.Attribute)
                    and isinstance(deco.value, ast.Name)
                    and deco.value.id == "functions_framework"
                ):
                    out[node.name] = deco.attr
    return out


def deploys() -> dict[str, list[str]]:
    """Entry point -> the flags of its `gcloud functions deploy` step."""
    out: dict[str, list[str]] = {}
    for step in BUILD["steps"]:
        args = [str(a) for a in step.get("args", [])]
        if step.get("entrypoint") == "gcloud" and args[:2] == ["functions", "deploy"]:
            flags = args[3:]
            entry = [f.split("=", 1)[1] for f in flags if f.startswith("--entry-point=")]
            assert len(entry) == 1, f"{step['id']}: exactly one --entry-point"
            out[entry[0]] = flags
        else:
            text = " ".join(args)
            assert "functions deploy" not in text, f"{step['id']}: deploy in a script is untested"
    return out


def flag(flags: list[str], name: str) -> str | None:
    for f in flags:
        if f == name:
            return ""
        if f.startswith(name + "="):
            return f.split("=", 1)[1]
    return None


def expand(value: str) -> str:
    """Resolve ${_X} user substitutions (dynamic substitutions are on)."""
    for _ in range(5):
        value = re.sub(r"\$\{(_[A-Z0-9_]+)\}", lambda m: SUBS[m.group(1)], value)
    return value


def test_every_entry_point_of_main_is_deployed_and_exists() -> None:
    assert entry_points() == {
        "on_event": "cloud_event",
        "on_sweep": "cloud_event",
        "repair": "http",
    }
    assert set(deploys()) == set(entry_points())
    # The local pipeline serves the same entry points the same way.
    kinds = {"cloud_event": "cloudevent", "http": "http"}
    assert {name: kinds[k] for name, k in entry_points().items()} == FUNCTIONS


def test_common_flags_are_consistent() -> None:
    for entry, flags in deploys().items():
        assert "--gen2" in flags, entry
        assert flag(flags, "--runtime") == "python311", entry
        assert flag(flags, "--region") == "${_REGION}", entry
        assert flag(flags, "--project") == "${_PROJECT}", entry
        assert flag(flags, "--source") == ".", entry
        assert flag(flags, "--service-account") == "${_RECONCILER_SA}", entry
        assert flag(flags, "--env-vars-file") == "/workspace/functions-env.yaml", entry
        timeout = flag(flags, "--timeout")
        assert timeout is not None and int(timeout.rstrip("s")) <= 540, entry
    # The requirements file the functions deploy with pins the runtime's dependencies.
    assert "functions-framework" in (REPO / "requirements.txt").read_text()
    assert 'python_version = "3.11"' in (REPO / "pyproject.toml").read_text()


def test_event_functions_triggers_and_retry() -> None:
    d = deploys()
    kinds = entry_points()
    for entry, flags in d.items():
        if kinds[entry] == "cloud_event":
            assert flag(flags, "--trigger-http") is None, entry
            assert flag(flags, "--trigger-service-account") == "${_RECONCILER_SA}", entry
        else:
            assert flag(flags, "--trigger-topic") is None, entry
    assert expand(flag(d["on_event"], "--trigger-topic") or "") == DEFAULT_EVENTS_TOPIC
    assert flag(d["on_event"], "--retry") == "", "the event function must retry transient failures"
    assert expand(flag(d["on_sweep"], "--trigger-topic") or "") == DEFAULT_SWEEP_TOPIC
    assert flag(d["on_sweep"], "--retry") is None, "a failed sweep is redone by the next schedule"


def test_repair_is_http_and_never_unauthenticated() -> None:
    flags = deploys()["repair"]
    assert flag(flags, "--trigger-http") == ""
    assert flag(flags, "--no-allow-unauthenticated") == ""
    assert flag(flags, "--allow-unauthenticated") is None
    assert flag(flags, "--retry") is None


def test_functions_environment_matches_the_settings() -> None:
    script = STEPS["functions-env"]["args"][-1]
    env = yaml.safe_load(script.split("<<EOF\n", 1)[1].split("\nEOF", 1)[0])
    assert env["KUBE_CREDENTIALS"] == "gke"
    assert expand(env["EGRESS_EVENTS_TOPIC"]) == DEFAULT_EVENTS_TOPIC
    assert expand(env["EGRESS_SWEEP_TOPIC"]) == DEFAULT_SWEEP_TOPIC
    assert {"GKE_ENDPOINT", "GKE_CA_CERT", "GOOGLE_CLOUD_PROJECT"} <= set(env)
    assert "clusters describe ${_CLUSTER} --location=${_CLUSTER_LOCATION}" in script


def test_topics_dead_letter_and_scheduler() -> None:
    topics = STEPS["topics"]["args"][-1]
    for sub in ("${_EVENTS_TOPIC}", "${_SWEEP_TOPIC}", "${_DEAD_LETTER_TOPIC}"):
        assert sub in topics.split("for topic in", 1)[1].split(";", 1)[0]
    assert expand("${_DEAD_LETTER_TOPIC}") == DEAD_LETTER_TOPIC
    assert expand("${_DEAD_LETTER_SUBSCRIPTION}") == DEAD_LETTER_SUBSCRIPTION
    assert "--topic=${_DEAD_LETTER_TOPIC}" in topics

    dead = STEPS["dead-letter"]["args"][-1]
    assert "functions describe egress-on-event" in dead
    assert "--dead-letter-topic=${_DEAD_LETTER_TOPIC}" in dead
    assert "--max-delivery-attempts=${_MAX_DELIVERY_ATTEMPTS}" in dead
    assert 5 <= int(SUBS["_MAX_DELIVERY_ATTEMPTS"]) <= 100
    assert "roles/pubsub.publisher" in dead and "roles/pubsub.subscriber" in dead
    assert "deploy-on-event" in STEPS["dead-letter"]["waitFor"]

    scheduler = STEPS["scheduler"]["args"][-1]
    assert "pubsub egress-sweep" in scheduler
    assert "--topic=${_SWEEP_TOPIC}" in scheduler
    assert '--schedule="${_SCHEDULE}"' in scheduler
    assert len(SUBS["_SCHEDULE"].split()) == 5


def test_substitutions_are_defined_and_used() -> None:
    text = (REPO / "cloudbuild.yaml").read_text()
    body = text.split("\nsteps:", 1)[1]
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", text))
    for name in used:
        assert name in SUBS or name in BUILT_INS, f"${{{name}}} is not defined"
    for name in SUBS:
        assert f"${{{name}}}" in text, f"substitution {name} is never used"
    for name in ("_PROJECT", "_REGION", "_CLUSTER", "_SCHEDULE"):
        assert f"${{{name}}}" in body, name
    # Shell variables must be escaped ($$), or Cloud Build refuses (or substitutes) them.
    bare = re.findall(r"(?<!\$)\$(?![${])", body)
    assert not bare, "unescaped $ in a step"
    assert BUILD["options"]["dynamicSubstitutions"] is True


def test_exporter_image_is_built_pushed_and_deployed() -> None:
    build = STEPS["build-exporter"]["args"]
    assert "--file=exporter/Dockerfile" in build
    assert (REPO / "exporter" / "Dockerfile").is_file()
    assert "--tag=${_EXPORTER_IMAGE}:${BUILD_ID}" in build
    assert STEPS["push-exporter"]["args"][-1] == "${_EXPORTER_IMAGE}"
    infra = STEPS["deploy-infra"]["args"][-1]
    assert "overlay=infra/overlays/gke" in infra and 'kubectl kustomize "$$overlay"' in infra
    assert "s|EXPORTER_IMAGE|${_EXPORTER_IMAGE}:${BUILD_ID}|g" in infra
    assert "s|PROJECT_ID|${_PROJECT}|g" in infra
    assert "push-exporter" in STEPS["deploy-infra"]["waitFor"]


@pytest.mark.parametrize("step", [s["id"] for s in BUILD["steps"]])
def test_every_step_waits_for_the_checks(step: str) -> None:
    if step == "lint-and-test":
        return
    seen: set[str] = set()
    todo = list(STEPS[step].get("waitFor") or [])
    assert todo, f"{step} would start before lint and tests pass"
    while todo:
        dep = todo.pop()
        assert dep in STEPS, f"{step}: waits for unknown step {dep}"
        if dep not in seen:
            seen.add(dep)
            todo += STEPS[dep].get("waitFor") or []
    assert "lint-and-test" in seen, step


@pytest.mark.parametrize("manage", ["false", "true"])
def test_the_corefile_write_grant_follows_manage_coredns_import(
    tmp_path: Path, manage: str
) -> None:
    """deploy-infra's overlay choice, run as Cloud Build would (the substitution applied, `$$`
    unescaped), in a workspace holding this repo's infra/: the reconciler may update the
    Corefile exactly when _MANAGE_COREDNS_IMPORT is true."""
    import subprocess

    script = STEPS["deploy-infra"]["args"][-1]
    start = script.index("overlay=infra/overlays/gke")
    end = script.index("| sed -e", start)
    part = script[start:end].replace("${_MANAGE_COREDNS_IMPORT}", manage).replace("$$", "$")
    (tmp_path / "infra").symlink_to(REPO / "infra")
    res = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", part.rstrip().rstrip("\\")],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    objects = [o for o in yaml.safe_load_all(res.stdout) if o]
    (role,) = [
        o
        for o in objects
        if o["kind"] == "Role" and o["metadata"]["name"] == "egress-reconciler-dns"
    ]
    writes = [
        r
        for r in role["rules"]
        if "update" in r.get("verbs", []) and "coredns" in r.get("resourceNames", [])
    ]
    assert bool(writes) == (manage == "true"), role["rules"]
