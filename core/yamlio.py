"""Deterministic YAML text for manifests and Envoy configs.

Multi-line strings (envoy.yaml inside its ConfigMap, access-log formats) are written as literal
blocks so that rendered manifests stay readable and diffable; everything else is PyYAML's
safe dumper with insertion order kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

# libyaml's emitter is ~10x faster than the pure-Python one and emits the same text.
_Base: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Dumper(_Base):  # type: ignore[valid-type,misc]
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=4096)


def dump_all(objs: Iterable[Any]) -> str:
    return yaml.dump_all(
        objs,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        width=4096,
        explicit_start=True,
    )
