"""The matcher's pure domain: clearing one interval's call auction on a grid, and checking a result.

    from services.matcher.domain import ClearingInput, clear, result_canonical_bytes

    result = clear(ClearingInput.from_orders(orders, grid), grid)
    payload = result_canonical_bytes(result)

Nothing here does I/O or imports a service framework; OR-tools is the solver.
"""

from services.matcher.domain.clearing import clear
from services.matcher.domain.orders import ClearingInput, Order, OrderError, read_orders_csv
from services.matcher.domain.result import (
    ClearingResult,
    result_canonical_bytes,
    result_digest,
    result_to_dict,
    result_to_json,
)
from services.matcher.domain.verify import VerificationError, verify_result

__all__ = [
    "ClearingInput",
    "ClearingResult",
    "Order",
    "OrderError",
    "VerificationError",
    "clear",
    "read_orders_csv",
    "result_canonical_bytes",
    "result_digest",
    "result_to_dict",
    "result_to_json",
    "verify_result",
]
