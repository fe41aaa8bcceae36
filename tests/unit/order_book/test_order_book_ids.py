"""Order ids from the book's own IdMaker: time-ordered, unique, and in the layout of services.domain.ids.new_id."""

from __future__ import annotations

import re

from services.domain.ids import IdMaker as OrderIds
from services.domain.ids import new_id

CROCKFORD_26 = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


def test_ids_sort_in_creation_order_and_never_repeat() -> None:
    maker = OrderIds()
    ids = maker.take(5000) + maker.take(5000)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(CROCKFORD_26.fullmatch(i) for i in ids)


def test_ids_share_the_time_prefix_of_the_shared_id_maker() -> None:
    before = new_id()
    made = OrderIds().take(1)[0]
    after = new_id()
    # The first 10 characters encode the millisecond: ours lies between two shared ids.
    assert before[:10] <= made[:10] <= after[:10]
