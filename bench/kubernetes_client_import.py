"""Import + first use of the official kubernetes client: the pinned 35.0.0 against 37.x.

Cold start of a function is dominated by imports; the product imports the client lazily (on the
first event) and uses only ``ApiClient.call_api`` with plain JSON, but "first use" here is what
a typical caller pays: import, a Configuration, an ApiClient, and touching six typed API
classes. Each figure is a fresh interpreter; 37.x is installed into a throwaway venv under
.cache/bench-venvs (pip, once).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench._common import REPO, summary

RUNS = 7
CANDIDATE = "37.0.2"
PROBE = r"""
import json, resource, time
t0 = time.perf_counter()
import kubernetes
from kubernetes import client
t_import = time.perf_counter() - t0
api = client.ApiClient(client.Configuration())
for cls in ("CoreV1Api", "AppsV1Api", "AutoscalingV2Api", "NetworkingV1Api", "PolicyV1Api",
            "CustomObjectsApi"):
    getattr(client, cls)(api)
client.V1ObjectMeta(name="x")
t_total = time.perf_counter() - t0
print(json.dumps({"version": kubernetes.__version__, "import": t_import, "total": t_total,
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def venv_python(version: str) -> Path:
    if version == "35.0.0":
        return Path(sys.executable)  # the project's own .venv pins 35.0.0
    root = REPO / ".cache" / "bench-venvs" / f"k{version.split('.')[0]}"
    python = root / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"kubernetes=={version}"], check=True
        )
    return python


def measure(python: Path) -> tuple[str, list[float], list[float], list[float]]:
    imports, totals, rss = [], [], []
    version = ""
    for _ in range(RUNS):
        out = subprocess.run(
            [str(python), "-c", PROBE], check=True, capture_output=True, text=True
        ).stdout
        data = json.loads(out)
        version = data["version"]
        imports.append(data["import"] * 1000)
        totals.append(data["total"] * 1000)
        rss.append(data["maxrss_kb"] / 1024)
    return version, imports, totals, rss


def main() -> None:
    for version in ("35.0.0", CANDIDATE):
        got, imports, totals, rss = measure(venv_python(version))
        print(f"kubernetes {got}: import {summary(imports)}")
        print(f"kubernetes {got}: import + first use {summary(totals)}")
        print(f"kubernetes {got}: peak RSS {summary(rss, 'MB')}")


if __name__ == "__main__":
    main()
