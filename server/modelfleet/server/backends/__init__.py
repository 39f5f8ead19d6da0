"""Backends: how the router talks to model servers."""
