"""Local development tools (stack, demo, event generator), not part of the runtime."""
