"""The installed Google Cloud SDK, when there is one, as a test oracle that needs no network.

Why: a deploy file and a setup script are only ever run for real in a user's project, so a flag
gcloud does not know, or an upload that takes more than we think, would be found there. When
``gcloud`` is installed, the tests ask it instead of our reading of its documentation:

- ``help_text`` runs ``gcloud GROUP ... COMMAND --help`` (cached per command) so that every
  flag our files pass can be looked up in what that very version accepts;
- ``function_upload`` runs the SDK's own ``CreateSourcesZipFile`` (what ``gcloud functions
  deploy --source`` zips and uploads) in the SDK's Python and returns the archive's entries;
- ``build_upload`` runs the SDK's own file chooser for ``gcloud builds submit``.

Without gcloud these return None and the callers skip only the comparison with gcloud; the
checks that model the rules themselves (``gcloudignore``) always run.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pathspec


@functools.cache
def sdk_root() -> Path | None:
    gcloud = shutil.which("gcloud")
    if not gcloud:
        return None
    root = Path(gcloud).resolve().parent.parent
    return root if (root / "lib" / "googlecloudsdk").is_dir() else None


@functools.cache
def sdk_version() -> str | None:
    root = sdk_root()
    if root is None or not (root / "VERSION").is_file():
        return None
    return (root / "VERSION").read_text().strip()


def _sdk_python(root: Path) -> str:
    bundled = root / "platform" / "bundledpythonunix" / "bin" / "python3"
    return os.environ.get("CLOUDSDK_PYTHON") or (
        str(bundled) if bundled.is_file() else sys.executable
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


REPO = Path(__file__).resolve().parents[2]


@functools.cache
def help_text(command: tuple[str, ...]) -> str | None:
    """``gcloud COMMAND --help`` as plain text; None without gcloud. Raises if gcloud refuses
    the command itself (an unknown group or command). Kept in .cache/gcloud-help/VERSION/, as
    each takes a second or more and the text depends on the version only."""
    if sdk_root() is None:
        return None
    cached = REPO / ".cache" / "gcloud-help" / (sdk_version() or "unknown") / "-".join(command)
    if cached.is_file():
        return cached.read_text()
    res = subprocess.run(
        ["gcloud", *command, "--help"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "CLOUDSDK_CORE_DISABLE_PROMPTS": "1", "PAGER": "cat"},
        timeout=120,
    )
    if res.returncode != 0:
        raise AssertionError(f"gcloud {' '.join(command)} --help failed: {res.stderr.strip()}")
    text = _ANSI.sub("", res.stdout)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(text)
    return text


def accepted_flags(command: tuple[str, ...]) -> set[str] | None:
    """Every ``--flag`` the help of COMMAND names (its own flags, negations and gcloud-wide
    flags); None without gcloud."""
    text = help_text(command)
    if text is None:
        return None
    flags = set(re.findall(r"--(?:\[no-\])?[a-z0-9][a-z0-9-]*", text))
    out: set[str] = set()
    for f in flags:
        if f.startswith("--[no-]"):
            name = f.removeprefix("--[no-]")
            out |= {f"--{name}", f"--no-{name}"}
        else:
            out.add(f)
    # gcloud-wide flags are listed by name only in the help's last section.
    wide = text.split("GCLOUD WIDE FLAGS", 1)[-1]
    out |= {"--" + w for w in re.findall(r"--([a-z][a-z0-9-]*)", wide)}
    return out


_PROBE = """
import json, os, sys, tempfile, zipfile
root, mode, source, ignore = sys.argv[1:5]
sys.path[:0] = [os.path.join(root, "lib"), os.path.join(root, "lib", "third_party")]
if mode == "function":
    from googlecloudsdk.command_lib.functions import source_util
    with tempfile.TemporaryDirectory() as tmp:
        path = source_util.CreateSourcesZipFile(tmp, source, ignore or None)
        with zipfile.ZipFile(path) as zf:
            entries = {i.filename: i.file_size for i in zf.infolist() if not i.is_dir()}
        print(json.dumps({"archive_bytes": os.path.getsize(path), "files": entries}))
