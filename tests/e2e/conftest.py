"""The whole event pipeline on the local stack, for the end-to-end tests of this package.

Package-scoped on purpose: while it runs, the exporter publishes notices for *every*
ExternalService and the functions reconcile them, which would disturb the reconciler tests
elsewhere; it is stopped as soon as this package's tests are done.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from egressctl.pipeline import LocalPipeline, PipelineConfig
from tests.conftest import DevStack

DELETE_GRACE_S = 2


@pytest.fixture(scope="package")
def pipeline(dev_stack: DevStack) -> Iterator[LocalPipeline]:
    state_dir = Path(dev_stack.env["EGRESS_DEV_DIR"])
    lines: list[str] = []
    p = LocalPipeline(
        PipelineConfig(
            dev_env=dev_stack.env,
            state_dir=state_dir,
            delete_grace_s=DELETE_GRACE_S,
            sweep_interval_s=None,  # tests trigger sweeps themselves
            extra_env={"DELETE_GRACE_SECONDS": str(DELETE_GRACE_S)},
            exporter_watch_timeout_s=30,
            say=lines.append,
        )
    )
    p.start()
    try:
        yield p
    finally:
        p.stop()
