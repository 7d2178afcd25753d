"""The ExternalService CRD: shape, structural schema, and the examples validated against it.

The schema is checked offline with JSON Schema (Draft 7) after translating the Kubernetes
extensions away; the CEL rules (``x-kubernetes-validations``) are only checked for
presence here, and against a real API server by the cluster tests, which use the
``cel-*.yaml`` files of ``examples/invalid/`` (CEL-only failures: see the README there) and
the hostile-tenant table of ``hostile.py`` (``tests/integration/test_hostile_crd.py``). The
lists the CRD and the reconciler must share (metadata names and addresses, bounds) are
compared here.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from core import spec as parser
from tests.unit.hostile import HOSTILE, Hostile

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "infra" / "crd" / "externalservices.yaml"
EXAMPLES = REPO / "examples"
INVALID = EXAMPLES / "invalid"

VALID_FILES = sorted(EXAMPLES.glob("*.yaml"))
INVALID_FILES = sorted(INVALID.glob("*.yaml"))
SCHEMA_INVALID_FILES = [p for p in INVALID_FILES if not p.name.startswith("cel-")]
CEL_ONLY_FILES = [p for p in INVALID_FILES if p.name.startswith("cel-")]

REQUIRED_EXAMPLES = [
    "google-tcp.yaml",
    "dns-udp.yaml",
    "payments-ipoverride.yaml",
    "github-json-logs.yaml",
    "minimal.yaml",
]

# Value validations may not carry these (structural schema rules).
FORBIDDEN_IN_VALUE_VALIDATION = {
    "type",
    "default",
    "description",
    "nullable",
    "additionalProperties",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
}
INT_OR_STRING_ANYOF = [{"type": "integer"}, {"type": "string"}]


def ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def load_yaml(path: Path) -> Any:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1, f"{path.name}: expected exactly one YAML document, got {len(docs)}"
    return docs[0]


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    data = load_yaml(CRD_PATH)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    versions = crd["spec"]["versions"]
    assert [v["name"] for v in versions] == ["v1"]
    return dict(versions[0])


@pytest.fixture(scope="module")
def root_schema(version: dict[str, Any]) -> dict[str, Any]:
    return dict(version["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def spec_schema(root_schema: dict[str, Any]) -> dict[str, Any]:
    return dict(root_schema["properties"]["spec"])


@pytest.fixture(scope="module")
def status_schema(root_schema: dict[str, Any]) -> dict[str, Any]:
    return dict(root_schema["properties"]["status"])


@pytest.fixture(scope="module")
def validator(root_schema: dict[str, Any]) -> jsonschema.Draft7Validator:
    schema = to_jsonschema(root_schema)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


# --- JSON Schema translation ------------------------------------------------------------


def to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """A Draft 7 equivalent of a Kubernetes structural schema node.

    Drops ``x-kubernetes-*`` keys, spells int-or-string as ``anyOf``, and closes objects
    that declare properties (``additionalProperties: false``): unknown fields are refused,
    like the API server does under strict field validation (kubectl's default).
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_jsonschema(sub) for sub in value]
        elif key == "pattern":
            # RE2 (the API server's) `$` is the end of the text; Python's also matches before
            # a final newline.
            out[key] = re.sub(r"\$$", r"\\Z", value)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = list(INT_OR_STRING_ANYOF)
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def error_fields(error: jsonschema.ValidationError) -> set[str]:
    """Kubernetes-style field paths (``spec.ports[0].port``) that an error is about."""
    base = ""
    for part in error.absolute_path:
        base += f"[{part}]" if isinstance(part, int) else f".{part}"
    base = base.removeprefix(".")
    fields = {base or "<root>"}
    if error.validator == "required" and isinstance(error.instance, dict):
        fields |= {f"{base}.{r}".lstrip(".") for r in error.validator_value}
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = set(error.schema.get("properties", {}))
        fields |= {f"{base}.{k}".lstrip(".") for k in error.instance if k not in known}
    return fields


def header(path: Path, key: str) -> str | None:
    for line in path.read_text().splitlines():
        m = re.match(rf"#\s*{re.escape(key)}:\s*(.*\S)\s*$", line)
        if m:
            return m.group(1)
    return None