else:
    from googlecloudsdk.command_lib.util import gcloudignore
    chooser = gcloudignore.GetFileChooserForDir(source, write_on_disk=False)
    entries = {}
    for rel in chooser.GetIncludedFiles(source, include_dirs=False):
        entries[rel.replace(os.sep, "/")] = os.path.getsize(os.path.join(source, rel))
    print(json.dumps({"archive_bytes": None, "files": entries}))
"""


def _probe(mode: str, source: Path, ignore_file: str | None) -> tuple[int | None, dict[str, int]]:
    root = sdk_root()
    assert root is not None
    res = subprocess.run(
        [_sdk_python(root), "-c", _PROBE, str(root), mode, str(source), ignore_file or ""],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    return out["archive_bytes"], dict(out["files"])


def function_upload(source: Path, ignore_file: str) -> tuple[int, dict[str, int]] | None:
    """(zip size, {path: size}) of what ``gcloud functions deploy --source=SOURCE
    --ignore-file=IGNORE_FILE`` uploads, computed by the SDK itself; None without gcloud."""
    if sdk_root() is None:
        return None
    size, files = _probe("function", source, ignore_file)
    assert size is not None
    return size, files


def build_upload(source: Path) -> dict[str, int] | None:
    """{path: size} of what ``gcloud builds submit SOURCE`` uploads, by the SDK; None without
    gcloud."""
    if sdk_root() is None:
        return None
    return _probe("build", source, None)[1]


# -- the rules themselves ------------------------------------------------------------------


def ignore_lines(ignore_file: Path) -> list[str]:
    """The file's lines with ``#!include:FILE`` replaced by FILE's lines (gcloud reads only
    files in the same directory, one level deep)."""
    out: list[str] = []
    for line in ignore_file.read_text().splitlines():
        if line.startswith("#!include:"):
            included = ignore_file.parent / line.removeprefix("#!include:").strip()
            assert included.parent == ignore_file.parent, line
            out += [x for x in included.read_text().splitlines() if not x.startswith("#!")]
        else:
            out.append(line)
    return out


def gcloudignore(source: Path, ignore_file: Path | None) -> dict[str, int]:
    """{path: size} of the files under SOURCE that the ignore file keeps, by gitignore rules
    (pathspec's GitIgnoreSpec; gcloudignore follows gitignore): walk the tree, skip ignored
    directories entirely (a file under one cannot be re-included), keep files not matched."""
    spec = pathspec.GitIgnoreSpec.from_lines(ignore_lines(ignore_file) if ignore_file else [])
    out: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
        rel = Path(dirpath).relative_to(source)
        dirnames[:] = sorted(d for d in dirnames if not spec.match_file(f"{(rel / d).as_posix()}/"))
        for name in filenames:
            path = (rel / name).as_posix()
            if not spec.match_file(path):
                out[path] = (Path(dirpath) / name).stat().st_size
    return out


# -- gcloud invocations in files -----------------------------------------------------------


@functools.cache
def command_tree() -> dict[str, Any] | None:
    """The SDK's static command tree (groups, commands), to tell a command's path from its
    positional arguments; None without gcloud."""
    root = sdk_root()
    tree_file = root / "data" / "cli" / "gcloud_completions.py" if root else None
    if tree_file is None or not tree_file.is_file():
        return None
    namespace: dict[str, Any] = {}
    exec(compile(tree_file.read_text(), str(tree_file), "exec"), namespace)  # the SDK's own data
    tree: dict[str, Any] = namespace["STATIC_COMPLETION_CLI_TREE"]
    return tree


# Flags gcloud parses but leaves out of --help: every `gcloud functions` command still takes
# --gen2 (528.0.0 answers `functions describe NAME --gen2` with an authentication error, not
# "unrecognized arguments"), and the guides' commands use it to say which generation is meant.
HIDDEN_FLAGS = {"functions": {"--gen2"}}

_TERMINATORS = {")", ";", ";;", "&", "&&", "|", "||", ">", ">>", "<", "<<", ">&", "`"}


def build_invocations(build: dict[str, Any]) -> list[list[str]]:
    """Every `gcloud ...` a Cloud Build config runs: gcloud steps' args, and commands in bash
    steps."""
    out: list[list[str]] = []
    for step in build["steps"]:
        args = [str(a) for a in step.get("args", [])]
        if step.get("entrypoint") == "gcloud":
            out.append(args)
        elif step.get("entrypoint") == "bash":
            out += shell_invocations(args[-1])
    return out


def shell_invocations(script: str) -> list[list[str]]:
    """The argument lists of every `gcloud ...` command in a shell script (continuation lines
    joined, comments dropped, a command ending at `)`, `;`, `&&`, `||`, `|` or a redirection)."""
    out: list[list[str]] = []
    pending = ""
    for line in re.sub(r"\\\n", " ", script).splitlines():
        pending += line + "\n"
        lexer = shlex.shlex(pending, posix=True, punctuation_chars=";&|()<>`")
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:  # a quote spans lines: read on
            continue
        pending = ""
        for i, token in enumerate(tokens):
            if token != "gcloud":
                continue
            args: list[str] = []
            for t in tokens[i + 1 :]:
                if t in _TERMINATORS:
                    break
                args.append(t)
            out.append(args)
    return out


def markdown_invocations(text: str) -> list[list[str]]:
    """`gcloud ...` commands in a Markdown file's sh/bash code blocks."""
    blocks = re.findall(r"```(?:sh|bash|shell)\n(.*?)```", text, flags=re.S)
    return [args for block in blocks for args in shell_invocations(block)]


def check_invocation(args: list[str]) -> list[str]:
    """Problems with one `gcloud ARGS...` as the installed gcloud sees it: the command path must
    be a command (not a group), and every --flag must appear in that command's --help."""
    tree = command_tree()
    if tree is None:
        return []
    node, path = tree, []
    for arg in args:
        if arg.startswith("-") or arg not in node.get("commands", {}):
            break
        node = node["commands"][arg]
        path.append(arg)
    shown = " ".join(["gcloud", *args])
    if not path or node.get("commands"):
        return [f"`{shown}`: `gcloud {' '.join(path)}` is not a command"]
    flags = (accepted_flags(tuple(path)) or set()) | HIDDEN_FLAGS.get(path[0], set())
    unknown = sorted({a.split("=", 1)[0] for a in args if a.startswith("--")} - flags)
    return [f"`{shown}`: {f} is not in `gcloud {' '.join(path)} --help`" for f in unknown]


# -- a fake gcloud, for running scripts that call it -----------------------------------------

FAKE_GCLOUD = r"""#!PYTHON -IS
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as fh:
    fh.write(json.dumps(args) + "\n")
words = " ".join(a for a in args if not a.startswith("-"))
for key, (code, out) in json.loads(os.environ.get("FAKE_GCLOUD_ANSWERS", "{}")).items():
    prefix = " ".join(k for k in key.split() if not k.startswith("-"))
    if words.startswith(prefix) and all(k in args for k in key.split() if k.startswith("-")):
        sys.stdout.write(out)
        sys.exit(code)
# Unknown resources: describe fails as gcloud does (NOT_FOUND); everything else succeeds.
sys.exit(1 if "describe" in args else 0)
"""


def run_with_fake_gcloud(
    argv: list[str],
    tmp: Path,
    answers: dict[str, tuple[int, str]],
    env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    """Run ARGV with a fake `gcloud` first on PATH: it records every call and answers a call
    whose words (flags left out) start with a key of ANSWERS, and which has every --flag=value
    of the key, with (exit code, stdout), the first such key winning; other `describe` calls
    fail (not found), everything else succeeds silently."""
    bin_dir = tmp / "fake-gcloud-bin"
    bin_dir.mkdir(exist_ok=True)
    # -IS: no site packages to scan on each of the script's many calls.
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.replace("PYTHON", sys.executable, 1))
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp / "fake-gcloud.log"
    log.unlink(missing_ok=True)
    full_env = {
        **os.environ,
        **(env or {}),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_GCLOUD_LOG": str(log),
        "FAKE_GCLOUD_ANSWERS": json.dumps(answers),
    }
    res = subprocess.run(
        argv, env=full_env, capture_output=True, text=True, check=False, timeout=120
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return res, calls
