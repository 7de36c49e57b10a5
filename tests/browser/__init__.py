"""Browser-test helpers and assets (see harness.py)."""
