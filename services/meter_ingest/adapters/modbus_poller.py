"""Async Modbus poller (pymodbus 3.16): many meters per gateway on one connection, readings out through a sink.

Per gateway (a Modbus TCP device or an RS-485/TCP gateway speaking Modbus TCP
or RTU over TCP) one connection and one task poll its meters strictly one
request at a time, each meter on its own interval. Per meter the poller
finds SunSpec models by discovery, reads configuration registers that change
the meaning of others (and re-reads them hourly and after reconnects), packs
the data reads with the map's plan and decodes them with the pure codec.

Failures become flagged values, never zeros and never a stalled gateway:
- an exception response flags the values of that read (`exception`, with the
  code in the detail); a packed read refused with exception 2 is probed field by
  field once, refused fields are then left out (flagged, re-checked with the
  configuration), so one unsupported register costs only its own value;
- no answer flags the rest of that meter's poll (`timeout`) and moves on to
  the next meter; on RTU a quiet gap follows, so a late answer cannot be
  taken for the next request's (answers are also checked for function code,
  unit and length);
- after `offline_after_failures` polls without any answer the meter is
  OFFLINE and polled with exponential back-off until it answers again;
- a lost connection flags values `unreachable` and is re-established with
  back-off; many timeouts in a row across the gateway reset the connection.

Readings go to `sink` (an async callable; `queue_sink` adapts an asyncio
queue), which is where the publisher plugs in.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.framer import FramerType

from services.domain.intervals import Clock, RealClock
from services.meter_ingest.domain.codec import RegisterImage, configure, decode
from services.meter_ingest.domain.planning import ReadRequest, plan_reads, split_per_field
from services.meter_ingest.domain.quantities import Quality, QuantityValue
from services.meter_ingest.domain.readings import MeterReading, MeterStatus
from services.meter_ingest.domain.register_map import Field, RegisterMap
from services.meter_ingest.domain.sunspec import DiscoveryError, discover

Framer = Literal["socket", "rtu"]
Sink = Callable[[MeterReading], Awaitable[None]]
_FRAMERS: dict[str, FramerType] = {"socket": FramerType.SOCKET, "rtu": FramerType.RTU}


def queue_sink(queue: asyncio.Queue[MeterReading]) -> Sink:
    """A sink that puts readings on an asyncio queue (waiting when it is full)."""

    async def put(reading: MeterReading) -> None:
        await queue.put(reading)

    return put


@dataclass(frozen=True, slots=True)
class MeterTarget:
    """One meter to poll: its id, register map, unit id (map default if None) and poll interval."""

    meter_id: str
    register_map: RegisterMap
    unit_id: int | None = None
    poll_interval_s: float = 5.0
    quantities: tuple[str, ...] | None = None

    @property
    def unit(self) -> int:
        return self.register_map.transport.unit_id if self.unit_id is None else self.unit_id


@dataclass(frozen=True, slots=True)
class GatewayTarget:
    """One connection: host, port, framing and the meters behind it."""

    host: str
    port: int
    meters: tuple[MeterTarget, ...]
    framer: Framer = "socket"
    timeout_s: float | None = None  # default: the largest timeout of its maps
    inter_request_gap_s: float | None = None  # default: the maps' RS-485 quiet time on RTU, else 0
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PollerSettings:
    offline_after_failures: int = 3
    backoff_max_s: float = 300.0
    reconnect_initial_s: float = 0.2
    reconnect_max_s: float = 30.0
    config_refresh_s: float = 3600.0
    # This many timeouts in a row on one gateway (no answer from any meter) reset its connection.
    gateway_reset_after_timeouts: int = 8
    # After a timeout on RTU, keep the line quiet this long (default: the timeout) before the next request.
    rtu_quiet_s: float | None = None
    # pymodbus logs every timeout with a frame dump; the poller reports them itself.
    quiet_pymodbus_logging: bool = True


@dataclass(slots=True)
class MeterState:
    """What the poller knows about one meter (for status pages and metrics)."""

    meter_id: str
    gateway: str
    unit_id: int
    status: MeterStatus = MeterStatus.ONLINE
    consecutive_failures: int = 0
    polls: int = 0
    missed_polls: int = 0
    # Polls that started more than a tenth of the interval after their slot.
    late_polls: int = 0
    failed_polls: int = 0
    last_ok_at_s: float | None = None
    invalid_values: int = 0
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Failure:
    quality: Quality
    detail: str
    code: int | None = None


@dataclass(slots=True)
class _Meter:
    target: MeterTarget
    state: MeterState
    map: RegisterMap | None = None  # anchored (SunSpec) and configured
    fields: list[Field] = field(default_factory=list)
    plan: list[ReadRequest] = field(default_factory=list)
    # Fields the meter refused with exception 2 when read on their own, and whether that was probed.
    refused: dict[str, str] = field(default_factory=dict)
    probed: bool = False
    prepared_at: float | None = None  # loop time of the last discovery and configuration
    due: float = 0.0
    sequence: int = 0
    notes: tuple[str, ...] = ()

    def __lt__(self, other: _Meter) -> bool:
        return self.due < other.due


class _Gateway:
    def __init__(self, target: GatewayTarget, poller: ModbusPoller) -> None:
        if target.framer not in _FRAMERS:
            raise ValueError(f"framer must be 'socket' or 'rtu', got {target.framer!r}")
        if not target.meters:
            raise ValueError(f"gateway {target.label} has no meters")
        self.target = target
        self.poller = poller
        self.settings = poller.settings
        maps = [m.register_map for m in target.meters]
        self.timeout_s = target.timeout_s or max(m.transport.timeout_s for m in maps)
        if target.inter_request_gap_s is not None:
            self.gap_s = target.inter_request_gap_s
        else:
            self.gap_s = max(m.transport.inter_request_gap_s for m in maps) if target.framer == "rtu" else 0.0
        self.client: AsyncModbusTcpClient | None = None
        self.reconnect_delay_s = self.settings.reconnect_initial_s
        self.next_connect_at = 0.0
        self.timeouts_in_row = 0
        self.stopping = False
        # One poll at a time per connection, also when `poll_once` runs next to the schedule.
        self.lock = asyncio.Lock()
        self.meters: dict[str, _Meter] = {}
        units: set[int] = set()
        for m in target.meters:
            if m.unit in units:
                raise ValueError(f"gateway {target.label}: unit id {m.unit} is used by two meters")
            units.add(m.unit)
            if m.poll_interval_s <= 0:
                raise ValueError(f"meter {m.meter_id}: poll_interval_s must be positive")
            self.meters[m.meter_id] = _Meter(m, MeterState(m.meter_id, target.label, m.unit))

    # ---------------------------------------------------------------- connection

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.connected

    async def ensure_connected(self) -> bool:
        if self.connected:
            return True
        loop = asyncio.get_running_loop()
        if loop.time() < self.next_connect_at:
            return False
        self.close()
        client = AsyncModbusTcpClient(
            self.target.host,
            port=self.target.port,
            framer=_FRAMERS[self.target.framer],
            timeout=self.timeout_s,
            retries=0,
            reconnect_delay=0,
        )
        # The poller decides when a connection is dead, not pymodbus's no-answer counter.
        client.set_max_no_responses(1_000_000)
        ok = False
        try:
            ok = await client.connect()
        except (OSError, ModbusException):
            ok = False
        if ok and client.connected:
            self.client = client
            self.reconnect_delay_s = self.settings.reconnect_initial_s
            self.timeouts_in_row = 0
            for meter in self.meters.values():
                meter.prepared_at = None  # a reconnect may mean a replaced or reconfigured device
            return True
        client.close()
        self.next_connect_at = loop.time() + self.reconnect_delay_s
        self.reconnect_delay_s = min(self.reconnect_delay_s * 2, self.settings.reconnect_max_s)
        return False

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    # ---------------------------------------------------------------- one read

    async def read(self, request: ReadRequest, unit: int) -> list[int] | _Failure:
        if not await self.ensure_connected() or self.client is None:
            return _Failure(Quality.UNREACHABLE, f"no connection to {self.target.label}")
        client = self.client
        try:
            if request.function == 3:
                response = await client.read_holding_registers(
                    request.address, count=request.count, device_id=unit
                )
            else:
                response = await client.read_input_registers(
                    request.address, count=request.count, device_id=unit
                )
        except ConnectionException as exc:
            self.close()
            return _Failure(Quality.UNREACHABLE, f"connection lost: {exc}")
        except ModbusException as exc:
            # No answer within the timeout, or an answer to another request (unit or transaction id).
            return await self._no_answer(f"no valid answer in {self.timeout_s} s ({type(exc).__name__})")
        finally:
            if self.gap_s:
                await asyncio.sleep(self.gap_s)
        if response.isError():
            self.timeouts_in_row = 0
            code = int(getattr(response, "exception_code", 0))
            return _Failure(
                Quality.EXCEPTION,
                f"exception {code} on fc{request.function} {request.address}+{request.count}",
                code,
            )
        registers = list(getattr(response, "registers", []))
        if (
            response.function_code != request.function
            or len(registers) != request.count
            or (response.dev_id and response.dev_id != unit)
        ):
            return await self._no_answer(
                f"answer does not match the request (fc{response.function_code}, {len(registers)} registers)"
            )
        self.timeouts_in_row = 0
        return registers

    async def _no_answer(self, detail: str) -> _Failure:
        self.timeouts_in_row += 1
        if self.target.framer == "rtu":
            quiet_s = self.settings.rtu_quiet_s if self.settings.rtu_quiet_s is not None else self.timeout_s
            await asyncio.sleep(quiet_s)
        if self.timeouts_in_row >= self.settings.gateway_reset_after_timeouts:
            self.close()
            self.timeouts_in_row = 0
        return _Failure(Quality.TIMEOUT, detail)

    # ---------------------------------------------------------------- one poll

    async def _prepare(self, meter: _Meter) -> _Failure | None:
        """Discovery and configuration; None when the meter has a usable map."""
        loop_time = asyncio.get_running_loop().time()
        target = meter.target
        base = target.register_map
        stale = meter.prepared_at is None or loop_time - meter.prepared_at > self.settings.config_refresh_s
        # Configuration and refused registers are re-checked now and then; a reconnect clears prepared_at.
        if meter.map is None or ((base.config_registers or meter.refused) and stale):
            rmap = base
            if base.sunspec is not None:
                walk = discover(base.sunspec)
                try:
                    request = next(walk)
                    while True:
                        words = await self.read(request, target.unit)
                        if isinstance(words, _Failure) and words.quality in (
                            Quality.TIMEOUT,
                            Quality.UNREACHABLE,
                        ):
                            return words
                        request = walk.send(None if isinstance(words, _Failure) else words)
                except StopIteration as done:
                    rmap = base.anchored_at(done.value.address)
                except DiscoveryError as exc:
                    return _Failure(Quality.NO_DATA, f"SunSpec discovery: {exc}")
            notes: tuple[str, ...] = ()
            if rmap.config_registers:
                image = RegisterImage()
                for request in plan_reads(rmap.config_fields(), rmap.transport):
                    words = await self.read(request, target.unit)
                    if isinstance(words, _Failure):
                        if words.quality in (Quality.TIMEOUT, Quality.UNREACHABLE):
                            return words
                        image.fail(
                            request.function, request.address, request.count, words.quality, words.detail
                        )
                    else:
                        image.put(request.function, request.address, words)
                configured = configure(rmap, image)
                rmap, notes = configured.map, configured.notes
            meter.map = rmap
            meter.notes = notes
            meter.state.notes = notes
            meter.fields = rmap.data_fields(target.quantities)
            meter.plan = plan_reads(meter.fields, rmap.transport)
            meter.refused = {}
            meter.probed = False
            meter.prepared_at = loop_time
        return None

    def _replan_without_refused(self, meter: _Meter) -> None:
        """After probing: read the supported fields without spanning any register in between."""
        assert meter.map is not None
        meter.probed = True
        supported = [f for f in meter.fields if f.name not in meter.refused]
        if supported:
            meter.plan = plan_reads(supported, meter.map.transport, max_gap_registers=0)
        else:
            # Nothing is supported: keep one packed read per poll, as a sign of life.
            meter.plan = plan_reads(meter.fields, meter.map.transport)

    async def poll(self, meter: _Meter) -> MeterReading:
        target = meter.target
        names = (
            list(target.quantities) if target.quantities is not None else list(target.register_map.quantities)
        )
        failure = await self._prepare(meter)
        image = RegisterImage()
        error = ""
        answered = False
        if failure is not None:
            values = {name: QuantityValue.invalid(failure.quality, failure.detail) for name in names}
            error = failure.detail
            answered = failure.quality not in (Quality.TIMEOUT, Quality.UNREACHABLE)
        else:
            assert meter.map is not None
            rmap = meter.map
            started_s = self.poller.clock.now_s()
            pending = list(meter.plan)
            probing = False
            for f in meter.fields:
                if f.name in meter.refused and not any(r.covers(f) for r in pending):
                    image.fail(f.function, f.address, f.count, Quality.EXCEPTION, meter.refused[f.name])
            while pending:
                request = pending.pop(0)
                words = await self.read(request, target.unit)
                if not isinstance(words, _Failure):
                    answered = True
                    image.put(request.function, request.address, words)
                    continue
                error = error or words.detail
                if words.quality in (Quality.TIMEOUT, Quality.UNREACHABLE):
                    for rest in [request, *pending]:
                        image.fail(rest.function, rest.address, rest.count, words.quality, words.detail)
                    break
                answered = True
                inside = [f for f in meter.fields if request.covers(f)]
                if words.code == 2 and not meter.probed and len(inside) > 1:
                    # A packed read refused: find out field by field which registers the meter lacks.
                    probing = True
                    pending = split_per_field(inside, rmap.transport) + pending
                    continue
                if words.code == 2 and probing and len(inside) == 1:
                    meter.refused[inside[0].name] = (
                        f"{words.detail}: register not supported (re-checked hourly)"
                    )
                image.fail(request.function, request.address, request.count, words.quality, words.detail)
            if probing:
                self._replan_without_refused(meter)
            values = decode(rmap, image, names)
        now_s = self.poller.clock.now_s()
        # The meter sampled its registers somewhere between the first request and the last answer.
        read_at_s = now_s if failure is not None else (started_s + now_s) / 2
        state = meter.state
        state.polls += 1
        if answered:
            state.consecutive_failures = 0
            state.status = MeterStatus.ONLINE
            if any(v.ok for v in values.values()):
                state.last_ok_at_s = now_s
        else:
            state.failed_polls += 1
            state.consecutive_failures += 1
            if state.consecutive_failures >= self.settings.offline_after_failures:
                state.status = MeterStatus.OFFLINE
                if state.consecutive_failures == self.settings.offline_after_failures:
                    # A meter that comes back may have been replaced: discover and configure again.
                    meter.map = None
        state.invalid_values += sum(1 for v in values.values() if not v.ok)
        meter.sequence += 1
        return MeterReading(
            meter_id=target.meter_id,
            read_at_s=read_at_s,
            values=values,
            status=state.status,
            error=error,
            sequence=meter.sequence,
            notes=meter.notes,
        )

    # ---------------------------------------------------------------- schedule

    def _next_interval_s(self, meter: _Meter) -> float:
        interval = meter.target.poll_interval_s
        state = meter.state
        if state.status is MeterStatus.OFFLINE:
            excess = state.consecutive_failures - self.settings.offline_after_failures
            return min(math.ldexp(interval, min(excess + 1, 30)), max(self.settings.backoff_max_s, interval))
        return interval

    async def run(self, phase: float = 0.0) -> None:
        """Poll until stopped; `phase` in [0, 1) shifts this gateway's slots against the others'."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        count = len(self.meters)
        heap: list[_Meter] = []
        for i, meter in enumerate(self.meters.values()):
            # Spread first polls over one interval so a gateway's meters are not all due at once, and
            # shift gateways against each other so their requests do not reach a shared host in bursts.
            meter.due = now + meter.target.poll_interval_s * (i + phase) / count
            heapq.heappush(heap, meter)
        # The flag as well as cancellation: on Python 3.11 a wait_for inside pymodbus can swallow a cancel.
        while not self.stopping:
            meter = heapq.heappop(heap)
            delay = meter.due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif -delay > 0.1 * meter.target.poll_interval_s:
                meter.state.late_polls += 1
            async with self.lock:
                reading = await self.poll(meter)
            await self.poller.sink(reading)
            interval = self._next_interval_s(meter)
            now = loop.time()
            if meter.state.status is MeterStatus.OFFLINE:
                meter.due = now + interval
            else:
                meter.due += interval
                if meter.due < now:
                    # The gateway fell behind: skip the slots that can no longer be kept.
                    skipped = math.ceil((now - meter.due) / interval)
                    meter.state.missed_polls += skipped
                    meter.due += skipped * interval
            heapq.heappush(heap, meter)


