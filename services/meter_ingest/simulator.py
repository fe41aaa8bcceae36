"""Simulated Modbus meters: many meters behind one simulated gateway, over Modbus TCP or RTU over TCP.

Each `ProfileMeter` follows a household load and a PV profile on a (simulated)
clock; its import and export counters are the exact integral of its power,
so counters always grow consistently with power. A `StaticMeter` serves fixed
registers, such as a map's test vectors. Faults can be injected at run time:
no answer (timeout), exception 2 or 4, NaN or sentinel values, a real counter
reset, a counter that briefly reads 0 (backwards) or garbage (jump), or an
answer that comes after the client gave up (slow).

The gateway is a pymodbus 3.16 server built from `SimDevice`/`SimData` with
separate holding and input register blocks, the gaps between defined
registers filled so reads may span them as the map allows. It answers unknown
unit ids with exception 0x0B (gateway target failed to respond), as a real
gateway does, and simply does not answer for a meter in a timeout fault.

Library use (tests, `p2pgrid up`, benchmarks): build meters, `await
Gateway(meters).start()`, `await gateway.stop()`. Command line: `p2pgrid
meters simulate` (see `services/meter_ingest/cli.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import IO, Any

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType, SimData, SimDevice

from services.domain.intervals import Clock
from services.meter_ingest.domain.codec import raw_to_words, scale_factor_for, sentinel_words
from services.meter_ingest.domain.register_map import Quantity, RegisterBlock, RegisterMap, ValueType

SUNSPEC_BASE = 40000
SUNSPEC_COMMON_LENGTH = 65
SUNSPEC_MODEL_ADDRESS = SUNSPEC_BASE + 2 + 2 + SUNSPEC_COMMON_LENGTH  # 40069, as Fronius places it
BUCKET_S = 10  # power is constant within a 10-second bucket of simulated time
# What a household connection never exceeds: sets SunSpec scale factors to household resolution.
HOUSEHOLD_MAXIMA = {"W": 30_000.0, "A": 150.0, "V": 300.0, "Hz": 65.0}
SECONDS_PER_DAY = 86_400


class FaultKind(StrEnum):
    """Faults a simulated meter can show."""

    TIMEOUT = "timeout"
    # Answers, but only after `slow_s` (longer than the client's timeout: the answer arrives late).
    SLOW = "slow"
    EXCEPTION_2 = "exception2"
    EXCEPTION_4 = "exception4"
    NAN = "nan"
    SENTINEL = "sentinel"
    COUNTER_RESET = "counter_reset"
    BACKWARDS = "backwards"
    JUMP = "jump"


@dataclass(slots=True)
class _ActiveFault:
    kind: FaultKind
    reads_left: int | None  # None: until cleared


def _hash01(*parts: int) -> float:
    """A fast deterministic pseudo-random number in [0, 1) from integers."""
    h = 0x811C9DC5
    for part in parts:
        h = ((h ^ (part & 0xFFFFFFFF)) * 0x01000193) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0x5BD1E995) & 0xFFFFFFFF
        h ^= h >> 15
    return h / 4294967296.0


@dataclass(frozen=True, slots=True)
class Profile:
    """A household with PV: base load, morning and evening peaks, appliance spikes, PV with clouds."""

    seed: int
    pv_peak_w: float
    base_load_w: float
    phase_shares: tuple[float, float, float] = (0.5, 0.3, 0.2)

    @classmethod
    def for_meter(cls, seed: int) -> Profile:
        return cls(
            seed=seed,
            pv_peak_w=2000 + 8000 * _hash01(seed, 1),
            base_load_w=150 + 450 * _hash01(seed, 2),
        )

    def load_w(self, bucket: int) -> float:
        t = bucket * BUCKET_S + BUCKET_S / 2
        hour = (t % SECONDS_PER_DAY) / 3600
        morning = 900 * math.exp(-(((hour - 7.5) / 0.8) ** 2))
        evening = 1600 * math.exp(-(((hour - 19.5) / 1.5) ** 2))
        minute = int(t // 60)
        spike = 2000.0 if _hash01(self.seed, minute, 3) < 0.04 else 0.0
        noise = 120 * (_hash01(self.seed, bucket, 4) - 0.5)
        return self.base_load_w + morning + evening + spike + noise

    def pv_w(self, bucket: int) -> float:
        t = bucket * BUCKET_S + BUCKET_S / 2
        hour = (t % SECONDS_PER_DAY) / 3600
        sun = math.sin(math.pi * (hour - 6) / 12)
        if sun <= 0:
            return 0.0
        cloud = 0.55 + 0.45 * _hash01(self.seed, int(t // 300), 5)
        return self.pv_peak_w * math.pow(sun, 1.5) * cloud

    def power_w(self, bucket: int) -> float:
        """Net power at the connection point, import positive."""
        return self.load_w(bucket) - self.pv_w(bucket)

    def energy_wh(self, t0_s: float, t1_s: float) -> tuple[float, float]:
        """Exact (import, export) energy between two simulated instants: power is constant per bucket."""
        import_wh = export_wh = 0.0
        t = t0_s
        while t < t1_s:
            bucket = int(t // BUCKET_S)
            step_end = min(t1_s, (bucket + 1) * BUCKET_S)
            energy_wh = self.power_w(bucket) * (step_end - t) / 3600
            if energy_wh >= 0:
                import_wh += energy_wh
            else:
                export_wh -= energy_wh
            t = step_end
        return import_wh, export_wh


class _FastEncoder:
    """Encodes one quantity's canonical value into its words without Decimal (the simulator's hot path)."""

    def __init__(self, quantity: Quantity, exponent: int) -> None:
        self.quantity = quantity
        f = quantity.field
        self.vtype = f.type
        self.factor = 1.0 / float(quantity.scale * quantity.sign * Decimal(10) ** exponent)
        self.count = f.count
        self.encoding = f.encoding
        bits = 16 * f.count
        if f.type.is_signed:
            self.lo, self.hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        else:
            self.lo, self.hi = 0, (1 << bits) - 1
        self.invalid_words = sentinel_words(f)

    def words(self, value: float | None) -> list[int] | None:
        if value is None or math.isnan(value):
            return self.invalid_words
        raw_value = value * self.factor
        vtype = self.vtype
        if vtype is ValueType.FLOAT32:
            raw = int.from_bytes(struct.pack(">f", raw_value), "big")
        elif vtype is ValueType.FLOAT64:
            raw = int.from_bytes(struct.pack(">d", raw_value), "big")
        else:
            whole = min(max(round(raw_value), self.lo), self.hi)
            raw = whole & ((1 << (16 * self.count)) - 1)
        return raw_to_words(raw, self.count, self.encoding)


def _sunspec_frame(rmap: RegisterMap) -> tuple[RegisterMap, list[RegisterBlock]]:
    """Anchor a SunSpec map at 40069 and add the "SunS" marker, common model and chain end."""
    assert rmap.sunspec is not None
    model_id = rmap.sunspec.model_ids[0]
    fields = rmap.data_fields() + rmap.config_fields()
    length = rmap.sunspec.model_lengths.get(model_id, max(f.end for f in fields) - 2)
    anchored = rmap.anchored_at(SUNSPEC_MODEL_ADDRESS)
    common = [1, SUNSPEC_COMMON_LENGTH] + [0] * SUNSPEC_COMMON_LENGTH
    frame = [
        RegisterBlock(3, SUNSPEC_BASE, (0x5375, 0x6E53)),
        RegisterBlock(3, SUNSPEC_BASE + 2, tuple(common)),
        RegisterBlock(3, SUNSPEC_MODEL_ADDRESS, (model_id, length)),
        RegisterBlock(3, SUNSPEC_MODEL_ADDRESS + 2 + length, (0xFFFF, 0)),
    ]
    return anchored, frame


class SimulatedMeter:
    """What every simulated meter offers the gateway: a unit id, register blocks and a read hook."""

    unit_id: int

    def __init__(self, unit_id: int) -> None:
        self.unit_id = unit_id
        self.faults: dict[FaultKind, _ActiveFault] = {}
        self.reads = 0
        self.slow_s = 1.0

    def inject(self, kind: FaultKind | str, reads: int | None = None) -> None:
        """Start a fault; `reads` limits it to that many reads, None keeps it until `clear`."""
        fault = FaultKind(kind)
        if fault is FaultKind.COUNTER_RESET:
            self.reset_counters()
            return
        self.faults[fault] = _ActiveFault(fault, reads)

    def clear(self, kind: FaultKind | str | None = None) -> None:
        if kind is None:
            self.faults.clear()
        else:
            self.faults.pop(FaultKind(kind), None)

    def reset_counters(self) -> None:
        """A real counter reset (as over Modbus); meters without counters ignore it."""

    def silent(self) -> bool:
        return self._fault_active(FaultKind.TIMEOUT, consume=True)

    def _fault_active(self, kind: FaultKind, consume: bool = False) -> bool:
        fault = self.faults.get(kind)
        if fault is None:
            return False
        if consume and fault.reads_left is not None:
            fault.reads_left -= 1
            if fault.reads_left <= 0:
                del self.faults[kind]
        return True

    def blocks(self) -> list[RegisterBlock]:
        raise NotImplementedError

    def refresh(self, function: int, start_address: int, registers: list[int]) -> None:
        """Write the current register values into the server's block before a read is answered."""

    async def action(
        self,
        function: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if self._fault_active(FaultKind.SLOW, consume=True):
            await asyncio.sleep(self.slow_s)
        if self._fault_active(FaultKind.EXCEPTION_2, consume=True):
            return ExcCodes.ILLEGAL_ADDRESS
        if self._fault_active(FaultKind.EXCEPTION_4, consume=True):
            return ExcCodes.DEVICE_FAILURE
        if set_values is None:
            self.reads += 1
            self.refresh(function, start_address, registers)
        return None


class StaticMeter(SimulatedMeter):
    """A meter that serves fixed register blocks (for example a map's test vector)."""

    def __init__(self, unit_id: int, blocks: Sequence[RegisterBlock]) -> None:
        super().__init__(unit_id)
        self._blocks = list(blocks)

    def blocks(self) -> list[RegisterBlock]:
        return list(self._blocks)


class ProfileMeter(SimulatedMeter):
    """A household meter following a load and PV profile on the simulated clock.

    Counters integrate the piecewise-constant power exactly: import counts
    positive net power, export negative. `true_counters_wh()` gives the exact
    state for tests.
    """

    def __init__(
        self,
        rmap: RegisterMap,
        unit_id: int,
        clock: Clock,
        *,
        profile: Profile | None = None,
        import_wh: float = 0.0,
        export_wh: float = 0.0,
        voltage_v: float = 230.0,
    ) -> None:
        super().__init__(unit_id)
        self.clock = clock
        self.profile = profile or Profile.for_meter(unit_id)
        self.voltage_v = voltage_v
        self.import_wh = import_wh
        self.export_wh = export_wh
        self._t_s: float | None = None
        self.frame: list[RegisterBlock] = []
        if rmap.sunspec is not None:
            rmap, self.frame = _sunspec_frame(rmap)
        self.map = rmap
        exponents = {name: scale_factor_for(rmap, name, HOUSEHOLD_MAXIMA) for name in rmap.scale_factors}
        self._scale_factor_blocks = [
            RegisterBlock(f.function, f.address, tuple(raw_to_words(exponents[name] & 0xFFFF, 1, f.encoding)))
            for name, f in rmap.scale_factors.items()
        ]
        self._encoders: dict[int, list[_FastEncoder]] = {}
        for quantity in rmap.quantities.values():
            exponent = exponents[quantity.scale_factor] if quantity.scale_factor else 0
            self._encoders.setdefault(quantity.field.function, []).append(_FastEncoder(quantity, exponent))
        self._config_blocks = self._default_config()
        self._phases = rmap.phases

    def _default_config(self) -> list[RegisterBlock]:
        """Configuration registers as a factory-set meter holds them (kWh, high word first)."""
        blocks = []
        for config in self.map.config_registers:
            f = config.field
            if config.marker is not None:
                raw = int.from_bytes(struct.pack(">f", config.marker), "big")
            else:
                current = self.map.quantities[config.applies_to[0]].scale
                setting = next((k for k, v in config.values.items() if v == current), min(config.values))
                raw = (
                    int.from_bytes(struct.pack(">f", float(setting)), "big")
                    if f.type.is_float
                    else setting & ((1 << (16 * f.count)) - 1)
                )
            blocks.append(RegisterBlock(f.function, f.address, tuple(raw_to_words(raw, f.count, f.encoding))))
        return blocks

    def blocks(self) -> list[RegisterBlock]:
        blocks = list(self.frame) + list(self._scale_factor_blocks) + list(self._config_blocks)
        for encoders in self._encoders.values():
            for encoder in encoders:
                f = encoder.quantity.field
                blocks.append(RegisterBlock(f.function, f.address, (0,) * f.count))
        return blocks

    def reset_counters(self) -> None:
        self.advance()
        self.import_wh = 0.0
        self.export_wh = 0.0

    def advance(self) -> float:
        """Integrate power up to the clock's now; returns the simulated time."""
        now = self.clock.now_s()
        if self._t_s is None:
            self._t_s = now
            return now
        if now > self._t_s:
            import_wh, export_wh = self.profile.energy_wh(self._t_s, now)
            self.import_wh += import_wh
            self.export_wh += export_wh
            self._t_s = now
        return now

    def true_counters_wh(self) -> tuple[float, float]:
        self.advance()
        return self.import_wh, self.export_wh

    def values(self) -> dict[str, float | None]:
        """Canonical values now (counters advanced), before faults."""
        t = self.advance()
        bucket = int(t // BUCKET_S)
        load = self.profile.load_w(bucket)
        pv = self.profile.pv_w(bucket)
        shares = self.profile.phase_shares if self._phases == 3 else (1.0, 0.0, 0.0)
        pv_share = 1 / 3 if self._phases == 3 else 1.0
        values: dict[str, float | None] = {
            "energy_import_wh": self.import_wh,
            "energy_export_wh": self.export_wh,
            "frequency_hz": 50.0 + 0.04 * (_hash01(self.profile.seed, bucket, 6) - 0.5),
        }
        total = 0.0
        for i in range(3):
            phase = i + 1
            if self._phases == 1 and phase > 1:
                break
            p = load * shares[i] - pv * pv_share
            total += p
            v = self.voltage_v + 3 * math.sin(t / 600 + i) + (_hash01(self.profile.seed, bucket, 7 + i) - 0.5)
            values[f"power_l{phase}_w"] = p
            values[f"voltage_l{phase}_v"] = v
            values[f"current_l{phase}_a"] = abs(p) / v
        values["power_w"] = total
        return values

    def _faulted(self, values: dict[str, float | None]) -> dict[str, float | None]:
        if self._fault_active(FaultKind.NAN, consume=True) or self._fault_active(
            FaultKind.SENTINEL, consume=True
        ):
            return dict.fromkeys(values)
        if self._fault_active(FaultKind.BACKWARDS, consume=True):
            values = {**values, "energy_import_wh": 0.0, "energy_export_wh": 0.0}
        if self._fault_active(FaultKind.JUMP, consume=True):
            imp, exp = values.get("energy_import_wh"), values.get("energy_export_wh")
            values = {
                **values,
                "energy_import_wh": None if imp is None else imp * 1000 + 10**9,
                "energy_export_wh": None if exp is None else exp * 1000 + 10**9,
            }
        return values

    def refresh(self, function: int, start_address: int, registers: list[int]) -> None:
        encoders = self._encoders.get(function)
        if not encoders:
            return
        values = self._faulted(self.values())
        for encoder in encoders:
            name = encoder.quantity.name
            if name not in values:
                continue
            words = encoder.words(values[name])
            if words is None:
                # A fault asked for "invalid" but this register type has no way to say it.
                words = encoder.words(self.values()[name])
            if words is None:
                continue
            offset = encoder.quantity.field.address - start_address
            registers[offset : offset + len(words)] = words


def vector_meters(rmap: RegisterMap, first_unit: int = 1) -> list[StaticMeter]:
    """One static meter per test vector of the map, on the vector's unit id or numbered from `first_unit`."""
    meters = []
    used: set[int] = set()
    next_unit = first_unit
    for vector in rmap.test_vectors:
        unit = vector.unit_id
        if unit is None or unit in used:
            while next_unit in used:
                next_unit += 1
            unit = next_unit
        used.add(unit)
        meters.append(StaticMeter(unit, vector.blocks))
    return meters


# --------------------------------------------------------------------------- the gateway


def _block_data(blocks: Sequence[RegisterBlock], function: int, fill_gaps: bool) -> list[SimData]:
    words: dict[int, int] = {}
    for block in blocks:
        if block.function != function:
            continue
        for i, word in enumerate(block.words):
            words[block.address + i] = word
    if not words:
        return [SimData(0, datatype=DataType.INVALID)]
    addresses = sorted(words)
    runs: list[tuple[int, list[int]]] = []
    if fill_gaps:
        lo, hi = addresses[0], addresses[-1]
        runs.append((lo, [words.get(a, 0) for a in range(lo, hi + 1)]))
    else:
        for a in addresses:
            if runs and a == runs[-1][0] + len(runs[-1][1]):
                runs[-1][1].append(words[a])
            else:
                runs.append((a, [words[a]]))
    return [SimData(address, values=values, datatype=DataType.REGISTERS) for address, values in runs]


def _device(meter: SimulatedMeter, fill_gaps: bool) -> SimDevice:
    blocks = meter.blocks()
    bits = [SimData(0, values=False, datatype=DataType.BITS)]
    return SimDevice(
        id=meter.unit_id,
        simdata=(bits, list(bits), _block_data(blocks, 3, fill_gaps), _block_data(blocks, 4, fill_gaps)),
        action=meter.action,
    )


class _Handler(ServerRequestHandler):
    """Request handler that stays silent for meters in a timeout fault and answers 0x0B for unknown units."""

    async def handle_request(self) -> None:
        pdu = self.last_pdu
        if pdu is not None:
            gateway: Gateway = self.server.gateway
            meter = gateway.meters.get(pdu.dev_id)
            if meter is None:
                if gateway.unknown_unit_silent:
                    return
                response = ExceptionResponse(pdu.function_code, ExcCodes.GATEWAY_NO_RESPONSE)
                response.transaction_id = pdu.transaction_id
                response.dev_id = pdu.dev_id
                self.server_send(response, self.last_addr)  # type: ignore[no-untyped-call]
                return
            if meter.silent():
                return
        await super().handle_request()  # type: ignore[no-untyped-call]


class _Server(ModbusTcpServer):
    def __init__(
        self, gateway: Gateway, devices: list[SimDevice], framer: FramerType, address: tuple[str, int]
    ) -> None:
        super().__init__(devices, framer=framer, address=address)
        self.gateway = gateway

    def callback_new_connection(self) -> _Handler:
        return _Handler(self, self.trace_packet, self.trace_pdu, self.trace_connect)  # type: ignore[no-untyped-call]


FRAMERS: dict[str, FramerType] = {"socket": FramerType.SOCKET, "rtu": FramerType.RTU}


@dataclass
class Gateway:
    """A Modbus TCP (or RTU over TCP) gateway serving simulated meters by unit id."""

    meter_list: Sequence[SimulatedMeter]
    host: str = "127.0.0.1"
    port: int = 0
    framer: str = "socket"
    fill_gaps: bool = True
    unknown_unit_silent: bool = False
    meters: dict[int, SimulatedMeter] = field(init=False)
    _server: Any = field(init=False, default=None)
    _task: asyncio.Task[None] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.framer not in FRAMERS:
            raise ValueError(f"framer must be one of {sorted(FRAMERS)}, got {self.framer!r}")
        self.meters = {}
        for meter in self.meter_list:
            if meter.unit_id in self.meters:
                raise ValueError(f"unit id {meter.unit_id} is used by two simulated meters")
            if not 1 <= meter.unit_id <= 247:
                raise ValueError(f"unit id {meter.unit_id} is outside 1..247")
            self.meters[meter.unit_id] = meter

    async def start(self) -> int:
        """Start listening; returns the bound port (useful with port 0)."""
        # pymodbus logs every client that disconnects mid-answer with a frame dump; that is normal here.
        logging.getLogger("pymodbus.logging").setLevel(logging.CRITICAL)
        devices = [_device(meter, self.fill_gaps) for meter in self.meters.values()]
        self._server = _Server(self, devices, FRAMERS[self.framer], (self.host, self.port))
        await self._server.serve_forever(background=True)
        self.port = int(self._server.transport.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()
            self._server = None

    def meter(self, unit_id: int) -> SimulatedMeter:
        return self.meters[unit_id]


def profile_meters(
    rmap: RegisterMap,
    count: int,
    clock: Clock,
    *,
    first_unit: int | None = None,
    seed: int = 0,
    initial_wh: Callable[[int], tuple[float, float]] | None = None,
) -> list[ProfileMeter]:
    """`count` household meters with different profiles, unit ids from `first_unit` (map default for one)."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    start = first_unit if first_unit is not None else (rmap.transport.unit_id if count == 1 else 1)
    meters = []
    for i in range(count):
        unit = start + i
        imp, exp = initial_wh(unit) if initial_wh else (1_000_000 + 37_000 * unit, 200_000 + 11_000 * unit)
        meters.append(
            ProfileMeter(
                rmap,
                unit,
                clock,
                profile=Profile.for_meter(seed * 10_007 + unit),
                import_wh=imp,
                export_wh=exp,
            )
        )
    return meters


def spawn_gateways(
    map_id: str,
    per_gateway: int,
    gateways: int,
    *,
    framer: str = "socket",
    speedup: float = 1.0,
    start_s: float | None = None,
    anchor_wall_s: float | None = None,
    first_unit: int | None = None,
    log: IO[bytes] | None = None,
    detached: bool = False,
) -> tuple[subprocess.Popen[bytes], list[int]]:
    """Start `p2pgrid meters simulate` in a process of its own (profile meters on free ports).

    Returns the process and its gateways' ports once it listens; its stderr goes to `log`. `detached`
    puts it in a session of its own, so a Ctrl-C in the terminal reaches only its owner, which stops it.
    Raises RuntimeError if it exits before listening.
    """
    command = [sys.executable, "-m", "services.cli", "meters", "simulate", "--map", map_id]
    command += ["--count", str(per_gateway), "--gateways", str(gateways), "--port", "0"]
    command += ["--framer", framer, "--speedup", repr(speedup)]
    if start_s is not None:
        command += ["--start", repr(start_s)]
    if anchor_wall_s is not None:
        command += ["--anchor-wall-s", repr(anchor_wall_s)]
    if first_unit is not None:
        command += ["--first-unit", str(first_unit)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, start_new_session=detached)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.kill()
        process.wait()
        raise RuntimeError(f"the meter simulator exited with {process.returncode} before listening")
    return process, [int(port) for port in json.loads(line)["ports"]]
