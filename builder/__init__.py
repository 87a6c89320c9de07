"""Turns pinned sources into the guest artifacts and their manifest; knows nothing of migration."""
