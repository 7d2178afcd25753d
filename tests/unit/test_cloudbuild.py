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

from core.notice import DEFAULT_EVENTS_TOPIC, DEFAULT_SWEEP_TOPIC
from egressctl.pipeline import (
    DEAD_LETTER_SUBSCRIPTION,
    DEAD_LETTER_TOPIC,
    EVENTS_SUBSCRIPTION,
    FUNCTIONS,
    SWEEP_SUBSCRIPTION,
)
from tests.unit import gcloud_sdk

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


def expand(value: str, overrides: dict[str, str] | None = None) -> str:
    """Resolve ${_X} user substitutions (dynamic substitutions are on), with OVERRIDES as
    `--substitutions` would give them."""
    subs = {**SUBS, **(overrides or {})}
    for _ in range(5):
        value = re.sub(r"\$\{(_[A-Z0-9_]+)\}", lambda m: subs[m.group(1)], value)
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


def test_every_function_is_http_and_never_unauthenticated() -> None:
    """Pub/Sub pushes to the event functions directly (no Eventarc trigger), authenticated."""
    for entry, flags in deploys().items():
        assert flag(flags, "--trigger-http") == "", entry
        assert flag(flags, "--no-allow-unauthenticated") == "", entry
        for gone in ("--trigger-topic", "--retry", "--trigger-service-account"):
            assert flag(flags, gone) is None, (entry, gone)
        assert flag(flags, "--allow-unauthenticated") is None, entry


def _timeout_s(entry: str) -> int:
    return int((flag(deploys()[entry], "--timeout") or "").rstrip("s"))


def _calls(step: str) -> list[str]:
    return [" ".join(a) for a in gcloud_sdk.shell_invocations(STEPS[step]["args"][-1])]


def test_push_subscriptions_deliver_each_topic_to_its_function() -> None:
    """The subscriptions the local pipeline creates, as deployed: the events topic to on_event
    (ordered, retried with backoff, dead-lettered), the sweep topic to on_sweep, both pushing
    as the reconciler, with acknowledgement deadlines that outlast the functions."""
    assert expand("${_EVENTS_SUBSCRIPTION}") == EVENTS_SUBSCRIPTION
    assert expand("${_SWEEP_SUBSCRIPTION}") == SWEEP_SUBSCRIPTION
    calls = _calls("subscriptions")

    def one(prefix: str) -> str:
        (call,) = [c for c in calls if c.startswith(prefix + " ")]
        return call

    for entry, function, sub, topic, url in (
        (
            "on_event",
            "egress-on-event",
            "${_EVENTS_SUBSCRIPTION}",
            "${_EVENTS_TOPIC}",
            "events_url",
        ),
        ("on_sweep", "egress-on-sweep", "${_SWEEP_SUBSCRIPTION}", "${_SWEEP_TOPIC}", "sweep_url"),
    ):
        assert entry_points()[entry] == "cloud_event"
        describe = one(f"functions describe {function}")
        assert "--format=value(serviceConfig.uri)" in describe
        assert (
            f"{url}=$$(gcloud functions describe {function} " in STEPS["subscriptions"]["args"][-1]
        )
        create = one(f"pubsub subscriptions create {sub}")
        update = one(f"pubsub subscriptions update {sub}")
        assert f"--topic={topic}" in create
        for call in (create, update):
            assert f"--push-endpoint=$${url}" in call
            assert "--push-auth-service-account=${_RECONCILER_SA}" in call
        deadline = int(update.split("--ack-deadline=", 1)[1].split()[0])
        assert _timeout_s(entry) < deadline <= 600, entry
    events_create = one("pubsub subscriptions create ${_EVENTS_SUBSCRIPTION}")
    assert "--enable-message-ordering" in events_create, "notices are ordered per ExternalService"
    events = one("pubsub subscriptions update ${_EVENTS_SUBSCRIPTION}")
    assert "--dead-letter-topic=${_DEAD_LETTER_TOPIC}" in events
    assert "--max-delivery-attempts=${_MAX_DELIVERY_ATTEMPTS}" in events
    assert "--min-retry-delay=" in events and "--max-retry-delay=" in events
    sweep = one("pubsub subscriptions update ${_SWEEP_SUBSCRIPTION}")
    assert "--dead-letter-topic" not in sweep, "a failed sweep is redone by the next schedule"
    assert {"topics", "deploy-on-event", "deploy-on-sweep"} <= set(
        STEPS["subscriptions"]["waitFor"]
    )


