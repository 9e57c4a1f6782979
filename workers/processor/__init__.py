"""The stream processor: engine, per-partition state, shuffle, handoff and progress."""
