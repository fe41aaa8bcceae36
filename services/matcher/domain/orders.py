"""The clearing input: one interval's frozen order set, held as columns of numpy arrays.

An order is divisible: `energy_wh > 0` whole watt-hours at a limit price in
whole micro-currency per kWh, to buy or to sell at one node. The matcher works
on columns, never on one Python object per order, so that a million orders
cost about as much as sorting their prices.

Book order (`sequence`) is the order book's sequence number; it breaks ties
(largest remainders first, then the earlier order) and fixes the order in
which results are listed, so the input's row order never matters. From a CSV
file without a `sequence` column, book order is the order of the order ids
(server ids are time-ordered).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, overload

import numpy as np
import numpy.typing as npt

from services.domain.grid import Grid
from services.domain.units import UnitError, price_decimal_from_micro, price_micro_from_decimal

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

BUY: Final = "buy"
SELL: Final = "sell"
CSV_COLUMNS: Final = ("order_id", "participant_id", "node_id", "side", "energy_wh", "price_per_kwh")
OPTIONAL_CSV_COLUMNS: Final = ("sequence",)

# Bounds that keep every product exact: 10^12 Wh (1 TWh... of a 15-minute
# interval) per order, |price| <= 10,000 currency per kWh, and a book total
# below 2**52 Wh so that sums of energy in float64 stay exact in the solver.
MAX_ORDER_ENERGY_WH: Final = 10**12
MAX_ABS_PRICE_MICRO_PER_KWH: Final = 10**10
MAX_BOOK_ENERGY_WH: Final = 2**52


class OrderError(ValueError):
    """An order that breaks a rule; the message names the row (and order id) and the rule."""

    def __init__(self, where: str, rule: str) -> None:
        super().__init__(f"{where}: {rule}")
        self.where = where
        self.rule = rule


@dataclass(frozen=True, slots=True)
class Order:
    """One order as a service or a file hands it in (converted to columns by `ClearingInput.from_orders`)."""

    order_id: str
    participant_id: str
    node_id: str
    side: str
    energy_wh: int
    price_micro_per_kwh: int
    sequence: int | None = None


@dataclass(frozen=True, eq=False)
class ClearingInput:
    """The orders of one interval as columns; row i of every column is order i.

    `node_index` indexes the grid's nodes. `sequence` values are unique
    (book order). `order_ids` are unique; `from_orders` and `read_orders_csv`
    check that, and `validate` in the clearing checks every numeric rule
    again, so arrays built elsewhere are held to the same rules.
    """

    order_ids: Sequence[str]
    participant_ids: Sequence[str]
    node_index: npt.NDArray[np.int32]
    is_buy: BoolArray
    energy_wh: IntArray
    price_micro_per_kwh: IntArray
    sequence: IntArray

    def __post_init__(self) -> None:
        count = len(self.order_ids)
        for name in (
            "participant_ids",
            "node_index",
            "is_buy",
            "energy_wh",
            "price_micro_per_kwh",
            "sequence",
        ):
            if len(getattr(self, name)) != count:
                raise ValueError(f"column {name} has {len(getattr(self, name))} rows, order_ids has {count}")

    def __len__(self) -> int:
        return len(self.order_ids)

    def describe_row(self, row: int) -> str:
        """How an error names row `row`: its position (1-based) and its order id."""
        return f"row {row + 1} (order {self.order_ids[row]!r})"

    def take(self, rows: npt.NDArray[np.intp] | npt.NDArray[np.int64]) -> ClearingInput:
        """The orders at positions `rows`, in that order."""
        return ClearingInput(
            order_ids=_take_strings(self.order_ids, rows),
            participant_ids=_take_strings(self.participant_ids, rows),
            node_index=self.node_index[rows],
            is_buy=self.is_buy[rows],
            energy_wh=self.energy_wh[rows],
            price_micro_per_kwh=self.price_micro_per_kwh[rows],
            sequence=self.sequence[rows],
        )

    @classmethod
    def empty(cls) -> ClearingInput:
        return cls.from_orders([], None)

    @classmethod
    def from_orders(
        cls, orders: Iterable[Order], grid: Grid | None, *, labels: Sequence[str] | None = None
    ) -> ClearingInput:
        """Check each order (naming its row and the rule it breaks) and build the columns.

        Orders without a sequence get book order from their ids (all or none
        must carry one). `grid` gives the node ids and the price tick; with
        None the node ids must already be valid indices (for tests of pure
        code). `labels[i]` is how errors name order i (default "row i+1").
        """
        items = list(orders)
        names = list(labels) if labels is not None else [f"row {i + 1}" for i in range(len(items))]
        node_index_of = grid.node_index if grid is not None else None
        tick = grid.price_tick_micro_per_kwh if grid is not None else 1
        ids: list[str] = []
        participants: list[str] = []
        nodes = np.empty(len(items), dtype=np.int32)
        buys = np.empty(len(items), dtype=bool)
        energies = np.empty(len(items), dtype=np.int64)
        prices = np.empty(len(items), dtype=np.int64)
        sequences: list[int | None] = []
        first_row: dict[str, int] = {}
        for position, order in enumerate(items):
            where = f"{names[position]} (order {order.order_id!r})"
            if not order.order_id:
                raise OrderError(names[position], "order_id is empty")
            if order.order_id in first_row:
                raise OrderError(
                    where, f"duplicate order_id: {names[first_row[order.order_id]]} has it already"
                )
            first_row[order.order_id] = position
            if not order.participant_id:
                raise OrderError(where, "participant_id is empty")
            if node_index_of is not None:
                if order.node_id not in node_index_of:
                    raise OrderError(where, f"node_id {order.node_id!r} is not a node of the grid")
                nodes[position] = node_index_of[order.node_id]
            else:
                nodes[position] = int(order.node_id)
            if order.side not in (BUY, SELL):
                raise OrderError(where, f"side must be 'buy' or 'sell', got {order.side!r}")
            check_energy(order.energy_wh, where)
            check_price(order.price_micro_per_kwh, tick, where)
            ids.append(order.order_id)
            participants.append(order.participant_id)
            buys[position] = order.side == BUY
            energies[position] = order.energy_wh
            prices[position] = order.price_micro_per_kwh
            sequences.append(order.sequence)
        sequence = _sequence_column(ids, sequences, names)
        return cls(ids, participants, nodes, buys, energies, prices, sequence)


def check_energy(energy_wh: object, where: str) -> None:
    if isinstance(energy_wh, bool) or not isinstance(energy_wh, int | np.integer):
        raise OrderError(where, f"energy_wh must be a whole number of Wh, got {energy_wh!r}")
    if energy_wh <= 0:
        raise OrderError(where, f"energy_wh must be positive, got {energy_wh}")
    if energy_wh > MAX_ORDER_ENERGY_WH:
        raise OrderError(
            where, f"energy_wh {energy_wh} exceeds the largest order of {MAX_ORDER_ENERGY_WH} Wh"
        )


def check_price(price_micro_per_kwh: object, tick_micro_per_kwh: int, where: str) -> None:
    if isinstance(price_micro_per_kwh, bool) or not isinstance(price_micro_per_kwh, int | np.integer):
        raise OrderError(where, f"price must be whole micro-currency per kWh, got {price_micro_per_kwh!r}")
    price_micro_per_kwh = int(price_micro_per_kwh)
    if abs(price_micro_per_kwh) > MAX_ABS_PRICE_MICRO_PER_KWH:
        raise OrderError(
            where,
            f"price {price_decimal_from_micro(int(price_micro_per_kwh))} per kWh is beyond the limit of "
            f"±{price_decimal_from_micro(MAX_ABS_PRICE_MICRO_PER_KWH)}",
        )
    if price_micro_per_kwh % tick_micro_per_kwh != 0:
        raise OrderError(
            where,
            f"price {price_decimal_from_micro(int(price_micro_per_kwh))} per kWh is not on the market's tick "
            f"of {price_decimal_from_micro(tick_micro_per_kwh)} per kWh",
        )


def _sequence_column(ids: list[str], sequences: list[int | None], names: list[str]) -> IntArray:
    given = [s is not None for s in sequences]
    if any(given) and not all(given):
        missing = given.index(False)
        raise OrderError(
            f"{names[missing]} (order {ids[missing]!r})", "sequence is missing while other orders carry one"
        )
    if ids and all(given):
        column = np.array(sequences, dtype=np.int64)
        order = np.argsort(column, kind="stable")
        repeats = np.flatnonzero(np.diff(column[order]) == 0)
        if repeats.size:
            first, second = int(order[repeats[0]]), int(order[repeats[0] + 1])
            if second < first:
                first, second = second, first
            raise OrderError(
                f"{names[second]} (order {ids[second]!r})",
                f"duplicate sequence {column[second]}: {names[first]} has it already",
            )
        return column
    # Book order from the ids: rank of each id in sorted order.
    ranks = np.empty(len(ids), dtype=np.int64)
    ranks[sorted(range(len(ids)), key=ids.__getitem__)] = np.arange(len(ids), dtype=np.int64)
    return ranks


class Reordered(Sequence[str]):
    """`values` seen in the order `rows`, without copying them (strings are costly to copy in Python)."""

    def __init__(self, values: Sequence[str], rows: npt.NDArray[np.intp] | npt.NDArray[np.int64]) -> None:
        self._values = values
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return [self._values[int(i)] for i in self._rows[index]]
        return self._values[int(self._rows[index])]

    def __iter__(self) -> Iterator[str]:
        values = self._values
        return (values[i] for i in self._rows.tolist())


def _take_strings(values: Sequence[str], rows: npt.NDArray[np.intp] | npt.NDArray[np.int64]) -> Sequence[str]:
    return Reordered(values, rows)


def read_orders_csv(text: str | Iterable[str], grid: Grid, *, source: str = "orders") -> ClearingInput:
    """Parse ORDERS.csv (header `order_id,participant_id,node_id,side,energy_wh,price_per_kwh[,sequence]`).

    Errors name the file's line number, the order id and the rule broken.
    """
    lines = io.StringIO(text) if isinstance(text, str) else text
    reader = csv.reader(lines)
    try:
        header = [column.strip() for column in next(reader)]
    except StopIteration:
        raise OrderError(f"{source} line 1", f"the header {','.join(CSV_COLUMNS)} is missing") from None
    missing = [column for column in CSV_COLUMNS if column not in header]
    unknown = [column for column in header if column not in CSV_COLUMNS + OPTIONAL_CSV_COLUMNS]
    if missing or unknown:
        raise OrderError(
            f"{source} line 1",
            f"the header must be {','.join(CSV_COLUMNS)} (optionally ,sequence); "
            + (f"missing {','.join(missing)}" if missing else f"unknown column {','.join(unknown)}"),
        )
    position = {column: header.index(column) for column in header}
    orders: list[Order] = []
    labels: list[str] = []
    for row in reader:
        line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        label = f"{source} line {line}"
        if len(row) != len(header):
            raise OrderError(label, f"expected {len(header)} fields, got {len(row)}")
        cells = {column: row[index].strip() for column, index in position.items()}
        where = f"{label} (order {cells['order_id']!r})"
        energy_text = cells["energy_wh"]
        if not (energy_text.isdigit() or (energy_text.startswith("-") and energy_text[1:].isdigit())):
            raise OrderError(where, f"energy_wh must be a positive whole number of Wh, got {energy_text!r}")
        try:
            price = price_micro_from_decimal(cells["price_per_kwh"])
        except UnitError as exc:
            raise OrderError(where, exc.args[0]) from None
        sequence: int | None = None
        if "sequence" in cells:
            try:
                sequence = int(cells["sequence"])
            except ValueError:
                raise OrderError(
                    where, f"sequence must be a whole number, got {cells['sequence']!r}"
                ) from None
        orders.append(
            Order(
                cells["order_id"],
                cells["participant_id"],
                cells["node_id"],
                cells["side"].lower(),
                int(energy_text),
                price,
                sequence,
            )
        )
        labels.append(label)
    return ClearingInput.from_orders(orders, grid, labels=labels)


def write_orders_csv(request: ClearingInput, grid: Grid) -> str:
    """The CSV form of a clearing input (with its sequence column), e.g. for generated examples."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow((*CSV_COLUMNS, "sequence"))
    node_ids = grid.node_ids
    for row in range(len(request)):
        writer.writerow(
            (
                request.order_ids[row],
                request.participant_ids[row],
                node_ids[int(request.node_index[row])],
                BUY if request.is_buy[row] else SELL,
                int(request.energy_wh[row]),
                _price_text(int(request.price_micro_per_kwh[row])),
                int(request.sequence[row]),
            )
        )
    return out.getvalue()


def _price_text(price_micro_per_kwh: int) -> str:
    text = format(price_decimal_from_micro(price_micro_per_kwh), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text
