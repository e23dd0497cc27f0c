"""Quality measurements through the engine's own code path (`python -m server.eval ...`)."""