# --- walking the schema -----------------------------------------------------------------


def schema_nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node that describes data (not value validations), with its path."""
    yield path or "<root>", node
    for name, sub in node.get("properties", {}).items():
        yield from schema_nodes(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_nodes(node["additionalProperties"], f"{path}{{}}")


def value_validations(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in node.get(key, []):
            yield sub
            yield from value_validations(sub)
    if isinstance(node.get("not"), dict):
        yield node["not"]
        yield from value_validations(node["not"])


def all_enums(node: Any) -> Iterator[tuple[str, list[Any]]]:
    for path, sub in schema_nodes(node):
        if "enum" in sub:
            yield path, sub["enum"]


# --- identity ---------------------------------------------------------------------------


def test_crd_identity(crd: dict[str, Any], version: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == "externalservices.egress.monzo.com"
    spec = crd["spec"]
    assert spec["group"] == "egress.monzo.com"
    assert spec["scope"] == "Cluster"
    assert spec["names"] == {
        "kind": "ExternalService",
        "listKind": "ExternalServiceList",
        "plural": "externalservices",
        "singular": "externalservice",
        "shortNames": ["extsvc"],
        "categories": ["egress"],
    }
    assert version["served"] is True
    assert version["storage"] is True


def test_status_subresource(version: dict[str, Any]) -> None:
    assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize(
    ("name", "col_type", "json_path"),
    [
        ("DNS Name", "string", ".spec.dnsName"),
        ("Ports", "string", ".spec.ports[*].port"),
        ("Hijack", "string", ".status.hijackState"),
        ("Ready", "string", '.status.conditions[?(@.type=="Ready")].status'),
        ("Age", "date", ".metadata.creationTimestamp"),
    ],
    ids=["dns-name", "ports", "hijack", "ready", "age"],
)
def test_printer_column(version: dict[str, Any], name: str, col_type: str, json_path: str) -> None:
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert name in columns, f"missing printer column {name!r}"
    assert columns[name]["type"] == col_type
    assert columns[name]["jsonPath"] == json_path


# --- structural schema ------------------------------------------------------------------


def test_schema_is_structural(root_schema: dict[str, Any]) -> None:
    problems: list[str] = []
    for path, node in schema_nodes(root_schema):
        int_or_string = node.get("x-kubernetes-int-or-string") is True
        if int_or_string:
            if "type" in node:
                problems.append(f"{path}: int-or-string must not have a type")
            if "anyOf" in node and node["anyOf"] != INT_OR_STRING_ANYOF:
                problems.append(f"{path}: int-or-string anyOf must be integer|string")
        elif "type" not in node:
            problems.append(f"{path}: no type")
        if node.get("x-kubernetes-preserve-unknown-fields") is not None:
            problems.append(f"{path}: preserve-unknown-fields (everything must be pruned)")
        for key in node.get("required", []):
            if key not in node.get("properties", {}):
                problems.append(f"{path}: required {key!r} is not a property")
        if node.get("type") == "array" and "items" not in node:
            problems.append(f"{path}: array without items")
        for sub in value_validations(node):
            if int_or_string and sub in INT_OR_STRING_ANYOF:
                continue
            bad = FORBIDDEN_IN_VALUE_VALIDATION & set(sub)
            if bad:
                problems.append(f"{path}: value validation carries {sorted(bad)}")
    assert problems == []


def test_root_metadata_is_only_an_object(root_schema: dict[str, Any]) -> None:
    # Only name/generateName restrictions are allowed there; we validate the name with CEL.
    assert root_schema["properties"]["metadata"] == {"type": "object"}
    assert root_schema["required"] == ["spec"]


def test_enum_values_are_strings(root_schema: dict[str, Any]) -> None:
    """YAML 1.1 reads bare off/true/True as booleans: every enum value must stay a string."""
    enums = dict(all_enums(root_schema))
    assert enums, "no enums found"
    for path, values in enums.items():
        assert all(isinstance(v, str) for v in values), f"{path}: {values!r}"


def test_defaults_match_types(root_schema: dict[str, Any]) -> None:
    py_types = {"string": str, "boolean": bool, "integer": int, "object": dict, "array": list}
    for path, node in schema_nodes(root_schema):
        if "default" in node:
            expected = py_types[node["type"]]
            value = node["default"]
            assert isinstance(value, expected), f"{path}: default {value!r}"
            assert not (expected is int and isinstance(value, bool)), path
            if "enum" in node:
                assert value in node["enum"], path


# --- spec fields, as in SPEC §2 ---------------------------------------------------------

SPEC_FIELDS: dict[str, dict[str, Any]] = {
    "dnsName": {"type": "string", "maxLength": 253},
    "ports": {"type": "array", "minItems": 1},
    "hijackDns": {"type": "boolean", "default": False},
    "minReplicas": {"type": "integer", "minimum": 1, "maximum": 2147483647, "default": 3},
    "maxReplicas": {"type": "integer", "minimum": 1, "maximum": 2147483647, "default": 12},
    "targetCPUUtilizationPercentage": {
        "type": "integer",
        "minimum": 1,
        "maximum": 100,
        "default": 50,
    },
    "resources": {"type": "object"},
    "ipOverride": {"type": "array", "maxItems": 32},
    "envoyClusterMaxConnections": {"type": "integer", "minimum": 0, "maximum": 4294967295},
    "envoyLogLevel": {
        "type": "string",
        "enum": ["trace", "debug", "info", "warning", "warn", "error", "critical", "off"],
    },
    "envoyDnsRefreshRateS": {"type": "integer", "minimum": 1},
    "envoyRespectDnsTTL": {"type": "boolean", "default": False},
    "serviceTopologyMode": {"type": "string", "maxLength": 63},
    "envoyJsonAdminAccessLogs": {"type": "boolean", "default": False},
    "envoyJsonClusterAccessLogs": {"type": "boolean", "default": False},
}
UNSET_BY_DEFAULT = [
    "dnsName",
    "ports",
    "resources",
    "ipOverride",
    "envoyClusterMaxConnections",
    "envoyLogLevel",
    "envoyDnsRefreshRateS",
    "serviceTopologyMode",
]


def test_spec_has_exactly_the_spec_fields(spec_schema: dict[str, Any]) -> None:
    assert set(spec_schema["properties"]) == set(SPEC_FIELDS)
    assert sorted(spec_schema["required"]) == ["dnsName", "ports"]


@pytest.mark.parametrize(("field", "expected"), list(SPEC_FIELDS.items()), ids=list(SPEC_FIELDS))
def test_spec_field(spec_schema: dict[str, Any], field: str, expected: dict[str, Any]) -> None:
    node = spec_schema["properties"][field]
    for key, value in expected.items():
        assert key in node, f"{field}: no {key}"
        assert node[key] == value, f"{field}.{key}: {node[key]!r} != {value!r}"
        assert type(node[key]) is type(value), f"{field}.{key}: {node[key]!r} wrong type"
    assert node.get("description"), f"{field}: no description (kubectl explain)"


@pytest.mark.parametrize("field", UNSET_BY_DEFAULT, ids=UNSET_BY_DEFAULT)
def test_field_has_no_default(spec_schema: dict[str, Any], field: str) -> None:
    # resources in particular: the reconciler applies its defaults, so old objects (never
    # re-defaulted on disk) and new ones behave the same.
    assert "default" not in spec_schema["properties"][field]


def test_ports_items(spec_schema: dict[str, Any]) -> None:
    ports = spec_schema["properties"]["ports"]
    assert ports["maxItems"] <= 64, "bounded so that the quadratic CEL rule is cheap"
    item = ports["items"]
    assert item["type"] == "object"
    assert item["required"] == ["port"]
    assert item["properties"]["port"] == {
        **item["properties"]["port"],
        "type": "integer",
        "minimum": 1,
        "maximum": 65535,
    }
    protocol = item["properties"]["protocol"]
    assert protocol["type"] == "string"
    assert protocol["enum"] == ["TCP", "UDP"]
    assert protocol["default"] == "TCP"


def test_resources_shape(spec_schema: dict[str, Any]) -> None:
    resources = spec_schema["properties"]["resources"]
    assert set(resources["properties"]) == {"requests", "limits"}
    for key in ("requests", "limits"):
        node = resources["properties"][key]
        assert node["type"] == "object"
        value = node["additionalProperties"]
        assert value["x-kubernetes-int-or-string"] is True
        assert value["pattern"]


def test_ip_override_items(spec_schema: dict[str, Any]) -> None:
    items = spec_schema["properties"]["ipOverride"]["items"]
    assert items["type"] == "string"
    assert items["maxLength"] == 45
    assert items["pattern"].startswith("^") and items["pattern"].endswith("$")


# --- CEL rules: present (evaluated by the API server in the cluster tests) --------------


def squash(text: str) -> str:
    """Without whitespace: folded YAML scalars may break a rule over lines."""
    return re.sub(r"\s+", "", text)


def rules_at(root: dict[str, Any], where: str) -> list[dict[str, Any]]:
    node = root
    for part in filter(None, where.split(".")):
        node = node["items"] if part == "items" else node["properties"][part]
    return list(node.get("x-kubernetes-validations", []))


CEL_RULES = [
    ("", "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')", "DNS-1035 label"),
    ("", "size(self.metadata.name) <= 55", "at most 55 characters"),
    ("", "size(string(p.port)) <= 58", "too long for these ports"),
    ("spec", "self.minReplicas <= self.maxReplicas", "maxReplicas must be greater than or"),
    (
        "spec.ports",
        "self.all(p, self.exists_one(q, q.port == p.port && q.protocol == p.protocol))",
        "port+protocol pair may appear only once",
    ),
    ("spec.dnsName", "!self.matches('[.][0-9]+$')", "not an IP address"),
    ("spec.ipOverride", "self.all(a, self.exists_one(b, b == a))", "address twice"),
    ("spec.dnsName", "!self.endsWith('.localhost')", "localhost name"),
    ("spec.dnsName", "'metadata.google.internal'", "cloud metadata server"),
    ("spec.ipOverride.items", "isIP(self)", "plain IP addresses"),
    ("spec.ipOverride.items", "ip(self).isGlobalUnicast()", "loopback, link-local"),
    ("spec.ipOverride.items", "'fd00:ec2::254'", "cloud metadata server address"),
    ("spec.resources", "== 0", "never overcommits them"),
    ("spec.resources", "'cpu' in self.requests", "hugepages must also"),
    ("spec.resources.limits", "k.startsWith('hugepages-')", "resource names must be"),
    ("spec.resources.requests", "k.startsWith('hugepages-')", "resource names must be"),
    ("spec.resources.limits", ".isInteger()", "whole numbers"),
    ("spec.resources.requests", ".isInteger()", "whole numbers"),
]


@pytest.mark.parametrize(
    ("where", "rule", "message"),
    CEL_RULES,
    ids=[
        "name-dns1035",
        "name-length",
        "name-port-names",
        "min-le-max",
        "unique-ports",
        "dnsname-not-ip",
        "unique-ips",
        "dnsname-not-localhost",
        "dnsname-not-metadata",
        "ip-plain",
        "ip-global-unicast",
        "ip-not-metadata",
        "no-overcommit",
        "hugepages-need-cpu-or-memory",
        "limit-names",
        "request-names",
        "limit-extended-whole",
        "request-extended-whole",
    ],
)
def test_cel_rule(root_schema: dict[str, Any], where: str, rule: str, message: str) -> None:
    rules = rules_at(root_schema, where)
    matching = [r for r in rules if squash(rule) in squash(r["rule"])]
    assert matching, f"no rule {rule!r} at {where or '<root>'}: {[r['rule'] for r in rules]}"
    assert message in matching[0]["message"]


def all_cel_messages(root: dict[str, Any]) -> list[str]:
    return [
        " ".join(r["message"].split())
        for _, node in schema_nodes(root)
        for r in node.get("x-kubernetes-validations", [])
    ]


# --- status -----------------------------------------------------------------------------


def test_status_schema(status_schema: dict[str, Any]) -> None:
    props = status_schema["properties"]
    assert set(props) >= {
        "observedGeneration",
        "conditions",
        "clusterIP",
        "readyReplicas",
        "hijackState",
    }
    assert props["observedGeneration"]["type"] == "integer"
    assert props["observedGeneration"]["format"] == "int64"
    assert props["readyReplicas"]["type"] == "integer"
    assert props["clusterIP"]["type"] == "string"
    assert props["hijackState"]["enum"] == ["false", "waiting-for-pods", "true"]


def test_status_conditions_are_metav1_conditions(status_schema: dict[str, Any]) -> None:
    conditions = status_schema["properties"]["conditions"]
    assert conditions["type"] == "array"
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert sorted(item["required"]) == sorted(
        ["type", "status", "reason", "message", "lastTransitionTime"]
    )
    props = item["properties"]
    assert props["status"]["enum"] == ["True", "False", "Unknown"]
    assert props["lastTransitionTime"]["format"] == "date-time"
    assert props["observedGeneration"]["type"] == "integer"


def test_status_condition_validates(validator: jsonschema.Draft7Validator) -> None:
    obj = load_yaml(EXAMPLES / "minimal.yaml")
    obj["status"] = {
        "observedGeneration": 2,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "GatewayReady",
                "message": "3/3 gateway pods ready",
                "lastTransitionTime": "2025-01-01T00:00:00Z",
                "observedGeneration": 2,
            }
        ],
        "clusterIP": "10.96.0.12",
        "readyReplicas": 3,
        "hijackState": "waiting-for-pods",
    }
    assert list(validator.iter_errors(obj)) == []
    obj["status"]["hijackState"] = True  # the YAML-boolean mistake
    assert "type" in [e.validator for e in validator.iter_errors(obj)]


# --- patterns ---------------------------------------------------------------------------


def pattern_of(spec_schema: dict[str, Any], field: str) -> re.Pattern[str]:
    node = spec_schema["properties"][field]
    while "pattern" not in node:
        node = node.get("items") or node["properties"]["requests"]["additionalProperties"]
    return re.compile(node["pattern"])


DNS_NAMES = [
    ("example.com", True),
    ("google.com", True),
    ("a.b", True),
    ("dns.google", True),
    ("api.payments.example.com", True),
    ("xn--bcher-kva.example", True),
    ("1password.com", True),
    ("my-service.eu-west-1.amazonaws.com", True),
    ("a" * 63 + ".com", True),
    ("localhost", False),
    ("Example.com", False),
    ("*.example.com", False),
    ("example.com.", False),
    (".example.com", False),
    ("example..com", False),
    ("-example.com", False),
    ("example-.com", False),
    ("a" * 64 + ".com", False),
    ("exa_mple.com", False),
    ("https://example.com", False),
    ("example.com:443", False),
    ("", False),
]


@pytest.mark.parametrize(("value", "ok"), DNS_NAMES, ids=[v or "<empty>" for v, _ in DNS_NAMES])
def test_dns_name_pattern(spec_schema: dict[str, Any], value: str, ok: bool) -> None:
    assert bool(pattern_of(spec_schema, "dnsName").search(value)) is ok


QUANTITIES = [
    ("100m", True),
    ("1", True),
    ("0.5", True),
    (".5", True),
    ("50Mi", True),
    ("1Gi", True),
    ("2k", True),
    ("1e3", True),
    ("+1", True),
    ("5.", True),
    ("1e-3", True),
    ("1E+99", True),
    ("1e100", False),
    ("1e999999999", False),
    ("lots", False),
    ("NaN", False),
    ("Infinity", False),
    ("1e1.5", False),
    ("1e1234567890", False),
    ("1 ", False),
    ("1_000", False),
    ("1GB", False),
    ("-1", False),
    ("-100m", False),
    ("1 Gi", False),
    ("", False),
]


@pytest.mark.parametrize(("value", "ok"), QUANTITIES, ids=[v or "<empty>" for v, _ in QUANTITIES])
def test_quantity_pattern(spec_schema: dict[str, Any], value: str, ok: bool) -> None:
    assert bool(pattern_of(spec_schema, "resources").search(value)) is ok


@functools.cache
def ip_pattern() -> re.Pattern[str]:
    """The ipOverride item pattern (hypothesis tests cannot take module fixtures)."""
    schema = load_yaml(CRD_PATH)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return re.compile(schema["properties"]["spec"]["properties"]["ipOverride"]["items"]["pattern"])


def is_ip(text: str) -> bool:
    """What ipOverride accepts: an IPv4 or IPv6 address, without a zone index."""
    if "%" in text:
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


IPS = [
    "203.0.113.10",
    "0.0.0.0",
    "255.255.255.255",
    "256.0.0.1",
    "01.2.3.4",
    "1.2.3",
    "1.2.3.4.5",
    "203.0.113.0/24",
    "::",
    "::1",
    "2001:db8::10",
    "2001:DB8::10",
    "2001:0db8:0000:0000:0000:0000:0000:0010",
    "1:2:3:4:5:6:7:8",
    "1:2:3:4:5:6:7:8:9",
    "1::2::3",
    ":::",
    "1:2:3:4:5:6:7::",
    "::2:3:4:5:6:7:8",
    "::ffff:203.0.113.10",
    "1:2:3:4:5:6:1.2.3.4",
    "1::1.2.3.4",
    "fe80::1%eth0",
    "12345::",
    "g::1",
    "api.example.com",
    " 203.0.113.10",
]


@pytest.mark.parametrize("value", IPS, ids=IPS)
def test_ip_pattern_examples(spec_schema: dict[str, Any], value: str) -> None:
    assert bool(pattern_of(spec_schema, "ipOverride").search(value)) is is_ip(value)


@settings(max_examples=300, deadline=None)
@given(addr=st.ip_addresses())
def test_ip_pattern_accepts_every_address(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    pattern = ip_pattern()
    forms = {str(addr), addr.exploded, str(addr).upper()}
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        forms.add(f"::ffff:{addr.ipv4_mapped}")
    for text in forms:
        assert pattern.search(text), text


@settings(max_examples=500, deadline=None)
@given(text=st.text(alphabet="0123456789abcdefABCDEF:.", max_size=45))
def test_ip_pattern_agrees_with_ipaddress(text: str) -> None:
    pattern = ip_pattern()
    assert bool(pattern.search(text)) is is_ip(text)


# --- examples ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", REQUIRED_EXAMPLES, ids=[Path(n).stem for n in REQUIRED_EXAMPLES])
def test_required_example_exists(name: str) -> None:
    assert (EXAMPLES / name).is_file()


@pytest.mark.parametrize("path", VALID_FILES, ids=ids(VALID_FILES))
def test_example_is_valid(validator: jsonschema.Draft7Validator, path: Path) -> None:
    obj = load_yaml(path)
    assert obj["apiVersion"] == "egress.monzo.com/v1"
    assert obj["kind"] == "ExternalService"
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
    assert errors == []
    # What the CRD's CEL rules would say, so that `make run` only ever shows valid objects.
    name = obj["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    assert len(name) <= 55
    ports = obj["spec"]["ports"]
    pairs = [(p["port"], p.get("protocol", "TCP")) for p in ports]
    assert len(pairs) == len(set(pairs))
    assert all(len(f"{name}-{proto.lower()}-{port}") <= 63 for port, proto in pairs)
    spec = obj["spec"]
    assert spec.get("minReplicas", 3) <= spec.get("maxReplicas", 12)


def test_google_example_is_the_original_readme_example() -> None:
    spec = load_yaml(EXAMPLES / "google-tcp.yaml")["spec"]
    assert spec == {
        "dnsName": "google.com",
        "hijackDns": True,
        "ports": [{"port": 443, "protocol": "TCP"}],
        "minReplicas": 5,
        "maxReplicas": 10,
        "targetCPUUtilizationPercentage": 30,
        "resources": {
            "requests": {"cpu": 1, "memory": "100Mi"},
            "limits": {"cpu": 2, "memory": "200Mi"},
        },
    }


def test_examples_cover_every_spec_field() -> None:
    used: set[str] = set()
    for path in VALID_FILES:
        used |= set(load_yaml(path)["spec"])
    assert used == set(SPEC_FIELDS)


def test_example_names_are_unique() -> None:
    names = [load_yaml(p)["metadata"]["name"] for p in VALID_FILES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("path", INVALID_FILES, ids=ids(INVALID_FILES))
def test_invalid_example_declares_its_expectation(path: Path) -> None:
    assert header(path, "expect-field"), f"{path.name}: no '# expect-field:' comment"
    if path.name.startswith("cel-"):
        assert header(path, "expect-message"), f"{path.name}: no '# expect-message:' comment"
    obj = load_yaml(path)
    assert obj["apiVersion"] == "egress.monzo.com/v1"
    assert obj["kind"] == "ExternalService"


@pytest.mark.parametrize("path", SCHEMA_INVALID_FILES, ids=ids(SCHEMA_INVALID_FILES))
def test_invalid_example_is_rejected_by_the_schema(
    validator: jsonschema.Draft7Validator, path: Path
) -> None:
    errors = list(validator.iter_errors(load_yaml(path)))
    assert errors, f"{path.name} passes the schema (if only CEL refuses it, name it cel-*.yaml)"
    expected = header(path, "expect-field")
    reported = set().union(*(error_fields(e) for e in errors))
    assert expected in reported, f"{path.name}: errors on {sorted(reported)}, not {expected}"


@pytest.mark.parametrize("path", CEL_ONLY_FILES, ids=ids(CEL_ONLY_FILES))
def test_cel_only_example_passes_the_schema(
    validator: jsonschema.Draft7Validator, root_schema: dict[str, Any], path: Path
) -> None:
    errors = [e.message for e in validator.iter_errors(load_yaml(path))]
    assert errors == [], f"{path.name} is named cel-* but the schema already refuses it"
    message = header(path, "expect-message")
    assert message is not None
    assert any(message in m for m in all_cel_messages(root_schema)), message
    field = header(path, "expect-field")
    where = "" if field == "<root>" else str(field)
    assert rules_at(root_schema, where), f"{path.name}: no CEL rule at {field}"


def test_every_cel_rule_has_a_cel_example(root_schema: dict[str, Any]) -> None:
    expected = {header(p, "expect-message") for p in CEL_ONLY_FILES}
    expected |= {h.crd_message for h in HOSTILE if h.cel}
    for message in all_cel_messages(root_schema):
        assert any(e and e in message for e in expected), f"no cel-*.yaml for: {message}"


# --- the translation itself can fail ----------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda s: s.pop("dnsName"), "spec.dnsName"),
        (lambda s: s["ports"][0].update(port=70000), "spec.ports[0].port"),
        (lambda s: s["ports"][0].update(protocol="SCTP"), "spec.ports[0].protocol"),
        (lambda s: s.update(typo=True), "spec.typo"),
        (lambda s: s.update(resources={"limits": {"cpu": "fast"}}), "spec.resources.limits.cpu"),
        (lambda s: s.update(resources={"limits": {"cpu": 1.5}}), "spec.resources.limits.cpu"),
        (lambda s: s.update(ipOverride=["2001:db8::1::2"]), "spec.ipOverride[0]"),
        (lambda s: s.update(minReplicas="3"), "spec.minReplicas"),
    ],
    ids=[
        "no-dns-name",
        "port-range",
        "protocol",
        "unknown-field",
        "quantity",
        "float-quantity",
        "bad-ipv6",
        "string-int",
    ],
)
def test_mutated_minimal_example_is_rejected(
    validator: jsonschema.Draft7Validator, mutate: Any, field: str
) -> None:
    obj = load_yaml(EXAMPLES / "minimal.yaml")
    assert list(validator.iter_errors(obj)) == []
    mutate(obj["spec"])
    reported = set().union(*(error_fields(e) for e in validator.iter_errors(obj)))
    assert field in reported, sorted(reported)


# --- the reconciler agrees (it validates again: objects can predate this CRD) ------------


@pytest.mark.parametrize(
    "path",
    VALID_FILES + INVALID_FILES,
    ids=ids(VALID_FILES) + ["invalid-" + p.stem for p in INVALID_FILES],
)
def test_reconciler_agrees_with_the_crd(path: Path) -> None:
    from core.spec import InvalidExternalService, parse_external_service

    obj = load_yaml(path)
    if path.parent == INVALID:
        with pytest.raises(InvalidExternalService):
            parse_external_service(obj)
    else:
        parse_external_service(obj)


# --- hostile tenants: the same table as the reconciler's tests and the API server's -------


@pytest.mark.parametrize("case", [h for h in HOSTILE if not h.cel], ids=lambda h: h.id)
def test_hostile_object_is_refused_by_the_schema(
    validator: jsonschema.Draft7Validator, case: Hostile
) -> None:
    errors = list(validator.iter_errors(case.manifest()))
    reported = set().union(*(error_fields(e) for e in errors)) if errors else set()
    assert case.crd_field in reported, f"{case.id}: errors on {sorted(reported)}"


@pytest.mark.parametrize("case", [h for h in HOSTILE if h.cel], ids=lambda h: h.id)
def test_hostile_cel_case_passes_the_schema_and_names_a_rule(
    validator: jsonschema.Draft7Validator, root_schema: dict[str, Any], case: Hostile
) -> None:
    errors = [e.message for e in validator.iter_errors(case.manifest())]
    assert errors == [], f"{case.id} is marked cel but the schema already refuses it"
    assert any(case.crd_message in m for m in all_cel_messages(root_schema)), case.crd_message


def _cel_strings(rules: list[dict[str, Any]], needle: str) -> set[str]:
    """The quoted strings of the rule that contains ``needle``."""
    (rule,) = [r["rule"] for r in rules if needle in r["rule"]]
    return set(re.findall(r"'([^']*)'", rule))


def test_crd_refuses_the_reconcilers_metadata_names(root_schema: dict[str, Any]) -> None:
    names = _cel_strings(rules_at(root_schema, "spec.dnsName"), "metadata.google.internal")
    regional = {n for n in names if n.startswith("^")}
    multi_label = {n for n in parser.METADATA_DNS_NAMES if "." in n}
    assert names - regional == multi_label
    # Single labels never pass the dnsName pattern.
    pattern = pattern_of(root_schema["properties"]["spec"], "dnsName")
    assert not any(pattern.search(n) for n in parser.METADATA_DNS_NAMES - multi_label)
    (regex,) = regional
    assert re.fullmatch(regex.strip("^$"), "instance-data.eu-west-1.compute.internal")
    assert parser.is_metadata_name("instance-data.eu-west-1.compute.internal")


def test_crd_refuses_the_reconcilers_metadata_addresses(root_schema: dict[str, Any]) -> None:
    addresses = _cel_strings(rules_at(root_schema, "spec.ipOverride.items"), "fd00:ec2::254")
    assert {ipaddress.ip_address(a) for a in addresses} == parser.METADATA_ADDRESSES
    # CEL compares ip(self) as text: the list must be in canonical form.
    assert all(str(ipaddress.ip_address(a)) == a for a in addresses)


def test_crd_bounds_match_the_reconcilers(spec_schema: dict[str, Any]) -> None:
    resources = spec_schema["properties"]["resources"]["properties"]
    for key in ("requests", "limits"):
        assert resources[key]["maxProperties"] == parser.MAX_RESOURCE_NAMES
        assert resources[key]["additionalProperties"]["maxLength"] == parser.MAX_QUANTITY_LENGTH
    for key in ("minReplicas", "maxReplicas"):
        assert spec_schema["properties"][key]["maximum"] == parser.MAX_INT32


@functools.cache
def quantity_pattern() -> re.Pattern[str]:
    schema = load_yaml(CRD_PATH)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    limits = schema["properties"]["spec"]["properties"]["resources"]["properties"]["limits"]
    return re.compile(limits["additionalProperties"]["pattern"])


def _parser_accepts(text: str) -> bool:
    try:
        parser.quantity_value(text)
    except ValueError:
        return False
    return True


@settings(max_examples=1000, deadline=None)
@given(text=st.text(alphabet="0123456789.+-eEKMGTPinumk \n", max_size=14))
def test_quantity_pattern_agrees_with_the_reconciler(text: str) -> None:
    """Same grammar in both places; the CRD also refuses a sign of '-' outright."""
    crd = bool(quantity_pattern().fullmatch(text)) and len(text) <= parser.MAX_QUANTITY_LENGTH
    assert crd is (_parser_accepts(text) and not text.startswith("-")), repr(text)
