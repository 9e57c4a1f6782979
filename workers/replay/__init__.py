"""Replaying an archive day: manifest, external sort, producer, loader, lease and status."""