class ModbusPoller:
    """Polls meters on gateways and hands every reading (valid or flagged) to `sink`."""

    def __init__(
        self,
        gateways: Sequence[GatewayTarget],
        sink: Sink,
        clock: Clock | None = None,
        settings: PollerSettings | None = None,
    ) -> None:
        self.settings = settings or PollerSettings()
        self.sink = sink
        self.clock: Clock = clock or RealClock()
        self._gateways = [_Gateway(g, self) for g in gateways]
        self._by_meter: dict[str, _Gateway] = {}
        for gateway in self._gateways:
            for meter_id in gateway.meters:
                if meter_id in self._by_meter:
                    raise ValueError(f"meter id {meter_id!r} appears on two gateways")
                self._by_meter[meter_id] = gateway
        self._tasks: list[asyncio.Task[None]] = []
        if self.settings.quiet_pymodbus_logging:
            logging.getLogger("pymodbus.logging").setLevel(logging.CRITICAL)

    def states(self) -> dict[str, MeterState]:
        return {mid: g.meters[mid].state for mid, g in self._by_meter.items()}

    def totals(self) -> dict[str, int]:
        states = list(self.states().values())
        return {
            "polls": sum(s.polls for s in states),
            "missed_polls": sum(s.missed_polls for s in states),
            "late_polls": sum(s.late_polls for s in states),
            "failed_polls": sum(s.failed_polls for s in states),
            "invalid_values": sum(s.invalid_values for s in states),
        }

    async def start(self) -> None:
        """Start one polling task per gateway."""
        if self._tasks:
            raise RuntimeError("the poller is already running")
        self._tasks = [asyncio.create_task(g.run(), name=f"poll {g.target.label}") for g in self._gateways]

    async def stop(self) -> None:
        """Stop polling and close every connection."""
        for gateway in self._gateways:
            gateway.stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for gateway in self._gateways:
            gateway.close()
            gateway.stopping = False

    async def run(self) -> None:
        """Poll until cancelled; a gateway task that fails stops the poller loudly."""
        await self.start()
        try:
            await asyncio.gather(*self._tasks)
        finally:
            await self.stop()

    async def poll_once(self, meter_id: str) -> MeterReading:
        """Poll one meter now, outside the schedule (the `meters read` command)."""
        gateway = self._by_meter.get(meter_id)
        if gateway is None:
            raise KeyError(f"unknown meter id {meter_id!r}")
        async with gateway.lock:
            return await gateway.poll(gateway.meters[meter_id])

    async def close(self) -> None:
        await self.stop()


def meters_for(
    register_map: RegisterMap,
    units: Iterable[int],
    *,
    poll_interval_s: float = 5.0,
    prefix: str = "meter",
) -> tuple[MeterTarget, ...]:
    """Meter targets for consecutive units of one model (for the simulator, tests and benchmarks)."""
    return tuple(
        MeterTarget(f"{prefix}-{unit}", register_map, unit_id=unit, poll_interval_s=poll_interval_s)
        for unit in units
    )
