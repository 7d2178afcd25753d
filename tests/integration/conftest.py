"""Clients for the cluster tests: the admin, and the reconciler's own RBAC identity."""

from __future__ import annotations

import pytest

from core.kube import Kube, api_client_from_kubeconfig
from tests.conftest import DevStack


@pytest.fixture(scope="session")
def admin(dev_stack: DevStack) -> Kube:
    """Cluster admin: sets up and inspects state the code under test must not need rights for."""
    return Kube(api_client_from_kubeconfig(dev_stack.kubeconfig))


@pytest.fixture(scope="session")
def as_reconciler(dev_stack: DevStack) -> Kube:
    """The reconciler's identity, bound only by infra/ RBAC: least privilege is exercised."""
    return Kube(api_client_from_kubeconfig(dev_stack.identity_kubeconfig("egress-reconciler")))
