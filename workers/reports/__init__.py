"""Corrected reports: the independent SQL reference, the gate that publishes, and diffs."""
