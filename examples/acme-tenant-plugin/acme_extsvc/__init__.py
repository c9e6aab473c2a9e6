"""An example extsvc plugin package."""
