"""Check an Envoy bootstrap against Envoy's own protobuf definitions (the xds-protos package).

``json_format.ParseDict`` rejects unknown fields and wrong types, and resolves every
``typed_config`` by its ``@type``; the extension modules below are imported so that their
descriptors are in the pool, and a type that is not imported fails as unknown.
"""

from __future__ import annotations

from typing import Any

# Imported for their descriptors: every typed_config the bootstrap may carry.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2  # noqa: F401
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2  # noqa: F401
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.filters.udp.udp_proxy.v3 import route_pb2, udp_proxy_pb2  # noqa: F401
from envoy.extensions.health_check.event_sinks.file.v3 import file_pb2  # noqa: F401
from google.protobuf import json_format


def parse_bootstrap(config: dict[str, Any]) -> bootstrap_pb2.Bootstrap:
    """Parse into a Bootstrap; raise json_format.ParseError on anything Envoy would refuse."""
    return json_format.ParseDict(config, bootstrap_pb2.Bootstrap(), ignore_unknown_fields=False)
