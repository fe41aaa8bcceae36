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
    buy_count, sell_count = len(buys), len(sells)
    if not buy_count or not sell_count:
        empty = np.zeros(0, dtype=np.int64)
        return Trades(empty, empty, empty)
    # Both sides' cumulative energy (the cuts) in one array: buys, then sells.
    total = buy_count + sell_count
    ends = np.empty(total, dtype=np.int64)
    buy_ends, sell_ends = ends[:buy_count], ends[buy_count:]
    # (Gathers with mode="clip" skip the bounds checks; every index is in range.)
    np.take(accepted_wh, buys, out=buy_ends, mode="clip")
    np.cumsum(buy_ends, out=buy_ends)
    np.take(accepted_wh, sells, out=sell_ends, mode="clip")
    np.cumsum(sell_ends, out=sell_ends)
    if buy_ends[-1] != sell_ends[-1]:
        raise ValueError(f"buys ({int(buy_ends[-1])} Wh) and sells ({int(sell_ends[-1])} Wh) do not balance")
    # Merge them with the side in the lowest bit (a buy's cut sorts before a
    # sell's at the same energy), in 32 bits when the energies allow (half the
    # memory to sort). Two sorted runs: the stable sort merges them in linear time.
    cuts: npt.NDArray[np.int32] | IntArray = ends.astype(np.int32) if buy_ends[-1] < 2**30 else ends
    cuts <<= 1
    cuts[buy_count:] |= 1
    cuts.sort(kind="stable")
    is_sell_cut = cuts & 1
    cuts >>= 1
    # Piece k runs from cut k-1 to cut k; it belongs to the sell and the buy
    # whose cuts it has not passed yet: the sells cut before it, and the buys
    # cut before it (k minus the sells'). (In 64 bits: they index arrays, and
    # narrower indices get converted first.)
    length = np.empty(total, dtype=np.int64)
    length[0] = cuts[0]
    np.subtract(cuts[1:], cuts[:-1], out=length[1:])
    sellers = np.empty(total, dtype=np.int64)
    sellers[0] = 0
    np.cumsum(is_sell_cut[:-1], out=sellers[1:])
    # The last piece is empty (both sides end at the same energy), and so is
    # every piece where a buy and a sell are cut at the same energy.
    positive = length[:-1] != 0
    if positive.all():
        pieces: IntArray = np.arange(total - 1, dtype=np.int64)
        sellers = sellers[:-1]
        length = length[:-1]
    else:
        pieces = np.flatnonzero(positive)
        sellers = np.take(sellers, pieces, mode="clip")
        length = np.take(length, pieces, mode="clip")
    buyers = np.subtract(pieces, sellers, out=pieces)
    return Trades(np.take(buys, buyers, mode="clip"), np.take(sells, sellers, mode="clip"), length)
