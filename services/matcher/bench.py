"""`p2pgrid bench clearing`: how the clearing's time compares with sorting the same prices once.

For each instance it prints one JSON line: `n_orders`, `network`,
`clear_s` (the whole in-process clearing with the input already in memory as
columns: validation, aggregation, LP, volume rule and rounding, split,
prices, trades), `sort_baseline_s` (numpy's argsort of the same prices, in
the same run), `ratio` = clear_s / sort_baseline_s, and details (steps, LP
size, binding lines, the time of each clearing step). After a warm-up run
the two are timed in turns, `--repeat` times each, and the best of each counts.

Generated instances: sizes 10k, 100k and 1M orders on a single node, a
meshed 30-node network and a 100-node radial feeder. Prices lie on the
market tick (0.0001 per kWh) around 0.20 per kWh, between a feed-in tariff
of 0.05 and a retail tariff of 0.40 per kWh; nodes differ in their
supply and demand so that power flows, and the most loaded lines are then
limited to 60% of their unconstrained flow, so they bind. The orders arrive
in book order, as the order book hands them over (a shuffled input costs one
extra sort; `--shuffled` measures that). `--orders-file/--grid` runs on given
files instead. The process keeps freed memory (see `keep_freed_memory`;
`--default-allocator` turns that off), and each line says which.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.domain.grid import Grid, grid_from_dict, load_grid
from services.matcher.domain.clearing import clear
from services.matcher.domain.orders import ClearingInput, read_orders_csv
from services.matcher.domain.result import ClearingResult

NETWORKS = ("single", "meshed30", "radial100")
SIZES = (10_000, 100_000, 1_000_000)
TICK_MICRO_PER_KWH = 100
INTERVAL_MINUTES = 15
# The share of its unconstrained flow that a limited line may carry.
LIMITED_SHARE = 0.6


@dataclass(frozen=True, slots=True)
class Instance:
    network: str
    grid: Grid
    request: ClearingInput


# glibc's mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process instead of returning it to the OS.

    A clearing allocates tens of MB of temporaries; by default glibc unmaps
    them after each run, and the next run pays a page fault for every 4 KiB
    again, which on a virtual machine can cost more than the computation. A
    long-running matcher keeps its heap; so does the benchmark (for the sort
    baseline too). Returns whether the setting took.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 25)  # glibc's largest: 32 MiB
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    return bool(mmap_ok and trim_ok)


def progress(message: str) -> None:
    print(f"[bench clearing] {message}", file=sys.stderr, flush=True)


def single_node_grid() -> Grid:
    return grid_from_dict(
        {
            "interval_minutes": INTERVAL_MINUTES,
            "price_tick_micro_per_kwh": TICK_MICRO_PER_KWH,
            "slack": "n0",
            "nodes": [{"id": "n0"}],
            "lines": [],
        }
    )


def meshed_grid(node_count: int = 30, *, seed: int = 30, capacity_w: int = 10**12) -> dict[str, Any]:
    """A ring of `node_count` nodes with chords every third node: loops everywhere."""
    rng = np.random.default_rng(seed)
    lines: list[dict[str, Any]] = []
    for i in range(node_count):
        lines.append(_line(f"r{i}", i, (i + 1) % node_count, capacity_w, float(rng.uniform(0.005, 0.02))))
    for i in range(0, node_count, 3):
        lines.append(_line(f"c{i}", i, (i + 7) % node_count, capacity_w, float(rng.uniform(0.005, 0.02))))
    return _grid_dict(node_count, lines)


def radial_grid(node_count: int = 100, *, seed: int = 100, capacity_w: int = 10**12) -> dict[str, Any]:
    """A feeder: a trunk of a third of the nodes from the slack, laterals branching off it."""
    rng = np.random.default_rng(seed)
    trunk = node_count // 3
    lines = [_line(f"t{i}", i - 1, i, capacity_w, None) for i in range(1, trunk)]
    for i in range(trunk, node_count):
        parent = int(rng.integers(0, i))
        lines.append(_line(f"b{i}", parent, i, capacity_w, None))
    return _grid_dict(node_count, lines)


def _line(line_id: str, a: int, b: int, capacity_w: int, reactance: float | None) -> dict[str, Any]:
    line: dict[str, Any] = {"id": line_id, "from": f"n{a}", "to": f"n{b}", "capacity_w": capacity_w}
    if reactance is not None:
        line["reactance_pu"] = reactance
    return line


def _grid_dict(node_count: int, lines: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "interval_minutes": INTERVAL_MINUTES,
        "price_tick_micro_per_kwh": TICK_MICRO_PER_KWH,
        "slack": "n0",
        "nodes": [{"id": f"n{i}"} for i in range(node_count)],
        "lines": lines,
    }


def generate_orders(count: int, node_count: int, *, seed: int) -> ClearingInput:
    """`count` orders in book order; each node leans to supply or demand, with its own price level."""
    rng = np.random.default_rng(seed)
    supply_share = rng.uniform(0.2, 0.8, node_count)
    price_bias = rng.normal(0.0, 0.02, node_count)
    node = rng.integers(0, node_count, count).astype(np.int32)
    is_buy = rng.random(count) >= supply_share[node]
    centre = np.where(is_buy, 0.215, 0.185) + price_bias[node]
    # Between a feed-in tariff of 0.05 and a retail tariff of 0.40 per kWh: nobody
    # sells below the one or buys above the other.
    price_per_kwh = np.clip(rng.normal(centre, 0.04), 0.05, 0.40)
    price = (np.rint(price_per_kwh * 1_000_000 / TICK_MICRO_PER_KWH) * TICK_MICRO_PER_KWH).astype(np.int64)
    energy = np.rint(rng.lognormal(7.0, 0.8, count)).astype(np.int64) + 1
    ids = [f"o{i:07d}" for i in range(count)]
    participants = [f"p{i % 5000:04d}" for i in range(count)]
    return ClearingInput(ids, participants, node, is_buy, energy, price, np.arange(count, dtype=np.int64))


def limit_loaded_lines(grid_dict: dict[str, Any], request: ClearingInput, *, limited: int) -> Grid:
    """Clear without limits, then limit the `limited` most loaded lines to 60% of their flow."""
    free = grid_from_dict(grid_dict)
    flows_w = np.abs(clear(request, free).flow_w)
    order = np.argsort(-flows_w, kind="stable")
    for index, line in enumerate(grid_dict["lines"]):
        line["capacity_w"] = int(max(4 * 1000, flows_w[index] * 3))
    for index in order[:limited]:
        grid_dict["lines"][int(index)]["capacity_w"] = int(max(4 * 1000, flows_w[int(index)] * LIMITED_SHARE))
    return grid_from_dict(grid_dict)


def instances(sizes: tuple[int, ...], networks: tuple[str, ...], seed: int) -> Iterator[Instance]:
    for size in sizes:
        for network in networks:
            progress(f"generating {size} orders on {network}")
            if network == "single":
                grid = single_node_grid()
                yield Instance(network, grid, generate_orders(size, 1, seed=seed + size))
            elif network == "meshed30":
                request = generate_orders(size, 30, seed=seed + size + 1)
                progress("limiting the most loaded lines of meshed30 so that they bind")
                yield Instance(network, limit_loaded_lines(meshed_grid(), request, limited=4), request)
            elif network == "radial100":
                request = generate_orders(size, 100, seed=seed + size + 2)
                progress("limiting the most loaded lines of radial100 so that they bind")
                yield Instance(network, limit_loaded_lines(radial_grid(), request, limited=6), request)
            else:
                raise ValueError(f"unknown network {network!r} (choose from {', '.join(NETWORKS)})")


def best_of(repeat: int, run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def measure(
    instance: Instance, *, repeat: int, shuffled: bool, seed: int, allocator: str = "default"
) -> dict[str, Any]:
    request = instance.request
    if shuffled:
        request = request.take(np.random.default_rng(seed).permutation(len(request)))
    prices: npt.NDArray[np.int64] = np.asarray(request.price_micro_per_kwh)
    progress(f"clearing {len(request)} orders on {instance.network} ({repeat} runs after a warm-up)")
    # One untimed run warms up imports and the memory allocator. Then the two
    # are timed in turns, so that load from elsewhere on the machine hits both
    # alike, and the best run of each counts.
    fastest: ClearingResult = clear(request, instance.grid)
    clear_best = float("inf")
    sort_best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        result = clear(request, instance.grid)
        elapsed = time.perf_counter() - started
        if elapsed < clear_best:
            clear_best, fastest = elapsed, result
        # Results are not kept: holding on to them would grow the heap every run.
        del result
        sort_best = min(sort_best, best_of(1, lambda: np.argsort(prices)))
    return {
        "n_orders": len(request),
        "network": instance.network,
        "clear_s": round(clear_best, 9),
        "sort_baseline_s": round(sort_best, 9),
        "ratio": round(clear_best / sort_best, 3),
        "nodes": len(instance.grid.nodes),
        "lines": len(instance.grid.lines),
        "binding_lines": int(fastest.binding.sum()),
        "steps": fastest.solver["steps"],
        "lp_rounds": fastest.solver["lp_rounds"],
        "lp_columns": fastest.solver["lp_columns"],
        "rounding": fastest.solver["rounding"],
        "trades": len(fastest.trade_energy_wh),
        "traded_wh": fastest.traded_wh,
        "input": "shuffled" if shuffled else "book order",
        "repeat": repeat,
        "allocator": allocator,
        "steps_s": {k: round(v, 6) for k, v in fastest.timings_s.items()},
    }


def run_files(
    orders_file: Path, grid_file: Path, *, repeat: int, shuffled: bool, seed: int, allocator: str
) -> dict[str, Any]:
    grid = load_grid(grid_file)
    progress(f"reading {orders_file}")
    with orders_file.open(encoding="utf-8", newline="") as handle:
        request = read_orders_csv(handle, grid, source=str(orders_file))
    instance = Instance(grid_file.stem, grid, request)
    return measure(instance, repeat=repeat, shuffled=shuffled, seed=seed, allocator=allocator)


def main(
    *,
    sizes: tuple[int, ...] = SIZES,
    networks: tuple[str, ...] = NETWORKS,
    repeat: int = 3,
    seed: int = 1,
    shuffled: bool = False,
    orders_file: Path | None = None,
    grid_file: Path | None = None,
    keep_memory: bool = True,
) -> int:
    allocator = "glibc, freed memory kept" if keep_memory and keep_freed_memory() else "default"
    if orders_file is not None and grid_file is not None:
        line = run_files(
            orders_file, grid_file, repeat=repeat, shuffled=shuffled, seed=seed, allocator=allocator
        )
        print(json.dumps(line), flush=True)
        return 0
    for instance in instances(sizes, networks, seed):
        line = measure(instance, repeat=repeat, shuffled=shuffled, seed=seed, allocator=allocator)
        print(json.dumps(line), flush=True)
    return 0
