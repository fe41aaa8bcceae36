"""A small array interface to OR-tools' LP solvers: numpy arrays in, numpy arrays out.

OR-tools' Python model builders create one Python object per variable or
term, which costs seconds at the sizes the matcher solves. This module writes
the `MPModelRequest` protobuf wire format straight from numpy arrays, hands it
to OR-tools' C++ solver wrapper in one call, and reads the packed solution
arrays of the `MPSolutionResponse` straight back into numpy, so nothing is
done per variable in Python. Only the handful of wire-format fields used here
are written and read (field numbers from ortools/linear_solver/linear_solver.proto).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# MPModelRequest.SolverType
GLOP: Final = 2
# MPSolverResponseStatus
OPTIMAL: Final = 0
INFEASIBLE: Final = 2
UNBOUNDED: Final = 3

# GLOP's default primal simplex is very slow on auction LPs (many bounded
# columns, few rows); the dual simplex without presolve solves them quickly.
DUAL_SIMPLEX_PARAMETERS: Final = "use_dual_simplex:true use_preprocessing:false"

_VARIABLE_RECORD = np.dtype(
    [
        ("tag", "u1"),
        ("length", "u1"),
        ("lower_tag", "u1"),
        ("lower", "<f8"),
        ("upper_tag", "u1"),
        ("upper", "<f8"),
        ("objective_tag", "u1"),
        ("objective", "<f8"),
    ]
)
assert _VARIABLE_RECORD.itemsize == 29


class SolverError(RuntimeError):
    """The solver did not return an optimal solution (which a well-formed clearing LP always has)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the LP solver ended with status {status} instead of OPTIMAL")
        self.status = status


@dataclass(frozen=True, slots=True)
class LinearProgram:
    """max or min c.x subject to row_lower <= A x <= row_upper and lower <= x <= upper; A in CSR form."""

    lower: FloatArray
    upper: FloatArray
    objective: FloatArray
    row_start: IntArray  # CSR offsets, length rows + 1
    column: IntArray
    coefficient: FloatArray
    row_lower: FloatArray
    row_upper: FloatArray
    maximize: bool = True


@dataclass(frozen=True, slots=True)
class LpSolution:
    """Primal values, row duals and reduced costs as OR-tools reports them (`objective - A^T duals`)."""

    status: int
    objective_value: float
    values: FloatArray
    duals: FloatArray
    reduced_costs: FloatArray


def solve(program: LinearProgram, *, parameters: str = DUAL_SIMPLEX_PARAMETERS) -> LpSolution:
    """Solve with GLOP; raise `SolverError` unless the status is OPTIMAL."""
    from ortools.linear_solver.python import model_builder_helper as mbh

    request = encode_request(program, parameters=parameters)
    # The binding takes the serialized request as bytes (its stub says str).
    response = mbh.ModelSolverHelper("glop").solve_serialized_request(request)  # type: ignore[arg-type]
    solution = decode_response(response, len(program.lower), len(program.row_lower))
    if solution.status != OPTIMAL:
        raise SolverError(solution.status)
    return solution


def encode_request(program: LinearProgram, *, parameters: str) -> bytes:
    model = _encode_model(program)
    parts = [_key(1, 2), _varint(len(model)), model, _key(2, 0), _varint(GLOP)]
    text = parameters.encode()
    parts += [_key(5, 2), _varint(len(text)), text]
    return b"".join(parts)