def test_repair_is_http_and_never_unauthenticated() -> None:
    flags = deploys()["repair"]
    assert flag(flags, "--trigger-http") == ""
    assert flag(flags, "--no-allow-unauthenticated") == ""
    assert flag(flags, "--allow-unauthenticated") is None
    assert flag(flags, "--retry") is None


def test_functions_environment_matches_the_settings(tmp_path: Path) -> None:
    """The env file the step writes, run as Cloud Build runs it, is valid for the functions'
    settings: GKE credentials for the build's cluster, looked up in the GKE API at start."""
    from functions.settings import PipelineSettings

    workspace = tmp_path / "workspace"
    workspace.mkdir()
    step = dict(STEPS["functions-env"])
    step["args"] = [*step["args"][:-1], step["args"][-1].replace("/workspace/", f"{workspace}/")]
    calls = run_script(step["args"][-1], tmp_path, {"container clusters describe": (0, "prod\n")})
    assert calls[0][:4] == ["container", "clusters", "describe", "egress"], calls
    env = yaml.safe_load((workspace / "functions-env.yaml").read_text())
    assert all(isinstance(v, str) for v in env.values()), env
    settings = PipelineSettings.from_env(env)
    assert settings.credential_mode(env) == "gke"
    assert settings.gke_cluster == "projects/my-project/locations/europe-west2/clusters/egress"
    assert settings.gke_endpoint is None, "the endpoint and CA come from the GKE API at start"
    assert settings.gke_endpoint_type == "public"
    assert settings.events_topic == DEFAULT_EVENTS_TOPIC
    assert settings.sweep_topic == DEFAULT_SWEEP_TOPIC
    assert settings.project == "my-project"


def test_topics_dead_letter_and_scheduler() -> None:
    topics = STEPS["topics"]["args"][-1]
    for sub in ("${_EVENTS_TOPIC}", "${_SWEEP_TOPIC}", "${_DEAD_LETTER_TOPIC}"):
        assert sub in topics.split("for topic in", 1)[1].split(";", 1)[0]
    assert expand("${_DEAD_LETTER_TOPIC}") == DEAD_LETTER_TOPIC
    assert expand("${_DEAD_LETTER_SUBSCRIPTION}") == DEAD_LETTER_SUBSCRIPTION
    assert "--topic=${_DEAD_LETTER_TOPIC}" in topics

    # Dead letters: the Pub/Sub service agent forwards them; its name comes from the built-in
    # project number (no `projects describe`, so the build needs no roles/browser).
    dead = STEPS["subscriptions"]["args"][-1]
    assert 5 <= int(SUBS["_MAX_DELIVERY_ATTEMPTS"]) <= 100
    assert "roles/pubsub.publisher" in dead and "roles/pubsub.subscriber" in dead
    assert "service-${_PROJECT_NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com" in dead
    assert SUBS["_PROJECT_NUMBER"] == "${PROJECT_NUMBER}"
    assert "projects describe" not in (REPO / "cloudbuild.yaml").read_text()

    scheduler = _calls("scheduler")
    for verb in ("create", "update"):
        (call,) = [
            c for c in scheduler if c.startswith(f"scheduler jobs {verb} pubsub egress-sweep ")
        ]
        assert "--topic=${_SWEEP_TOPIC}" in call and "--schedule=${_SCHEDULE}" in call
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
    # The exporter publishes a notice for everything when it starts and exits if it cannot:
    # its topic, and the subscription that delivers it, exist first.
    assert {"push-exporter", "topics", "subscriptions"} <= set(STEPS["deploy-infra"]["waitFor"])


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


def _deploy_infra_objects(tmp_path: Path, overrides: dict[str, str]) -> list[dict[str, Any]]:
    """deploy-infra's overlay choice, run as Cloud Build would (the substitutions applied, `$$`
    unescaped), in a workspace holding this repo's infra/: the objects it applies."""
    import subprocess

    script = STEPS["deploy-infra"]["args"][-1]
    start = script.index("overlay=infra/overlays/gke")
    end = script.index("| sed -e", start)
    part = expand(script[start:end], overrides).replace("$$", "$")
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "infra").symlink_to(REPO / "infra")
    res = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", part.rstrip().rstrip("\\")],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return [o for o in yaml.safe_load_all(res.stdout) if o]


@pytest.mark.parametrize("manage", ["false", "true"])
def test_the_corefile_write_grant_follows_manage_coredns_import(
    tmp_path: Path, manage: str
) -> None:
    """The reconciler may update the Corefile exactly when _MANAGE_COREDNS_IMPORT is true."""
    objects = _deploy_infra_objects(tmp_path, {"_MANAGE_COREDNS_IMPORT": manage})
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


