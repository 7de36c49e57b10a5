"""Helpers shared by the wire tests."""

from __future__ import annotations

from typing import Any

import pytest

from broker.config import Settings


def with_settings(**changes: Any) -> pytest.MarkDecorator:
    """Run a test against an application built with these settings changed."""
    label = ",".join(f"{key}={value!r}" for key, value in changes.items())
    return pytest.mark.parametrize("settings", [Settings().replace(**changes)], ids=[label], indirect=True)
