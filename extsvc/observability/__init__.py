"""Logging, metrics, health and the admin HTTP listener."""
