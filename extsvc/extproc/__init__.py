"""ext_proc: the ExternalProcessor service."""
