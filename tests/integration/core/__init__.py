"""Integration tests of `core`: its clients against the real services."""
