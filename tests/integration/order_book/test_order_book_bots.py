"""The three example bots trade through a running order book, with a toy clearing answering each gate closure.

The PV bot runs as its own process from the command line, the EV and
battery bots through their `run` entry points in this process.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, OrderBookFactory
from order_book_harness import toy_clearing_loop

from examples.bots import battery, ev
from examples.bots.common import BotReport, MarketTiming
from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2 as pb
from services.order_book.client import BotKey, OrderBookClient
from services.platform.nats_server import NatsServer

# 2027-01-15 12:00 UTC: the sun is up for the PV bot.
NOON_S = 1_800_014_400.0
RUN_WALL_S = 8.0


@pytest.mark.slow
def test_the_pv_ev_and_battery_bots_place_orders_and_receive_fills(
    order_book_factory: OrderBookFactory, sqlite_url: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    process = order_book_factory(sqlite_url, speedup=60.0, sim_start_s=NOON_S, anchor_wall_s=time.time())
    timing = MarketTiming(process.clock, process.interval_s, process.gate_closure_s, 96)
    pv_key_file = tmp_path / "pv.key"
    pv_bot = subprocess.Popen(
        [
            sys.executable, "-m", "examples.bots.pv",
            "--target", process.target, "--key-file", str(pv_key_file), "--node", "n0",
            "--interval-s", str(process.interval_s), "--gate-closure-s", str(process.gate_closure_s),
            "--clock", "sim", "--sim-start-s", repr(process.sim_start_s),
            "--sim-speedup", repr(process.speedup), "--sim-anchor-wall-s", repr(process.anchor_wall_s),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    keys = {"ev": BotKey.generate(), "battery": BotKey.generate()}
    ev_params = ev.EvParams(need_wh=1_000, deadline_intervals=20)
    battery_params = battery.BatteryParams(capacity_wh=400, initial_soc_wh=200)

    async def scenario() -> tuple[dict[str, BotReport], int]:
        stop = asyncio.Event()
        clearing = asyncio.ensure_future(toy_clearing_loop(nats_server.url, stop))
        bots = {
            "ev": asyncio.ensure_future(ev.run(process.target, keys["ev"], "n1", timing, stop, ev_params)),
            "battery": asyncio.ensure_future(
                battery.run(process.target, keys["battery"], "n2", timing, stop, battery_params)
            ),
        }
        await asyncio.sleep(RUN_WALL_S)
        stop.set()
        reports = {name: await asyncio.wait_for(task, 15) for name, task in bots.items()}
        return reports, await asyncio.wait_for(clearing, 15)

    try:
        reports, cleared = asyncio.run(scenario())
    finally:
        pv_bot.send_signal(signal.SIGTERM)
        output = pv_bot.communicate(timeout=15)[0].decode()
    assert pv_bot.returncode == 0, output
    keys["pv"] = BotKey.load(pv_key_file)

    async def books() -> dict[str, list[pb.Order]]:
        orders = {}
        for name, key in keys.items():
            async with OrderBookClient(process.target, key) as client:
                orders[name] = await client.list_orders()
        return orders

    orders = asyncio.run(books())
    assert cleared >= 4
    for name, key in keys.items():
        assert orders[name] and {o.participant_id for o in orders[name]} == {key.participant_id}, name
    pv_orders = orders["pv"]
    assert {o.body.side for o in pv_orders} == {common_pb2.SIDE_SELL}
    assert sum(o.accepted_wh for o in pv_orders if o.state == pb.ORDER_STATE_FILLED) > 0
    assert "finished" in output
    for name, report in reports.items():
        assert report.placed > 0 and report.fills > 0, (name, report)
    assert 0 < reports["ev"].bought_wh <= ev_params.need_wh
    # The EV never commits to more than it needs: what it got plus what it still waits for.
    committed_wh = sum(
        o.accepted_wh if o.state == pb.ORDER_STATE_FILLED else o.body.energy_wh
        for o in orders["ev"]
        if o.state != pb.ORDER_STATE_CANCELLED
    )
    assert committed_wh <= ev_params.need_wh
    soc = reports["battery"].state_of_charge_wh
    assert soc is not None and 0 <= soc <= battery_params.capacity_wh
