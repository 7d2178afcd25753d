"""OCI image archives for the dev cluster: structure, digests, reproducibility and specs."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest

from egressctl.devstack import images
from egressctl.devstack.images import ImageSpec
from egressctl.devstack.procs import DevStackError


def read_archive(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        out: dict[str, bytes] = {}
        for m in tar:
            if m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
        return out


def blob(files: dict[str, bytes], digest: str) -> bytes:
    data = files["blobs/sha256/" + digest.removeprefix("sha256:")]
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    return data


def open_image(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], bytes]:
    """index, manifest, config and layer of an archive, checking every digest and size."""
    files = read_archive(path)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    [desc] = index["manifests"]
    manifest_raw = blob(files, desc["digest"])
    assert desc["size"] == len(manifest_raw)
    manifest = json.loads(manifest_raw)
    config_raw = blob(files, manifest["config"]["digest"])
    assert manifest["config"]["size"] == len(config_raw)
    config = json.loads(config_raw)
    [layer_desc] = manifest["layers"]
    layer = blob(files, layer_desc["digest"])
    assert layer_desc["size"] == len(layer)
    return index, manifest, config, layer


def layer_members(layer: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        return {m.name: m for m in tar.getmembers()}


def small_spec(tmp_path: Path, content: bytes = b"#!/bin/sh\necho hi\n") -> ImageSpec:
    src = tmp_path / "tool"
    src.write_bytes(content)
    return ImageSpec(
        ref="egress-dev.local/test:1",
        files=(
            ("/usr/bin/tool", src, 0o755),
            ("/etc/motd", b"hello\n", 0o644),
        ),
        symlinks=(("/bin/t", "../usr/bin/tool"),),
        dirs=(("/tmp", 0o1777), ("/var/empty", 0o700)),
        entrypoint=("/usr/bin/tool",),
        cmd=("--flag",),
        env=("PATH=/usr/bin", "A=b"),
    )


def test_archive_structure_and_digests(tmp_path: Path) -> None:
    spec = small_spec(tmp_path)
    digest = images.write_oci_archive(spec, tmp_path / "img.tar")
    index, manifest, config, layer = open_image(tmp_path / "img.tar")

    [desc] = index["manifests"]
    assert desc["digest"] == digest
    assert desc["mediaType"] == images.MEDIA_MANIFEST == manifest["mediaType"]
    assert desc["annotations"] == {
        "io.containerd.image.name": "egress-dev.local/test:1",
        "org.opencontainers.image.ref.name": "1",
    }
    assert index["schemaVersion"] == manifest["schemaVersion"] == 2
    assert manifest["config"]["mediaType"] == images.MEDIA_CONFIG
    assert manifest["layers"][0]["mediaType"] == images.MEDIA_LAYER
    assert config["architecture"] == "amd64"
    assert config["os"] == "linux"
    # Uncompressed layer: its diff_id is its own digest.
    assert config["rootfs"] == {
        "type": "layers",
        "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()],
    }
    assert config["config"] == {
        "Entrypoint": ["/usr/bin/tool"],
        "Cmd": ["--flag"],
        "Env": ["PATH=/usr/bin", "A=b"],
        "WorkingDir": "/",
    }
    assert images.archive_image(tmp_path / "img.tar") == ("egress-dev.local/test:1", digest)


def test_layer_holds_files_modes_symlinks_and_parents(tmp_path: Path) -> None:
    images.write_oci_archive(small_spec(tmp_path), tmp_path / "img.tar")
    _, _, _, layer = open_image(tmp_path / "img.tar")
    members = layer_members(layer)
    names = list(members)
    # Parents before children, nothing absolute, nothing else.
    assert names == [
        "bin",
        "bin/t",
        "etc",
        "etc/motd",
        "tmp",
        "usr",
        "usr/bin",
        "usr/bin/tool",
        "var",
        "var/empty",
    ]
    assert members["bin/t"].issym() and members["bin/t"].linkname == "../usr/bin/tool"
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
    assert members["var/empty"].mode == 0o700
    assert members["usr/bin"].isdir() and members["usr/bin"].mode == 0o755
    assert members["usr/bin/tool"].mode == 0o755 and members["usr/bin/tool"].size == 18
    assert members["etc/motd"].mode == 0o644
    for m in members.values():
        assert (m.uid, m.gid, m.mtime, m.uname, m.gname) == (0, 0, 0, "", "")
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        f = tar.extractfile("etc/motd")
        assert f is not None and f.read() == b"hello\n"


def test_reproducible(tmp_path: Path) -> None:
    spec = small_spec(tmp_path)
    a = images.write_oci_archive(spec, tmp_path / "a.tar")
    b = images.write_oci_archive(spec, tmp_path / "b.tar")
    assert a == b
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    # Listing order in the spec does not matter; content does.
    shuffled = ImageSpec(
        ref=spec.ref,
        files=tuple(reversed(spec.files)),
        symlinks=spec.symlinks,
        dirs=tuple(reversed(spec.dirs)),
        entrypoint=spec.entrypoint,
        cmd=spec.cmd,
        env=spec.env,
    )
    assert images.write_oci_archive(shuffled, tmp_path / "c.tar") == a
    (tmp_path / "tool").write_bytes(b"changed")
    assert images.write_oci_archive(spec, tmp_path / "d.tar") != a


def test_build_images_skips_unchanged_and_replaces_stale(tmp_path: Path) -> None:
    spec = small_spec(tmp_path)
    out = tmp_path / "out"
    [first] = images.build_images(out, [spec])
    assert re.fullmatch(r"egress-dev\.local_test_1-[0-9a-f]{16}\.tar", first.name)
    mtime = first.stat().st_mtime_ns
    assert images.build_images(out, [spec]) == [first]
    assert first.stat().st_mtime_ns == mtime  # not rewritten

    (tmp_path / "tool").write_bytes(b"new content")  # same spec, new source content
    [second] = images.build_images(out, [spec])
    assert second != first
    assert sorted(p.name for p in out.iterdir()) == [second.name]
    with pytest.raises(ValueError, match="duplicate"):
        images.build_images(out, [spec, spec])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ref": "egress-dev.local/notag"},
        {"ref": "x:1", "files": (("relative", b"", 0o644),)},
        {"ref": "x:1", "files": (("/a/../b", b"", 0o644),)},
        {"ref": "x:1", "files": (("/a", b"", 0o644),), "symlinks": (("/a", "b"),)},
        {"ref": "x:1", "files": (("/a", b"", 0o644),), "dirs": (("/a", 0o755),)},
        {"ref": "x:1", "files": (("/a", b"", 0o17777),)},
    ],
)
def test_spec_rejects(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ImageSpec(**kwargs)


def test_file_under_a_file_is_refused(tmp_path: Path) -> None:
    spec = ImageSpec(ref="x:1", files=(("/a", b"", 0o644), ("/a/b", b"", 0o644)))
    with pytest.raises(ValueError, match="/a is a file and a directory"):
        images.write_oci_archive(spec, tmp_path / "x.tar")


LDD_OUTPUT = """\
\tlinux-vdso.so.1 (0x00007ffc3b9f2000)
\tlibbsd.so.0 => /lib/x86_64-linux-gnu/libbsd.so.0 (0x00007f7b0b4b0000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f7b0b2ce000)
\tlibmd.so.0 => /lib/x86_64-linux-gnu/libmd.so.0 (0x00007f7b0b2c1000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f7b0b566000)
"""


def test_parse_ldd() -> None:
    assert images.parse_ldd(LDD_OUTPUT) == [
        Path("/lib/x86_64-linux-gnu/libbsd.so.0"),
        Path("/lib/x86_64-linux-gnu/libc.so.6"),
        Path("/lib/x86_64-linux-gnu/libmd.so.0"),
        Path("/lib64/ld-linux-x86-64.so.2"),
    ]
    with pytest.raises(DevStackError, match=r"libgone\.so\.1"):
        images.parse_ldd(LDD_OUTPUT + "\tlibgone.so.1 => not found\n")


def test_elf_closure_of_ls() -> None:
    closure = images.elf_closure(Path("/bin/ls"))
    names = {p.name for p in closure}
    assert "libc.so.6" in names
    assert any(p.name.startswith("ld-linux") for p in closure)
    assert all(p.is_absolute() and p.is_file() for p in closure)
    assert images.nss_libraries(closure)  # libresolv at least sits beside libc


def test_elf_closure_of_a_non_elf_is_empty(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    assert images.elf_closure(script) == []
    with pytest.raises(DevStackError, match="does not exist"):
        images.elf_closure(tmp_path / "missing")


def test_pause_image() -> None:
    spec = images.pause_image(Path("/bb"))
    assert spec.ref == "egress-dev.local/pause:1"
    assert spec.entrypoint == ("/bin/sleep", "infinity")
    assert spec.files == (("/bin/busybox", Path("/bb"), 0o755),)
    assert spec.symlinks == (("/bin/sleep", "busybox"),)


def files_of(spec: ImageSpec) -> dict[str, tuple[Path | bytes, int]]:
    return {p: (s, m) for p, s, m in spec.files}


def test_client_image() -> None:
    # /bin/ls stands in for nc.openbsd: any dynamic binary brings its closure.
    spec = images.client_image(Path("/bb"), Path("/bin/ls"), Path("/bin/cat"))
    assert spec.ref == "egress-dev.local/client:1"
    assert spec.entrypoint == () and spec.cmd == ("/bin/sh",)
    files = files_of(spec)
    assert files["/bin/nc"] == (Path("/bin/ls"), 0o755)
    assert files["/bin/busybox"] == (Path("/bb"), 0o755)
    for lib in images.elf_closure(Path("/bin/ls")):
        assert str(lib) in files
    assert files["/etc/nsswitch.conf"] == (images.NSSWITCH, 0o644)
    assert b"hosts: files dns\n" in images.NSSWITCH
    assert {"/etc/passwd", "/etc/group", "/etc/hosts"} <= set(files)
    links = dict(spec.symlinks)
    for applet in ("nslookup", "wget", "timeout", "ip", "hostname", "kill", "seq"):
        assert links[f"/bin/{applet}"] == "busybox"
    # The shell is not busybox's (which would run its UDP-less nc applet for a bare `nc`).
    assert links["/bin/sh"] == "dash"
    assert files["/bin/dash"] == (Path("/bin/cat"), 0o755)
    assert "/bin/nc" not in links
    assert links["/bin/nc.openbsd"] == "nc"
    assert ("/tmp", 0o1777) in spec.dirs


def test_envoy_image() -> None:
    spec = images.envoy_image(Path("/bin/ls"), Path("/bb"), "1.39.3")
    assert spec.ref == "egress-dev.local/envoy:v1.39.3"
    assert images.envoy_image(Path("/bin/ls"), Path("/bb"), "v1.39.3").ref == spec.ref
    assert spec.entrypoint == ("/usr/local/bin/envoy",)
    assert spec.cmd == ("-c", "/etc/envoy/envoy.yaml")
    files = files_of(spec)
    assert files["/usr/local/bin/envoy"] == (Path("/bin/ls"), 0o755)
    names = {Path(p).name for p in files}
    assert {"libc.so.6", "libresolv.so.2"} <= names
    assert dict(spec.symlinks) == {f"/bin/{a}": "busybox" for a in ("sh", "sleep", "wget", "cat")}
    assert {"/etc/passwd", "/etc/group", "/etc/nsswitch.conf"} <= set(files)
    assert ("/tmp", 0o1777) in spec.dirs


def test_coredns_image() -> None:
    spec = images.coredns_image(Path("/cd"), "1.15.0")
    assert spec.ref == "egress-dev.local/coredns:1.15.0"
    assert spec.entrypoint == ("/coredns",)
    assert spec.cmd == ("-conf", "/etc/coredns/Corefile")
    assert files_of(spec)["/coredns"] == (Path("/cd"), 0o755)
    assert {"/etc/passwd", "/etc/nsswitch.conf"} <= set(files_of(spec))
    assert ("/tmp", 0o1777) in spec.dirs


def test_envoy_from_the_wheel() -> None:
    binary = images.envoy_binary()
    assert binary.is_file() and binary.name == "envoy"
    assert re.fullmatch(r"\d+\.\d+\.\d+", images.envoy_version())


CHECK_OUTPUT = """\
REF                              TYPE                                       DIGEST                                                                  STATUS         SIZE              UNPACKED
egress-dev.local/pause:1         application/vnd.oci.image.manifest.v1+json sha256:aaaa complete (2/2)  1.1 MiB/1.1 MiB   true
egress-dev.local/client:1        application/vnd.oci.image.manifest.v1+json sha256:bbbb complete (2/2)  1.5 MiB/1.5 MiB   false
egress-dev.local/envoy:v1.39.3   application/vnd.oci.image.manifest.v1+json sha256:cccc incomplete (1/2) 0.0 B/100.0 MiB  false
"""


def test_parse_images_check() -> None:
    assert images.parse_images_check(CHECK_OUTPUT) == {"egress-dev.local/pause:1": "sha256:aaaa"}


def test_import_images_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(DevStackError, match="not found"):
        images.import_images(str(tmp_path / "no-ctr"), "/nonexistent.sock", [])
