"""SunSpec discovery without I/O: find a meter model by walking the model chain after "SunS".

A SunSpec device marks its register space with "SunS" (0x5375 0x6E53) at
40000 (or 0 or 50000); model headers follow, each `(id, length)` and then
`length` registers, until id 0xFFFF. `discover` is a generator: it yields
each read it needs and is sent the words read (or None when the read
failed), and returns where the wanted model starts. The poller drives it over
Modbus; tests drive it over a register image.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

from services.meter_ingest.domain.planning import ReadRequest
from services.meter_ingest.domain.register_map import SunSpecAddressing

SUNS_MARKER = (0x5375, 0x6E53)
END_MODEL_ID = 0xFFFF
MAX_MODELS = 64  # a chain longer than this is corrupt, not a device
HOLDING = 3


@dataclass(frozen=True, slots=True)
class ModelLocation:
    """A discovered SunSpec model: its id, the address of its header and its declared length."""

    model_id: int
    address: int
    length: int


class DiscoveryError(ValueError):
    """The device does not offer any of the wanted SunSpec models."""


Discovery = Generator[ReadRequest, Sequence[int] | None, ModelLocation]


def discover(addressing: SunSpecAddressing) -> Discovery:
    """Yield reads, receive their words (None for a failed read), return the first wanted model found."""
    seen: list[str] = []
    for base in addressing.base_addresses:
        marker = yield ReadRequest(HOLDING, base, 2)
        if marker is None or tuple(marker) != SUNS_MARKER:
            seen.append(f"no SunS at {base}")
            continue
        address = base + 2
        models: list[int] = []
        for _ in range(MAX_MODELS):
            if address + 2 > 65536:
                break
            header = yield ReadRequest(HOLDING, address, 2)
            if header is None or len(header) != 2:
                break
            model_id, length = header[0], header[1]
            if model_id == END_MODEL_ID:
                break
            models.append(model_id)
            if model_id in addressing.model_ids:
                expected = addressing.model_lengths.get(model_id)
                if expected is not None and length != expected:
                    raise DiscoveryError(
                        f"SunSpec model {model_id} at {address} declares length {length}, "
                        f"the map expects {expected}"
                    )
                return ModelLocation(model_id, address, length)
            address += 2 + length
        seen.append(f"SunS at {base} with models {models}")
    raise DiscoveryError(f"none of the SunSpec models {list(addressing.model_ids)} found ({'; '.join(seen)})")


def run_discovery(
    addressing: SunSpecAddressing, read: Callable[[ReadRequest], Sequence[int] | None]
) -> ModelLocation:
    """Drive `discover` with a synchronous reader (register images in tests, tools)."""
    walk = discover(addressing)
    try:
        request = next(walk)
        while True:
            request = walk.send(read(request))
    except StopIteration as done:
        location: ModelLocation = done.value
        return location
