"""broker.gc_tuning: what survives a full collection is frozen until thawed."""

import gc

from broker.gc_tuning import GcPauses


def test_survivors_of_a_full_collection_are_frozen_until_thawed():
    pauses = GcPauses(freeze_survivors=True).install()
    try:
        survivors = [[] for _ in range(1000)]
        gc.collect()
        frozen = gc.get_freeze_count()
        assert frozen >= len(survivors)
        gc.collect(0)  # a young collection freezes nothing new
        assert gc.get_freeze_count() == frozen
    finally:
        pauses.uninstall()
        GcPauses.thaw()
    assert gc.get_freeze_count() == 0
    assert sum(pauses.by_generation[2].counts) >= 1


def test_without_freezing_nothing_is_frozen():
    pauses = GcPauses().install()
    try:
        gc.collect()
        assert gc.get_freeze_count() == 0
    finally:
        pauses.uninstall()
