"""ext_authz: the Authorization service, its converter and the compiled policy pipeline."""
