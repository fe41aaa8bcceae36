"""Splitting each step's accepted energy back to its orders: pro rata, largest remainder, then book order.

A fully accepted step fills each of its orders, a rejected one none. A partly
accepted step of total Q with accepted a gives order i (energy q_i) first
floor(q_i * a / Q) Wh; the Wh left over go one each to the orders with the
largest remainders (q_i * a mod Q), the earlier order in the book first on
equal remainders. All in exact integers.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from services.matcher.domain.steps import PriceSteps

IntArray = npt.NDArray[np.int64]

_INT64_SAFE = 2**62


def split_to_orders(steps: PriceSteps, step_accepted_wh: IntArray, energy_wh: IntArray) -> IntArray:
    """Accepted Wh per order (orders in book order, as `aggregate` saw them)."""
    if not len(energy_wh):
        return np.zeros(0, dtype=np.int64)
    # Per step: 0 rejected, 1 fully accepted, 2 partly accepted.
    state = ((step_accepted_wh > 0).astype(np.int8) * 2 - (step_accepted_wh == steps.energy_wh)).astype(
        np.int8
    )
    order_state = steps.per_order(state)
    # (A product is much faster than np.where here.)
    accepted: IntArray = np.multiply(energy_wh, order_state == 1)
    if not (state == 2).any():
        return accepted
    rows = np.flatnonzero(order_state == 2)
    step = steps.steps_of(rows)
    quantity = energy_wh[rows]
    step_total = steps.energy_wh[step]
    step_share = step_accepted_wh[step]
    if int(quantity.max()) * int(step_share.max()) < _INT64_SAFE:
        product = quantity * step_share
        base = product // step_total
        remainder = product % step_total
    else:  # products beyond int64: exact Python integers for these few orders
        product_object = quantity.astype(object) * step_share.astype(object)
        base = (product_object // step_total.astype(object)).astype(np.int64)
        remainder_object = product_object % step_total.astype(object)
        # Remainders only need ordering; scale them into floats by rank.
        remainder = _ranks(remainder_object)
    # Order within each step: largest remainder first, then book order (row).
    order = np.lexsort((rows, -remainder, step))
    step_sorted = step[order]
    first_of_step = np.flatnonzero(np.concatenate(([True], step_sorted[1:] != step_sorted[:-1])))
    counts = np.diff(np.concatenate((first_of_step, [len(order)])))
    rank = np.arange(len(order)) - np.repeat(first_of_step, counts)
    leftover_per_step = step_accepted_wh[step_sorted[first_of_step]] - np.add.reduceat(
        base[order], first_of_step
    )
    extra = (rank < np.repeat(leftover_per_step, counts)).astype(np.int64)
    accepted[rows[order]] = base[order] + extra
    return accepted


def _ranks(values: npt.NDArray[np.object_]) -> IntArray:
    """Dense ranks of exact integers (for ordering remainders too large for int64)."""
    distinct = sorted(set(values.tolist()))
    position = {value: index for index, value in enumerate(distinct)}
    return np.array([position[value] for value in values.tolist()], dtype=np.int64)
