"""Decomposition of the allocation into bilateral trades (buyer order, seller order, energy_wh).

Accepted buys and accepted sells are paired by a north-west-corner walk in
book order: the first buy takes from the first sell until one of them is
filled, then the next, and so on, regardless of node. A buyer pays its node's
price and a seller receives its node's price, so a trade between nodes that
a binding line separates carries congestion rent.

Each trade fills at least one order's remaining energy and the last trade
fills two, so there are at most (accepted buys + accepted sells - 1) trades.
The walk is vectorised: cut the buys' and the sells' cumulative energy at
every order boundary of either side; each piece between two cuts is a trade.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class Trades:
    buyer_row: IntArray  # rows of the orders in book order
    seller_row: IntArray
    energy_wh: IntArray

    def __len__(self) -> int:
        return len(self.energy_wh)


def decompose(accepted_wh: IntArray, is_buy: BoolArray) -> Trades:
    """Trades covering every order's accepted energy exactly (orders given in book order).

    Accepted buys and sells must balance.
    """
    traded = accepted_wh > 0
    buying = traded & is_buy
    buys = np.flatnonzero(buying)
    sells = np.flatnonzero(traded ^ buying)
    if not len(buys) or not len(sells):
        empty = np.zeros(0, dtype=np.int64)
        return Trades(empty, empty, empty)
    buy_ends = accepted_wh[buys]
    np.cumsum(buy_ends, out=buy_ends)
    sell_ends = accepted_wh[sells]
    np.cumsum(sell_ends, out=sell_ends)
    if buy_ends[-1] != sell_ends[-1]:
        raise ValueError(f"buys ({int(buy_ends[-1])} Wh) and sells ({int(sell_ends[-1])} Wh) do not balance")
    # Merge both sides' cuts, with the side in the lowest bit (a buy's cut
    # sorts before a sell's at the same energy). Two sorted runs: the stable
    # sort merges them in linear time.
    cuts = np.empty(len(buys) + len(sells), dtype=np.int64)
    np.left_shift(buy_ends, 1, out=cuts[: len(buys)])
    np.left_shift(sell_ends, 1, out=cuts[len(buys) :])
    cuts[len(buys) :] |= 1
    cuts.sort(kind="stable")
    is_sell_cut = (cuts & 1).astype(np.bool_)
    cuts >>= 1
    length = np.empty_like(cuts)
    length[0] = cuts[0]
    np.subtract(cuts[1:], cuts[:-1], out=length[1:])
    # A piece belongs to the buy and the sell whose cuts it has not passed yet:
    # the sells cut before it, and the buys cut before it (all cuts before it
    # minus the sells').
    # (In 64 bits: they index arrays, and narrower indices get converted first.)
    sells_before = np.cumsum(is_sell_cut, dtype=np.int64)
    sells_before -= is_sell_cut
    pieces = np.flatnonzero(length)
    sellers = sells_before[pieces]
    return Trades(buys[pieces - sellers], sells[sellers], length[pieces])
