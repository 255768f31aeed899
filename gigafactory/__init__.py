"""Gigafactory: run fleets of coding agents over NATS JetStream."""

__version__ = "0.1.0"
