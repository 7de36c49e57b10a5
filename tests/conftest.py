"""Shared fixtures: an actor harness, and every actor stopped after each test."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from broker.testing import ActorHarness


@pytest.fixture
def harness():
    with ActorHarness() as h:
        yield h
