"""Add our ``import`` line (and ``reload 2s``) to a Corefile, once, touching nothing else.

The Corefile belongs to the cluster: we never rewrite it, only insert missing lines just before
the closing brace of the server block that serves the cluster domain, keeping every other line
and comment byte for byte. Running it again changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# CoreDNS's shortest reload interval (its default is 30 s ± 15 s). Checking costs one read and
# hash of the Corefile and the imported files; a change swaps the config in process.
RELOAD_LINE = "reload 2s"

_BLOCK_START = re.compile(r"^\s*([^#{}\s][^#{}]*?)\s*\{\s*(#.*)?$")


@dataclass(frozen=True, slots=True)
class CorefileCheck:
    has_import: bool
    has_reload: bool
    server_block_found: bool

    @property
    def ok(self) -> bool:
        return self.has_import and self.has_reload


def _strip_comment(line: str) -> str:
    return line.split("#", 1)[0]


def _server_block(lines: list[str], cluster_domain: str) -> tuple[int, int] | None:
    """(start, end) lines of the server block whose ``kubernetes`` plugin serves the domain."""
    depth = 0
    start = -1
    found = False
    for i, line in enumerate(lines):
        code = _strip_comment(line)
        if depth == 0 and _BLOCK_START.match(line):
            start = i
            found = False
        if depth == 1 and re.match(
            rf"^\s*kubernetes\s+(.*\s)?{re.escape(cluster_domain)}(\s|$)", code
        ):
            found = True
        depth += code.count("{") - code.count("}")
        if depth == 0 and start >= 0 and "}" in code:
            if found:
                return start, i
            start = -1
    return None


def check(corefile: str, import_line: str, cluster_domain: str) -> CorefileCheck:
    lines = corefile.splitlines()
    block = _server_block(lines, cluster_domain)
    if block is None:
        return CorefileCheck(False, False, False)
    body = [_strip_comment(line).strip() for line in lines[block[0] + 1 : block[1]]]
    return CorefileCheck(
        has_import=import_line.strip() in body,
        has_reload=any(line == "reload" or line.startswith("reload ") for line in body),
        server_block_found=True,
    )


def ensure_import(corefile: str, import_line: str, cluster_domain: str) -> str:
    """The Corefile with ``import_line`` and ``reload`` present in the cluster's server block.

    Returns the input unchanged when both are there; raises ValueError when no server block
    serves the cluster domain (nothing is guessed).
    """
    lines = corefile.splitlines(keepends=True)
    block = _server_block([line.rstrip("\n") for line in lines], cluster_domain)
    if block is None:
        raise ValueError(f"no server block with 'kubernetes {cluster_domain}' in the Corefile")
    status = check(corefile, import_line, cluster_domain)
    if status.ok:
        return corefile
    start, end = block
    indent = "    "
    for line in lines[start + 1 : end]:
        stripped = line.lstrip()
        if stripped.strip():
            indent = line[: len(line) - len(stripped)]
            break
    added = []
    if not status.has_import:
        added.append(f"{indent}{import_line.strip()}\n")
    if not status.has_reload:
        added.append(f"{indent}{RELOAD_LINE}\n")
    return "".join(lines[:end] + added + lines[end:])
