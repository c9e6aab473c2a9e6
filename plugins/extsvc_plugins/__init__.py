"""extsvc's built-in plugins; each module is one plugin and imports only ``extsvc``'s public API."""