def test_cluster_dns_none_applies_nothing_in_kube_system(tmp_path: Path) -> None:
    """_CLUSTER_DNS=none (GKE Autopilot, kube-dns, Cloud DNS): the functions get CLUSTER_DNS=none
    and the applied overlay has no object in kube-system and no CoreDNS nudge policy."""
    from core.settings import Settings

    objects = _deploy_infra_objects(tmp_path, {"_CLUSTER_DNS": "none"})
    assert [o for o in objects if o["metadata"].get("namespace") == "kube-system"] == []
    assert [o for o in objects if o["kind"].startswith("ValidatingAdmissionPolicy")] == []
    assert {"CustomResourceDefinition", "ClusterRole", "Role", "Deployment"} <= {
        o["kind"] for o in objects
    }
    default = _deploy_infra_objects(tmp_path / "default", {})
    assert [o for o in default if o["metadata"].get("namespace") == "kube-system"], "coredns"
    env = yaml.safe_load(
        (functions_env(tmp_path, {"_CLUSTER_DNS": "none"}) / "functions-env.yaml").read_text()
    )
    assert env["CLUSTER_DNS"] == "none"
    assert not Settings.from_env(env).hijack_available
    assert SUBS["_CLUSTER_DNS"] == "coredns"


@pytest.mark.parametrize(
    "overrides",
    [{"_CLUSTER_DNS": "kube-dns"}, {"_CLUSTER_DNS": "none", "_MANAGE_COREDNS_IMPORT": "true"}],
)
def test_a_bad_cluster_dns_choice_fails_the_build_early(
    tmp_path: Path, overrides: dict[str, str]
) -> None:
    functions_env(tmp_path, overrides, returncode=2)


# -- every gcloud command, against the installed gcloud -------------------------------------


GUIDES = [REPO / "docs" / "operations.md"]


@pytest.mark.parametrize(
    "source", ["cloudbuild.yaml", *(p.relative_to(REPO).as_posix() for p in GUIDES)]
)
def test_every_gcloud_command_is_known_to_the_installed_gcloud(source: str) -> None:
    """Each command path is a gcloud command and each --flag is in its --help (skipped, the
    whole check, where gcloud is not installed)."""
    if gcloud_sdk.command_tree() is None:
        pytest.skip("gcloud is not installed")
    text = (REPO / source).read_text()
    calls = (
        gcloud_sdk.build_invocations(BUILD)
        if source == "cloudbuild.yaml"
        else gcloud_sdk.markdown_invocations(text)
    )
    assert calls, source
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        problems = [p for found in pool.map(gcloud_sdk.check_invocation, calls) for p in found]
    assert not problems, "\n".join(problems)


def test_the_gcloud_check_finds_unknown_commands_and_flags() -> None:
    if gcloud_sdk.command_tree() is None:
        pytest.skip("gcloud is not installed")
    assert gcloud_sdk.check_invocation(["pubsub", "topics", "describe", "t", "--project=p"]) == []
    assert gcloud_sdk.check_invocation(["functions", "describe", "f", "--gen2", "--region=r"]) == []
    (bad_flag,) = gcloud_sdk.check_invocation(["pubsub", "topics", "create", "t", "--retry"])
    assert "--retry is not in `gcloud pubsub topics create --help`" in bad_flag
    (group,) = gcloud_sdk.check_invocation(["scheduler", "jobs", "$$verb", "pubsub", "x"])
    assert "`gcloud scheduler jobs` is not a command" in group


def test_step_images_are_pinned_and_the_sdk_matches_the_checked_gcloud() -> None:
    """An unpinned builder changes under the build (`docker` moved to clients that refuse
    Cloud Build's engine). The SDK images run the commands checked above, so they are the
    installed gcloud's version."""
    for step in BUILD["steps"]:
        image = expand(step["name"])
        name, _, tag = image.rpartition(":")
        assert name and re.match(r"\d+(\.\d+)+", tag), f"{step['id']}: {image} is not pinned"
        assert "." not in name.split("/")[0], f"{step['id']}: {image} names a registry host"
    versions = {
        expand(SUBS[s]).rpartition(":")[2].split("-")[0] for s in ("_SDK_IMAGE", "_KUBECTL_IMAGE")
    }
    assert len(versions) == 1, versions
    installed = gcloud_sdk.sdk_version()
    if installed is not None:
        assert versions == {installed}, f"SDK images {versions}, gcloud checked here {installed}"


