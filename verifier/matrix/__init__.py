"""Matrices: the TOML file and its scenarios (spec), whether they fit this host (fit), running them
(execute) and their results (results)."""