def _encode_model(program: LinearProgram) -> bytes:
    count = len(program.lower)
    records = np.empty(count, dtype=_VARIABLE_RECORD)
    records["tag"] = 0x1A  # field 3 (variable), length-delimited
    records["length"] = 27
    records["lower_tag"] = 0x09  # field 1, 64-bit
    records["lower"] = program.lower
    records["upper_tag"] = 0x11  # field 2, 64-bit
    records["upper"] = program.upper
    records["objective_tag"] = 0x19  # field 3, 64-bit
    records["objective"] = program.objective
    parts = [_key(1, 0), b"\x01" if program.maximize else b"\x00", records.tobytes()]
    # All rows' packed indices and coefficients are encoded at once; each row
    # then only slices its bytes out.
    starts = program.row_start.tolist()
    index_bytes, index_offsets = _packed_varints(program.column)
    coefficient_bytes = np.ascontiguousarray(program.coefficient, dtype="<f8").tobytes()
    bounds = np.empty((len(program.row_lower), 2), dtype="<f8")
    bounds[:, 0] = program.row_lower
    bounds[:, 1] = program.row_upper
    bound_bytes = bounds.tobytes()
    index_key, coefficient_key, lower_key, upper_key, row_key = (
        _key(6, 2),
        _key(7, 2),
        _key(2, 1),
        _key(3, 1),
        _key(4, 2),
    )
    for row in range(len(program.row_lower)):
        begin, end = starts[row], starts[row + 1]
        indices = index_bytes[index_offsets[begin] : index_offsets[end]]
        coefficients = coefficient_bytes[8 * begin : 8 * end]
        body = b"".join(
            (
                index_key,
                _varint(len(indices)),
                indices,
                coefficient_key,
                _varint(len(coefficients)),
                coefficients,
                lower_key,
                bound_bytes[16 * row : 16 * row + 8],
                upper_key,
                bound_bytes[16 * row + 8 : 16 * row + 16],
            )
        )
        parts += [row_key, _varint(len(body)), body]
    return b"".join(parts)


def decode_response(data: bytes, variable_count: int, row_count: int) -> LpSolution:
    status = -1
    objective_value = float("nan")
    arrays: dict[int, FloatArray] = {}
    position = 0
    size = len(data)
    while position < size:
        key, position = _read_varint(data, position)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _read_varint(data, position)
            if field == 1:
                status = value
        elif wire == 1:
            if field == 2:
                objective_value = float(np.frombuffer(data, dtype="<f8", count=1, offset=position)[0])
            position += 8
        elif wire == 2:
            length, position = _read_varint(data, position)
            if field in (3, 4, 6):
                arrays[field] = np.frombuffer(data, dtype="<f8", count=length // 8, offset=position).astype(
                    np.float64
                )
            position += length
        elif wire == 5:
            position += 4
        else:  # pragma: no cover - groups are not used by this message
            raise ValueError(f"unexpected wire type {wire} in the solver's response")
    empty = np.zeros(0, dtype=np.float64)
    values = arrays.get(3, empty)
    duals = arrays.get(4, empty)
    reduced = arrays.get(6, empty)
    if status == OPTIMAL and (len(values) != variable_count or len(duals) != row_count):
        raise ValueError("the solver's response does not match the model's size")
    return LpSolution(status, objective_value, values, duals, reduced)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _varint(value: int) -> bytes:
    if value < _SMALL_VARINTS:
        return _VARINT_TABLE[value]
    return _encode_varint(value)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_SMALL_VARINTS = 1 << 14
_VARINT_TABLE = [_encode_varint(value) for value in range(_SMALL_VARINTS)]


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def _packed_varints(values: npt.ArrayLike) -> tuple[bytes, list[int]]:
    """Little-endian base-128 varints of non-negative integers below 2**35, vectorised.

    Returns the bytes and, for each value i, where its varint starts (with the total length last).
    """
    numbers = np.asarray(values, dtype=np.int64)
    if numbers.size == 0:
        return b"", [0]
    widths = 1 + (numbers >= 1 << 7) + (numbers >= 1 << 14) + (numbers >= 1 << 21) + (numbers >= 1 << 28)
    ends = np.cumsum(widths)
    starts = ends - widths
    out = np.zeros(int(ends[-1]), dtype=np.uint8)
    for k in range(5):
        has = widths > k
        if not has.any():
            break
        byte = (numbers[has] >> (7 * k)) & 0x7F
        more = widths[has] > k + 1
        out[starts[has] + k] = (byte | (more.astype(np.int64) << 7)).astype(np.uint8)
    return out.tobytes(), [*starts.tolist(), int(ends[-1])]
