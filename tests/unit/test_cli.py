"""`egressctl render` and `validate` as a person runs them: files in, YAML and exit codes out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

VALID = """\
apiVersion: egress.monzo.com/v1
kind: ExternalService
metadata:
  name: good
spec:
  dnsName: good.example.com
  ports: [{port: 443}]
"""
INVALID = """\
apiVersion: egress.monzo.com/v1
kind: ExternalService
metadata:
  name: bad
spec:
  dnsName: Bad.Example.com
  ports: [{port: 0}]
"""


def egressctl(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egressctl", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=False,
    )


def test_render_examples_prints_applyable_objects_in_apply_order() -> None:
    assert EXAMPLES, "examples/ must hold ExternalServices"
    result = egressctl("render", *map(str, EXAMPLES))
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    per_gateway: dict[str, list[str]] = {}
    for doc in docs:
        per_gateway.setdefault(doc["metadata"]["name"], []).append(doc["kind"])
    assert len(per_gateway) == len(EXAMPLES)
    for kinds in per_gateway.values():
        assert kinds == [
            "ConfigMap",
            "NetworkPolicy",
            "Service",
            "Deployment",
            "HorizontalPodAutoscaler",
        ]


def test_invalid_object_prints_nothing_of_its_own_and_exits_2() -> None:
    result = egressctl("render", "-", stdin=VALID + "---\n" + INVALID)
    assert result.returncode == 2
    names = {doc["metadata"]["name"] for doc in yaml.safe_load_all(result.stdout)}
    assert names == {"good"}
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "error: -: ExternalService/bad: spec.dnsName: 'Bad.Example.com' must be lowercase",
        "error: -: ExternalService/bad: spec.ports[0].port: "
        "must be an integer from 1 to 65535 (got 0)",
    ]


def test_render_reads_multi_document_files(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(VALID + "---\n" + VALID.replace("good", "other"))
    result = egressctl("render", str(path))
    assert result.returncode == 0, result.stderr
    assert {d["metadata"]["name"] for d in yaml.safe_load_all(result.stdout)} == {"good", "other"}


def test_bad_setting_stops_render_with_the_variable_named() -> None:
    result = egressctl(
        "render", "-", stdin=VALID, env={"ENABLE_PDB": "perhaps", "PATH": "/usr/bin"}
    )
    assert result.returncode == 2
    assert "ENABLE_PDB:" in result.stderr
    assert result.stdout == ""


def test_pdb_setting_adds_the_budget() -> None:
    result = egressctl("render", "-", stdin=VALID, env={"ENABLE_PDB": "true", "PATH": "/usr/bin"})
    assert result.returncode == 0, result.stderr
    assert [d["kind"] for d in yaml.safe_load_all(result.stdout)][-1] == "PodDisruptionBudget"


def test_validate(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(VALID)
    bad = tmp_path / "bad.yaml"
    bad.write_text(INVALID)
    ok = egressctl("validate", str(good))
    assert ok.returncode == 0
    assert ok.stdout.strip() == f"{good}: ExternalService/good: valid"
    failed = egressctl("validate", str(good), str(bad))
    assert failed.returncode == 2
    assert "ExternalService/bad: spec.dnsName" in failed.stderr


def test_unreadable_input_is_an_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    for args in (("render", str(broken)), ("validate", str(tmp_path / "missing.yaml"))):
        result = egressctl(*args)
        assert result.returncode == 2
        assert result.stderr.startswith("error: ")


def test_every_invalid_example_is_refused() -> None:
    invalid = sorted((ROOT / "examples" / "invalid").glob("*.yaml"))
    assert invalid
    for path in invalid:
        result = egressctl("validate", str(path))
        assert result.returncode == 2, f"{path.name} was accepted"
