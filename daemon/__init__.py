"""opacityd: the running service (CLI, config, logging, receiver, scheduler)."""
