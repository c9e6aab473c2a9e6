"""The plugin system: pluggy for discovery and lifecycle, compiled objects for requests."""
