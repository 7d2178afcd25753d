"""egressctl: the operator's command line for rendering, the local stack and repairs."""
