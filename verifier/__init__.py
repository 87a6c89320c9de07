"""Turns guest artifacts (described by their manifest) into a verdict on a live migration."""