# -- the steps' scripts, run against a fake gcloud ------------------------------------------

BUILT_INS_FOR_TESTS = {"PROJECT_ID": "my-project", "PROJECT_NUMBER": "123456789", "BUILD_ID": "b-1"}


def run_step(step: str, tmp: Path, answers: dict[str, tuple[int, str]]) -> list[list[str]]:
    """Run a bash step's script as Cloud Build would (substitutions applied, `$$` unescaped)
    with a fake gcloud on PATH; returns the gcloud calls it made."""
    return run_script(STEPS[step]["args"][-1], tmp, answers)


def run_script(
    script: str,
    tmp: Path,
    answers: dict[str, tuple[int, str]],
    overrides: dict[str, str] | None = None,
    returncode: int = 0,
) -> list[list[str]]:
    script = expand(script, overrides)
    for name, value in BUILT_INS_FOR_TESTS.items():
        script = script.replace(f"${{{name}}}", value)
    script = script.replace("$$", "$")
    res, calls = gcloud_sdk.run_with_fake_gcloud(["bash", "-c", script], tmp, answers)
    assert res.returncode == returncode, res.stderr
    return calls


def test_replace_event_triggers_deletes_only_functions_with_an_event_trigger(
    tmp_path: Path,
) -> None:
    trigger = "projects/p/locations/r/triggers/egress-on-event-123"
    calls = run_step(
        "replace-event-triggers",
        tmp_path,
        {
            "functions describe egress-on-event": (0, trigger + "\n"),
            "functions describe egress-on-sweep": (0, "\n"),
        },
    )
    deletes = [c for c in calls if c[:2] == ["functions", "delete"]]
    assert deletes == [
        [
            "functions",
            "delete",
            "egress-on-event",
            "--gen2",
            "--region=europe-west2",
            "--project=my-project",
            "--quiet",
        ]
    ]
    # A first deployment: nothing to describe, nothing deleted.
    calls = run_step("replace-event-triggers", tmp_path, {})
    assert not [c for c in calls if c[:2] == ["functions", "delete"]]


@pytest.mark.parametrize("existing", [False, True], ids=["first-build", "next-build"])
def test_subscriptions_step_creates_once_and_updates_every_build(
    tmp_path: Path, existing: bool
) -> None:
    answers: dict[str, tuple[int, str]] = {
        "functions describe egress-on-event": (0, "https://egress-on-event-abc.a.run.app\n"),
        "functions describe egress-on-sweep": (0, "https://egress-on-sweep-abc.a.run.app\n"),
    }
    if existing:
        answers["pubsub subscriptions describe"] = (0, "")
    calls = run_step("subscriptions", tmp_path, answers)
    verbs = [
        (c[2], c[3])
        for c in calls
        if c[:2] == ["pubsub", "subscriptions"] and c[2] in ("create", "update")
    ]
    creates = (
        [] if existing else [("create", "egress-events-push"), ("create", "egress-sweep-push")]
    )
    assert sorted(verbs) == sorted(
        [*creates, ("update", "egress-events-push"), ("update", "egress-sweep-push")]
    )
    for c in calls:
        if c[:3] == ["pubsub", "subscriptions", "update"]:
            url = (
                "https://egress-on-event-abc.a.run.app"
                if c[3] == "egress-events-push"
                else "https://egress-on-sweep-abc.a.run.app"
            )
            assert f"--push-endpoint={url}" in c
            assert (
                "--push-auth-service-account=egress-reconciler@my-project.iam.gserviceaccount.com"
                in c
            )
    agent = "--member=serviceAccount:service-123456789@gcp-sa-pubsub.iam.gserviceaccount.com"
    bindings = [c for c in calls if "add-iam-policy-binding" in c]
    assert len(bindings) == 2 and all(agent in c for c in bindings)


@pytest.mark.parametrize("existing", [False, True], ids=["create", "update"])
def test_scheduler_step_creates_or_updates_the_job(tmp_path: Path, existing: bool) -> None:
    answers = {"scheduler jobs describe egress-sweep": (0, "")} if existing else {}
    calls = run_step("scheduler", tmp_path, answers)
    (job,) = [c for c in calls if c[:2] == ["scheduler", "jobs"] and c[2] != "describe"]
    assert job[2:5] == ["update" if existing else "create", "pubsub", "egress-sweep"]
    assert "--schedule=*/5 * * * *" in job and "--topic=egress-sweep" in job
    assert '--message-body={"reason": "scheduled sweep"}' in job


