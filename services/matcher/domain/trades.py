"""Decomposition of the allocation into bilateral trades (buyer order, seller order, energy_wh).

Local first: at each node the accepted buys and sells trade with each other
up to the smaller of the two volumes; what is left (a node's export or
import) then trades across nodes. Within each part, buys and sells are
paired by a north-west-corner walk in book order: the first buy takes from
the first sell until one of them is filled, and so on.

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


def decompose(
    accepted_wh: IntArray, is_buy: BoolArray, node_index: npt.NDArray[np.integer], node_count: int
) -> Trades:
    """Trades covering every order's accepted energy exactly (orders given in book order)."""
    traded = accepted_wh > 0
    buys = np.flatnonzero(traded & is_buy)
    sells = np.flatnonzero(traded & ~is_buy)
    if not len(buys) or not len(sells):
        empty = np.zeros(0, dtype=np.int64)
        return Trades(empty, empty, empty)
    if node_count > 1:
        buy_rows, buy_energy = _local_first(buys, accepted_wh, node_index, node_count, sells)
        sell_rows, sell_energy = _local_first(sells, accepted_wh, node_index, node_count, buys)
    else:
        buy_rows, buy_energy = buys, accepted_wh[buys]
        sell_rows, sell_energy = sells, accepted_wh[sells]
    return _walk(buy_rows, buy_energy, sell_rows, sell_energy)


def _local_first(
    rows: IntArray,
    accepted_wh: IntArray,
    node_index: npt.NDArray[np.integer],
    node_count: int,
    other_rows: IntArray,
) -> tuple[IntArray, IntArray]:
    """This side's orders as pieces: first each node's part traded locally (node by node), then the rest.

    The local part of a node is the smaller of its buy and sell volumes; it
    is taken from the node's orders in book order.
    """
    key_type = np.uint8 if node_count <= 256 else np.uint16 if node_count <= 65536 else np.int64
    node = node_index[rows]
    by_node = np.argsort(node.astype(key_type), kind="stable")
    rows = rows[by_node]
    node = node[by_node]
    energy = accepted_wh[rows]
    own_total = np.bincount(node, weights=energy, minlength=node_count).astype(np.int64)
    other_node = node_index[other_rows]
    other_total = np.bincount(other_node, weights=accepted_wh[other_rows], minlength=node_count).astype(
        np.int64
    )
    local_total = np.minimum(own_total, other_total)
    node_start = np.cumsum(own_total) - own_total
    end_in_node = np.cumsum(energy) - node_start[node]
    start_in_node = end_in_node - energy
    local = np.clip(local_total[node] - start_in_node, 0, energy)
    rest = energy - local
    has_local = local > 0
    has_rest = rest > 0
    return (
        np.concatenate((rows[has_local], rows[has_rest])),
        np.concatenate((local[has_local], rest[has_rest])),
    )


def _walk(buy_rows: IntArray, buy_energy: IntArray, sell_rows: IntArray, sell_energy: IntArray) -> Trades:
    buy_ends = np.cumsum(buy_energy)
    sell_ends = np.cumsum(sell_energy)
    # Merge both sides' cuts with the side in the lowest bit (buys first on equal energy).
    cuts = np.sort(np.concatenate((buy_ends * 2, sell_ends * 2 + 1)))
    position = cuts >> 1
    is_sell_cut = (cuts & 1).astype(bool)
    length = np.diff(position, prepend=0)
    # A piece is traded by the buy and the sell whose cuts have not yet passed.
    buys_before = np.cumsum(~is_sell_cut) - ~is_sell_cut
    sells_before = np.cumsum(is_sell_cut) - is_sell_cut
    keep = length > 0
    return Trades(
        buy_rows[buys_before[keep]],
        sell_rows[sells_before[keep]],
        length[keep],
    )
