"""The gateway's objects, rendered: one pure builder per Kubernetes kind and the Envoy bootstrap.

Rendering never touches the network or ``os.environ``; it takes a parsed ExternalService and
settings (``core``) and returns plain dicts the controller applies.
"""
