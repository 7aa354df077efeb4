"""Typed messages and ZeroMQ channels between the scheduler's trainer and the sidecar."""
