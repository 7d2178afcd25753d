"""`egressctl render` and `egressctl validate`: the pure core, on files, with no cluster.

``render`` prints what the reconciler would apply for objects that do not exist yet: hijack state
``waiting-for-pods`` (or ``false``) and no ownerReference, since neither pods nor a UID exist.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import yaml

from core.hijack import next_hijack_state
from core.settings import Settings, SettingsError
from core.spec import (
    DEFAULT_CEILINGS,
    Ceilings,
    ExternalService,
    InvalidExternalService,
    parse_external_service,
)
from core.yamlio import dump_all
from gateway.render import render

EXIT_OK = 0
EXIT_INVALID = 2


@dataclass(frozen=True, slots=True)
class Parsed:
    source: str
    index: int
    service: ExternalService | None
    error: InvalidExternalService | None


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "render",
        help="print the gateway objects for ExternalService manifests",
        description="Render ExternalService YAML (multi-document; '-' for stdin) to the "
        "objects a cluster must hold, as multi-document YAML in apply order. "
        "Exit 2 if any object is invalid.",
    )
    p.add_argument("files", nargs="*", default=["-"], metavar="FILE")
    p.set_defaults(func=cmd_render)
    v = subparsers.add_parser("validate", help="check ExternalService manifests without rendering")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=cmd_validate)


def _documents(source: str) -> Iterator[tuple[int, Any]]:
    if source == "-":
        text = sys.stdin.read()
    else:
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    for index, doc in enumerate(yaml.safe_load_all(text)):
        if doc is not None:
            yield index, doc


def parse_files(
    sources: list[str], err: TextIO, ceilings: Ceilings = DEFAULT_CEILINGS
) -> tuple[list[Parsed], bool]:
    """Parse every document; report unreadable files on ``err``. Returns (parsed, all_readable)."""
    parsed: list[Parsed] = []
    readable = True
    for source in sources:
        try:
            for index, doc in _documents(source):
                try:
                    parsed.append(
                        Parsed(source, index, parse_external_service(doc, ceilings), None)
                    )
                except InvalidExternalService as exc:
                    parsed.append(Parsed(source, index, None, exc))
        except (OSError, yaml.YAMLError) as exc:
            print(f"error: {source}: {exc}", file=err)
            readable = False
    return parsed, readable


def _report(item: Parsed, err: TextIO) -> None:
    assert item.error is not None
    who = f"ExternalService/{item.error.name}" if item.error.name else f"document {item.index}"
    for field_error in item.error.errors:
        print(f"error: {item.source}: {who}: {field_error}", file=err)


def _settings(err: TextIO) -> Settings | None:
    try:
        return Settings.from_env(os.environ)
    except SettingsError as exc:
        print(f"error: {exc}", file=err)
        return None


def cmd_render(args: argparse.Namespace) -> int:
    settings = _settings(sys.stderr)
    if settings is None:
        return EXIT_INVALID
    parsed, ok = parse_files(args.files, sys.stderr, settings.ceilings)
    objects: list[dict[str, Any]] = []
    for item in parsed:
        if item.service is None:
            _report(item, sys.stderr)
            ok = False
            continue
        state = next_hijack_state(item.service.spec.hijack_dns, ready=False, previous=None)
        objects.extend(render(item.service, settings, state))
    if objects:
        sys.stdout.write(dump_all(objects))
    return EXIT_OK if ok else EXIT_INVALID


def cmd_validate(args: argparse.Namespace) -> int:
    settings = _settings(sys.stderr)
    if settings is None:
        return EXIT_INVALID
    parsed, ok = parse_files(args.files, sys.stderr, settings.ceilings)
    for item in parsed:
        if item.service is None:
            _report(item, sys.stderr)
            ok = False
        else:
            print(f"{item.source}: ExternalService/{item.service.name}: valid")
    return EXIT_OK if ok else EXIT_INVALID