# -- private clusters ------------------------------------------------------------------------


def functions_env(tmp: Path, overrides: dict[str, str], returncode: int = 0) -> Path:
    """Run the functions-env step with OVERRIDES in a workspace of its own; the workspace."""
    workspace = tmp / "workspace"
    workspace.mkdir(exist_ok=True)
    script = STEPS["functions-env"]["args"][-1].replace("/workspace/", f"{workspace}/")
    answers = {"container clusters describe": (0, "egress\n")}
    run_script(script, tmp, answers, overrides, returncode)
    return workspace


def network_flags(workspace: Path) -> list[str]:
    """The flags the deploy steps' --flags-file adds, as gcloud expands the file (a boolean
    value is the bare flag, anything else --flag=value)."""
    data = yaml.safe_load((workspace / "functions-network.yaml").read_text())
    return [k if isinstance(v, bool | None) else f"{k}={v}" for k, v in data.items()]


def test_every_function_deploy_takes_the_network_flags_file() -> None:
    for entry, flags in deploys().items():
        assert flag(flags, "--flags-file") == "/workspace/functions-network.yaml", entry


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, ["--clear-vpc-connector"]),
        (
            {"_VPC_CONNECTOR": "egress-connector"},
            ["--vpc-connector=egress-connector", "--egress-settings=private-ranges-only"],
        ),
        (
            {
                "_VPC_CONNECTOR": "projects/p/locations/europe-west2/connectors/c",
                "_VPC_EGRESS": "all",
            },
            [
                "--vpc-connector=projects/p/locations/europe-west2/connectors/c",
                "--egress-settings=all",
            ],
        ),
    ],
    ids=["no-connector", "connector", "all-traffic"],
)
def test_vpc_connector_substitutions_reach_every_function(
    tmp_path: Path, overrides: dict[str, str], expected: list[str]
) -> None:
    flags = network_flags(functions_env(tmp_path, overrides))
    assert flags == expected
    # The installed gcloud takes them on `functions deploy`, next to the step's own flags.
    deploy = ["functions", "deploy", "egress-on-event", *deploys()["on_event"], *flags]
    assert gcloud_sdk.check_invocation(deploy) == []


@pytest.mark.parametrize("endpoint_type", ["public", "private", "dns"])
def test_endpoint_type_reaches_the_functions_and_kubectl(
    tmp_path: Path, endpoint_type: str
) -> None:
    from functions.settings import PipelineSettings

    workspace = functions_env(tmp_path, {"_GKE_ENDPOINT_TYPE": endpoint_type})
    env = yaml.safe_load((workspace / "functions-env.yaml").read_text())
    assert PipelineSettings.from_env(env).gke_endpoint_type == endpoint_type
    # deploy-infra's credentials, up to the first kubectl: --internal-ip or --dns-endpoint.
    script = STEPS["deploy-infra"]["args"][-1]
    head = script[: script.index("overlay=infra/overlays/gke")]
    calls = run_script(head, tmp_path, {}, {"_GKE_ENDPOINT_TYPE": endpoint_type})
    (get_credentials,) = calls
    assert get_credentials[:4] == ["container", "clusters", "get-credentials", "egress"]
    extra = {"public": [], "private": ["--internal-ip"], "dns": ["--dns-endpoint"]}[endpoint_type]
    assert [a for a in get_credentials if a in ("--internal-ip", "--dns-endpoint")] == extra
    assert gcloud_sdk.check_invocation(get_credentials) == []


def test_kubectl_may_use_another_endpoint_than_the_functions(tmp_path: Path) -> None:
    """Functions through a VPC connector, the build by DNS name (no private pool needed)."""
    assert SUBS["_KUBECTL_ENDPOINT_TYPE"] == "${_GKE_ENDPOINT_TYPE}"
    overrides = {"_GKE_ENDPOINT_TYPE": "private", "_KUBECTL_ENDPOINT_TYPE": "dns"}
    script = STEPS["deploy-infra"]["args"][-1]
    head = script[: script.index("overlay=infra/overlays/gke")]
    (call,) = run_script(head, tmp_path, {}, overrides)
    assert "--dns-endpoint" in call


@pytest.mark.parametrize("name", ["_GKE_ENDPOINT_TYPE", "_KUBECTL_ENDPOINT_TYPE"])
def test_an_unknown_endpoint_type_fails_the_build_early(tmp_path: Path, name: str) -> None:
    functions_env(tmp_path, {name: "internal"}, returncode=2)
