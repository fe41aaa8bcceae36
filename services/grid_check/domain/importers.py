"""Importers that turn MATPOWER case files and pandapower JSON networks into the grid YAML form.

Both importers produce the same DC (lossless, linear) view of a network:

- buses become nodes, branches become lines, two-winding transformers become
  lines flagged `transformer: true`;
- a branch's `reactance_pu` is its series reactance in per unit on the
  network's MVA base, multiplied by its off-nominal tap ratio, because the DC
  power flow of MATPOWER and pandapower uses the susceptance `1 / (x * tap)`;
  a branch without reactance (x = 0) gets none, which is fine on a radial
  branch and rejected by the grid's validation on a loop;
- `capacity_w` is the branch's rating: MATPOWER's `rateA` (MVA), pandapower's
  `max_i_ka * df * parallel * sqrt(3) * vn_kv` for lines and
  `sn_mva * df * parallel` for transformers, both scaled by
  `max_loading_percent` where present. MATPOWER's `rateA = 0` and a missing
  pandapower rating mean "unlimited"; they get `unrated_capacity_w`
  (default 9,900 MW, the stand-in pandapower itself uses for unrated branches)
  so that every line has a finite, documented limit;
- the reference bus (MATPOWER bus type 3, pandapower `ext_grid` or a `gen`
  with `slack`) becomes the slack node;
- out-of-service branches and buses are dropped; pandapower buses joined by a
  closed bus-bus switch are fused into one node, as pandapower does;
- phase shifts (MATPOWER `angle`, pandapower `shift_degree` and phase-shifting
  taps) cannot be expressed by PTDFs. Shifts that are consistent around every
  loop (always so on a radial network, and for the usual vector groups) do not
  change any flow and are dropped with a note; any other shift is rejected.

The importers only read: they never need MATPOWER or pandapower installed.
The result still goes through the grid's own validation before use.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# pandapower's rating for branches that have none (e.g. converted from MATPOWER
# with rateA = 0): 9,900 MVA. Using the same figure keeps both importers in step.
DEFAULT_UNRATED_CAPACITY_W = 9_900_000_000
DEFAULT_INTERVAL_MINUTES = 15
DEFAULT_PRICE_TICK_MICRO_PER_KWH = 100
W_PER_MW = 1_000_000
# Phase shifts whose sum around a loop stays below this are taken as zero.
_SHIFT_TOLERANCE_DEG = 1e-6


class NetworkImportError(ValueError):
    """A source network that cannot be turned into a grid; the message names the element and the rule."""


@dataclass(frozen=True, slots=True)
class ImportOptions:
    """Choices the source file does not make."""

    unrated_capacity_w: int = DEFAULT_UNRATED_CAPACITY_W
    interval_minutes: int = DEFAULT_INTERVAL_MINUTES
    price_tick_micro_per_kwh: int = DEFAULT_PRICE_TICK_MICRO_PER_KWH
    # The node to use as slack when the source has none or several.
    slack: str | None = None

    def __post_init__(self) -> None:
        if self.unrated_capacity_w <= 0:
            raise ValueError(f"unrated_capacity_w must be positive, got {self.unrated_capacity_w}")


@dataclass(frozen=True, slots=True)
class ImportedNetwork:
    """A network in the documented grid YAML form, plus how its source maps onto it."""

    grid: dict[str, Any]
    # Source bus label (MATPOWER bus number, pandapower bus index, as text) to node id.
    node_of_bus: dict[str, str]
    # Source branch label ("branch row", "line index", "trafo index") to line id.
    line_of_branch: dict[str, str]
    # What was dropped or assumed, one sentence each.
    notes: tuple[str, ...] = field(default=())


# --------------------------------------------------------------------------------------------
# MATPOWER
# --------------------------------------------------------------------------------------------

# Column positions in MATPOWER's bus and branch matrices (see MATPOWER's caseformat).
_BUS_I, _BUS_TYPE, _BASE_KV = 0, 1, 9
_F_BUS, _T_BUS, _BR_R, _BR_X, _BR_B, _RATE_A = 0, 1, 2, 3, 4, 5
_TAP, _SHIFT, _BR_STATUS = 8, 9, 10
_BUS_TYPE_REF, _BUS_TYPE_ISOLATED = 3, 4


@dataclass(frozen=True, slots=True)
class MatpowerCase:
    """The parts of a MATPOWER case that describe the network."""

    name: str
    base_mva: float
    bus: tuple[tuple[float, ...], ...]
    branch: tuple[tuple[float, ...], ...]
    bus_names: tuple[str, ...] | None = None


_ASSIGN = re.compile(r"mpc\.(\w+)\s*=\s*")
_FUNCTION = re.compile(r"function\s+(?:\w+\s*=\s*)?(\w+)")


def _strip_matlab_comments(text: str) -> str:
    """Remove `%` comments (outside quoted strings) and join `...` continuation lines."""
    out_lines = []
    for line in text.splitlines():
        in_quote = False
        cut = len(line)
        for i, ch in enumerate(line):
            if ch == "'":
                in_quote = not in_quote
            elif ch == "%" and not in_quote:
                cut = i
                break
        code = line[:cut]
        out_lines.append(code)
    joined = "\n".join(out_lines)
    # A continuation `...` joins the next line into the same statement or matrix row.
    return re.sub(r"\.\.\.[^\n]*\n", " ", joined)


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _parse_matrix(body: str, *, field_name: str, first_line: int) -> tuple[tuple[float, ...], ...]:
    rows: list[tuple[float, ...]] = []
    line_no = first_line
    for raw_line in body.split("\n"):
        for raw_row in raw_line.split(";"):
            tokens = [t for t in re.split(r"[\s,]+", raw_row.strip()) if t]
            if not tokens:
                continue
            values = []
            for token in tokens:
                try:
                    values.append(float(token))
                except ValueError:
                    raise NetworkImportError(
                        f"line {line_no}: mpc.{field_name} holds {token!r}, which is not a number"
                    ) from None
            if rows and len(values) != len(rows[0]):
                raise NetworkImportError(
                    f"line {line_no}: mpc.{field_name} row {len(rows) + 1} has {len(values)} columns, "
                    f"the rows before it have {len(rows[0])}"
                )
            rows.append(tuple(values))
        line_no += 1
    return tuple(rows)


def _parse_cell_of_strings(body: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in re.findall(r"'((?:[^']|'')*)'", body))


def parse_matpower(text: str) -> MatpowerCase:
    """Parse a MATPOWER case file (format version 2) written as literal matrices.

    Only plain assignments `mpc.<field> = <value>;` are read. A file that
    computes its data (e.g. converts units after the matrices) is rejected
    naming the line, rather than imported with wrong values.
    """
    code = _strip_matlab_comments(text)
    pos = 0
    name = "case"
    fields: dict[str, Any] = {}
    while True:
        while pos < len(code) and (code[pos].isspace() or code[pos] == ";"):
            pos += 1
        if pos >= len(code):
            break
        function = _FUNCTION.match(code, pos)
        if function is not None:
            name = function.group(1)
            pos = function.end()
            continue
        assign = _ASSIGN.match(code, pos)
        if assign is None:
            statement = code[pos:].split("\n", 1)[0].strip()
            raise NetworkImportError(
                f"line {_line_of(code, pos)}: unsupported statement {statement!r}; only literal "
                "MATPOWER case data (mpc.<field> = value;) can be imported"
            )
        field_name = assign.group(1)
        pos = assign.end()
        opener = code[pos] if pos < len(code) else ""
        if opener in "[{":
            closer = "]" if opener == "[" else "}"
            end = code.find(closer, pos)
            if end < 0:
                raise NetworkImportError(
                    f"line {_line_of(code, pos)}: mpc.{field_name} opens {opener!r} and never closes it"
                )
            body = code[pos + 1 : end]
            if opener == "[":
                fields[field_name] = _parse_matrix(
                    body, field_name=field_name, first_line=_line_of(code, pos)
                )
            else:
                fields[field_name] = _parse_cell_of_strings(body)
            pos = end + 1
        else:
            end_match = re.compile(r"[;\n]").search(code, pos)
            end = end_match.start() if end_match else len(code)
            fields[field_name] = code[pos:end].strip()
            pos = end
    for required in ("baseMVA", "bus", "branch"):
        if required not in fields:
            raise NetworkImportError(f"the case defines no mpc.{required}")
    try:
        base_mva = float(fields["baseMVA"])
    except (TypeError, ValueError):
        raise NetworkImportError(f"mpc.baseMVA is {fields['baseMVA']!r}, not a number") from None
    if not base_mva > 0:
        raise NetworkImportError(f"mpc.baseMVA must be positive, got {base_mva}")
    bus, branch = fields["bus"], fields["branch"]
    if not isinstance(bus, tuple) or not isinstance(branch, tuple):
        raise NetworkImportError("mpc.bus and mpc.branch must be matrices")
    if bus and len(bus[0]) <= _BASE_KV:
        raise NetworkImportError(
            f"mpc.bus has {len(bus[0])} columns; reading it needs at least 10 (bus_i .. baseKV)"
        )
    if branch and len(branch[0]) <= _BR_STATUS:
        raise NetworkImportError(
            f"mpc.branch has {len(branch[0])} columns; MATPOWER branches have at least 11"
        )
    bus_names = fields.get("bus_name")
    return MatpowerCase(
        name=name,
        base_mva=base_mva,
        bus=bus,
        branch=branch,
        bus_names=bus_names if isinstance(bus_names, tuple) and len(bus_names) == len(bus) else None,
    )


def _as_bus_number(value: float, *, where: str) -> int:
    if not math.isfinite(value) or value != int(value) or value <= 0:
        raise NetworkImportError(f"{where}: bus number {value!r} is not a positive integer")
    return int(value)


def _capacity_w_from_mva(rating_mva: float, options: ImportOptions) -> int:
    if math.isnan(rating_mva) or rating_mva == 0 or math.isinf(rating_mva):
        return options.unrated_capacity_w
    # A negative rating is passed through so that the grid's validation rejects it by name.
    return round(rating_mva * W_PER_MW)


def matpower_to_grid(case: MatpowerCase, options: ImportOptions | None = None) -> ImportedNetwork:
    """Map a parsed MATPOWER case onto the grid YAML form (see the module docstring for the rules)."""
    options = options or ImportOptions()
    notes: list[str] = []
    nodes: list[dict[str, Any]] = []
    node_of_bus: dict[str, str] = {}
    isolated: set[int] = set()
    reference: list[str] = []
    for row_no, row in enumerate(case.bus, start=1):
        number = _as_bus_number(row[_BUS_I], where=f"mpc.bus row {row_no}")
        if str(number) in node_of_bus or number in isolated:
            raise NetworkImportError(f"mpc.bus row {row_no}: bus {number} appears twice")
        if int(row[_BUS_TYPE]) == _BUS_TYPE_ISOLATED:
            isolated.add(number)
            continue
        node_id = f"bus{number}"
        node_of_bus[str(number)] = node_id
        node: dict[str, Any] = {"id": node_id}
        if case.bus_names is not None and case.bus_names[row_no - 1]:
            node["name"] = " ".join(case.bus_names[row_no - 1].split())
        if row[_BASE_KV] > 0:
            node["vn_kv"] = row[_BASE_KV]
        nodes.append(node)
        if int(row[_BUS_TYPE]) == _BUS_TYPE_REF:
            reference.append(node_id)
    if isolated:
        notes.append(f"{len(isolated)} isolated bus(es) (type 4) dropped with their branches")
    lines: list[dict[str, Any]] = []
    line_of_branch: dict[str, str] = {}
    shifts: list[_Shift] = []
    out_of_service = 0
    for row_no, row in enumerate(case.branch, start=1):
        where = f"mpc.branch row {row_no}"
        f_bus = _as_bus_number(row[_F_BUS], where=where)
        t_bus = _as_bus_number(row[_T_BUS], where=where)
        if row[_BR_STATUS] == 0:
            out_of_service += 1
            continue
        if f_bus in isolated or t_bus in isolated:
            continue
        line_id = f"br{row_no}"
        tap = row[_TAP] if row[_TAP] != 0 else 1.0
        is_transformer = row[_TAP] != 0 or row[_SHIFT] != 0
        line: dict[str, Any] = {
            "id": line_id,
            "from": node_of_bus.get(str(f_bus), f"bus{f_bus}"),
            "to": node_of_bus.get(str(t_bus), f"bus{t_bus}"),
            "capacity_w": _capacity_w_from_mva(row[_RATE_A], options),
        }
        if row[_BR_X] != 0:
            line["reactance_pu"] = row[_BR_X] * tap
        if is_transformer:
            line["transformer"] = True
        lines.append(line)
        line_of_branch[str(row_no)] = line_id
        if row[_SHIFT] != 0:
            shifts.append(_Shift(line_id, line["from"], line["to"], row[_SHIFT]))
    if out_of_service:
        notes.append(f"{out_of_service} out-of-service branch(es) dropped")
    notes.extend(_check_phase_shifts(lines, shifts))
    slack = _choose_slack(reference, options, rule="a reference bus (MATPOWER bus type 3)")
    return ImportedNetwork(
        grid=_grid_dict(
            nodes=nodes,
            lines=lines,
            slack=slack,
            options=options,
            base_mva=case.base_mva,
            source=f"MATPOWER {case.name}",
        ),
        node_of_bus=node_of_bus,
        line_of_branch=line_of_branch,
        notes=tuple(notes),
    )


def import_matpower(path: str | Path, options: ImportOptions | None = None) -> ImportedNetwork:
    """Read a MATPOWER `.m` case file and map it onto the grid YAML form."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        return matpower_to_grid(parse_matpower(text), options)
    except NetworkImportError as exc:
        raise NetworkImportError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------------------------
# pandapower (JSON export)
# --------------------------------------------------------------------------------------------

# Element tables with branches or buses this DC model does not represent; importing
# a network that uses them in service would silently change its flows.
_UNSUPPORTED_TABLES = (
    "trafo3w",
    "impedance",
    "dcline",
    "tcsc",
    "xward",
    "line_dc",
    "vsc",
    "ssc",
    "bus_dc",
)


@dataclass(frozen=True, slots=True)
class Table:
    """One pandapower element table: rows as dicts keyed by column, with the pandas index."""

    name: str
    rows: tuple[tuple[int, dict[str, Any]], ...]

    def __len__(self) -> int:
        return len(self.rows)

    def in_service(self) -> list[tuple[int, dict[str, Any]]]:
        return [(i, r) for i, r in self.rows if _truthy(r.get("in_service", True))]


def _truthy(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return bool(value)


def _number(value: Any) -> float:
    """A pandapower cell as a float: null and missing become NaN."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


def _finite(value: Any) -> bool:
    return math.isfinite(_number(value))


def _decode_table(name: str, obj: Any) -> Table:
    if isinstance(obj, dict) and obj.get("_class") == "DataFrame":
        orient = obj.get("orient", "split")
        if orient != "split":
            raise NetworkImportError(f"table {name}: DataFrame orientation {orient!r} is not supported")
        payload = obj.get("_object")
        frame = json.loads(payload) if isinstance(payload, str) else payload
        if not isinstance(frame, dict):
            raise NetworkImportError(f"table {name}: DataFrame payload is not an object")
        columns = list(frame.get("columns", []))
        index = list(frame.get("index", []))
        data = list(frame.get("data", []))
        if len(index) != len(data):
            raise NetworkImportError(f"table {name}: {len(index)} index entries but {len(data)} rows")
        rows = []
        for idx, values in zip(index, data, strict=True):
            if not isinstance(idx, int):
                raise NetworkImportError(f"table {name}: index {idx!r} is not an integer")
            rows.append((idx, dict(zip(columns, values, strict=True))))
        return Table(name, tuple(rows))
    raise NetworkImportError(f"table {name}: expected a pandas DataFrame, got {type(obj).__name__}")


def parse_pandapower_json(text: str) -> dict[str, Any]:
    """The element tables and scalars of a pandapower JSON export (`pandapower.to_json`)."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NetworkImportError(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise NetworkImportError("not a pandapower network: the document is not a JSON object")
    net = document.get("_object", document) if document.get("_class") == "pandapowerNet" else document
    if isinstance(net, str):
        net = json.loads(net)
    if not isinstance(net, dict) or "bus" not in net:
        raise NetworkImportError("not a pandapower network: no `bus` table")
    parsed: dict[str, Any] = {}
    for key, value in net.items():
        if isinstance(value, dict) and value.get("_class") == "DataFrame":
            parsed[key] = _decode_table(key, value)
        elif isinstance(value, (int, float, str)) or value is None:
            parsed[key] = value
    return parsed


class _UnionFind:
    def __init__(self, items: Iterable[int]) -> None:
        self.parent = {i: i for i in items}

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int, *, prefer: set[int]) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        # The slack bus, then the lower index, names the fused node.
        if (rb in prefer and ra not in prefer) or (rb < ra and (rb in prefer) == (ra in prefer)):
            ra, rb = rb, ra
        self.parent[rb] = ra


def _table(net: Mapping[str, Any], name: str) -> Table:
    value = net.get(name)
    return value if isinstance(value, Table) else Table(name, ())


def pandapower_to_grid(
    net: Mapping[str, Any], options: ImportOptions | None = None, *, source_name: str = ""
) -> ImportedNetwork:
    """Map parsed pandapower tables onto the grid YAML form (see the module docstring for the rules)."""
    options = options or ImportOptions()
    notes: list[str] = []
    for name in _UNSUPPORTED_TABLES:
        active = _table(net, name).in_service()
        if active:
            raise NetworkImportError(
                f"{name} {active[0][0]}: the importer does not model `{name}` elements "
                f"({len(active)} in service); convert or remove them first"
            )
    sn_mva = _number(net.get("sn_mva", 1.0))
    if not sn_mva > 0:
        raise NetworkImportError(f"sn_mva must be positive, got {net.get('sn_mva')!r}")

    buses = _table(net, "bus")
    vn_kv: dict[int, float] = {}
    names: dict[int, str] = {}
    dropped_buses = 0
    for index, row in buses.rows:
        if not _truthy(row.get("in_service", True)):
            dropped_buses += 1
            continue
        voltage = _number(row.get("vn_kv"))
        if not voltage > 0:
            raise NetworkImportError(f"bus {index}: vn_kv must be positive, got {row.get('vn_kv')!r}")
        vn_kv[index] = voltage
        if row.get("name") not in (None, ""):
            names[index] = str(row["name"])
    if dropped_buses:
        notes.append(f"{dropped_buses} out-of-service bus(es) dropped with their elements")

    slack_buses: set[int] = set()
    for _index, row in _table(net, "ext_grid").in_service():
        slack_buses.add(int(_number(row.get("bus"))))
    for _index, row in _table(net, "gen").in_service():
        if _truthy(row.get("slack", False)):
            slack_buses.add(int(_number(row.get("bus"))))
    slack_buses &= set(vn_kv)

    # Fuse buses joined by closed bus-bus switches; open line/trafo switches take their element out.
    fused = _UnionFind(vn_kv)
    open_elements: set[tuple[str, int]] = set()
    for index, row in _table(net, "switch").rows:
        closed = _truthy(row.get("closed", True))
        kind = row.get("et")
        bus = int(_number(row.get("bus")))
        element = int(_number(row.get("element")))
        if kind == "b":
            if not closed or bus not in vn_kv or element not in vn_kv:
                continue
            if _finite(row.get("z_ohm")) and _number(row.get("z_ohm")) > 0:
                raise NetworkImportError(
                    f"switch {index}: a closed bus-bus switch with z_ohm > 0 is an impedance branch, "
                    "which the importer does not model"
                )
            fused.union(bus, element, prefer=slack_buses)
        elif kind in ("l", "t") and not closed:
            open_elements.add(("line" if kind == "l" else "trafo", element))
        elif kind == "t3" and not closed:
            open_elements.add(("trafo3w", element))

    node_of_bus: dict[str, str] = {}
    nodes: list[dict[str, Any]] = []
    for index in sorted(vn_kv):
        root = fused.find(index)
        node_of_bus[str(index)] = f"bus{root}"
        if root == index:
            node: dict[str, Any] = {"id": f"bus{index}", "vn_kv": vn_kv[index]}
            if index in names:
                node["name"] = names[index]
            nodes.append(node)
    fused_count = len(vn_kv) - len(nodes)
    if fused_count:
        notes.append(f"{fused_count} bus(es) fused into a neighbour through closed bus-bus switches")

    lines: list[dict[str, Any]] = []
    line_of_branch: dict[str, str] = {}
    shifts: list[_Shift] = []
    skipped = 0

    all_buses = {index for index, _ in buses.rows}

    def node_for(bus_value: Any, *, where: str, role: str) -> str | None:
        bus = _number(bus_value)
        if not math.isfinite(bus):
            raise NetworkImportError(f"{where}: {role} is missing")
        bus_index = int(bus)
        if bus_index in vn_kv:
            return node_of_bus[str(bus_index)]
        if bus_index in all_buses:
            return None  # an out-of-service bus: the element goes with it
        # Unknown buses are passed through so that the grid's validation names them.
        return f"bus{bus_index}"

    for index, row in _table(net, "line").rows:
        where = f"line {index}"
        if not _truthy(row.get("in_service", True)) or ("line", index) in open_elements:
            skipped += 1
            continue
        from_node = node_for(row.get("from_bus"), where=where, role="from_bus")
        to_node = node_for(row.get("to_bus"), where=where, role="to_bus")
        if from_node is None or to_node is None:
            skipped += 1
            continue
        if from_node == to_node:
            notes.append(f"line {index} joins two fused buses and is dropped")
            continue
        parallel = _number(row.get("parallel", 1))
        parallel = parallel if parallel > 0 else 1.0
        base_kv = vn_kv.get(int(_number(row.get("from_bus"))), math.nan)
        base_ohm = base_kv**2 / sn_mva
        x_ohm = _number(row.get("x_ohm_per_km")) * _number(row.get("length_km")) / parallel
        line: dict[str, Any] = {
            "id": f"line{index}",
            "from": from_node,
            "to": to_node,
            "capacity_w": _line_capacity_w(row, base_kv, parallel, options),
        }
        if math.isnan(x_ohm):
            raise NetworkImportError(f"{where}: x_ohm_per_km or length_km is missing")
        if x_ohm != 0:
            line["reactance_pu"] = x_ohm / base_ohm
        if row.get("name") not in (None, ""):
            line["name"] = str(row["name"])
        lines.append(line)
        line_of_branch[f"line {index}"] = line["id"]

    for index, row in _table(net, "trafo").rows:
        where = f"trafo {index}"
        if not _truthy(row.get("in_service", True)) or ("trafo", index) in open_elements:
            skipped += 1
            continue
        hv_node = node_for(row.get("hv_bus"), where=where, role="hv_bus")
        lv_node = node_for(row.get("lv_bus"), where=where, role="lv_bus")
        if hv_node is None or lv_node is None:
            skipped += 1
            continue
        hv_kv = vn_kv.get(int(_number(row.get("hv_bus"))), math.nan)
        lv_kv = vn_kv.get(int(_number(row.get("lv_bus"))), math.nan)
        x_pu, ratio, shift_deg = _trafo_dc_parameters(
            row, hv_kv=hv_kv, lv_kv=lv_kv, sn_mva=sn_mva, where=where
        )
        if hv_node == lv_node:
            notes.append(f"trafo {index} joins two fused buses and is dropped")
            continue
        line = {
            "id": f"trafo{index}",
            "from": hv_node,
            "to": lv_node,
            "capacity_w": _trafo_capacity_w(row, options),
            "transformer": True,
        }
        if x_pu != 0:
            line["reactance_pu"] = x_pu * ratio
        if row.get("name") not in (None, ""):
            line["name"] = str(row["name"])
        lines.append(line)
        line_of_branch[f"trafo {index}"] = line["id"]
        if shift_deg != 0:
            shifts.append(_Shift(line["id"], hv_node, lv_node, shift_deg))
    if skipped:
        notes.append(f"{skipped} out-of-service or switched-off branch(es) dropped")
    notes.extend(_check_phase_shifts(lines, shifts))
    slack_nodes = sorted({node_of_bus[str(b)] for b in slack_buses})
    slack = _choose_slack(slack_nodes, options, rule="an in-service ext_grid (or a gen with slack=True)")
    net_name = net.get("name") or source_name
    return ImportedNetwork(
        grid=_grid_dict(
            nodes=nodes,
            lines=lines,
            slack=slack,
            options=options,
            base_mva=sn_mva,
            source=f"pandapower {net_name}"
            if isinstance(net_name, str) and net_name
            else "pandapower network",
        ),
        node_of_bus=node_of_bus,
        line_of_branch=line_of_branch,
        notes=tuple(notes),
    )


def _line_capacity_w(row: Mapping[str, Any], base_kv: float, parallel: float, options: ImportOptions) -> int:
    max_i_ka = _number(row.get("max_i_ka"))
    if not math.isfinite(max_i_ka) or max_i_ka == 0:
        return options.unrated_capacity_w
    derating = _number(row.get("df", 1.0))
    derating = derating if math.isfinite(derating) else 1.0
    rating_mva = max_i_ka * derating * parallel * math.sqrt(3) * base_kv
    loading = _number(row.get("max_loading_percent"))
    if math.isfinite(loading):
        rating_mva *= loading / 100
    return _capacity_w_from_mva(rating_mva, options)


def _trafo_capacity_w(row: Mapping[str, Any], options: ImportOptions) -> int:
    sn = _number(row.get("sn_mva"))
    if not math.isfinite(sn) or sn == 0:
        return options.unrated_capacity_w
    derating = _number(row.get("df", 1.0))
    parallel = _number(row.get("parallel", 1))
    rating_mva = sn * (derating if math.isfinite(derating) else 1.0) * (parallel if parallel > 0 else 1.0)
    loading = _number(row.get("max_loading_percent"))
    if math.isfinite(loading):
        rating_mva *= loading / 100
    return _capacity_w_from_mva(rating_mva, options)


def _trafo_dc_parameters(
    row: Mapping[str, Any], *, hv_kv: float, lv_kv: float, sn_mva: float, where: str
) -> tuple[float, float, float]:
    """Series reactance (pu on the system base), off-nominal ratio and phase shift of a two-winding transformer.

    Follows pandapower's branch model: taps change the rated voltage of their
    side; the short-circuit impedance `vk_percent` is referred to the low-voltage
    side; the ratio is the rated ratio over the buses' nominal ratio.
    """
    vn_hv = _number(row.get("vn_hv_kv"))
    vn_lv = _number(row.get("vn_lv_kv"))
    sn_trafo = _number(row.get("sn_mva"))
    vk = _number(row.get("vk_percent"))
    vkr = _number(row.get("vkr_percent"))
    for label, value in (("vn_hv_kv", vn_hv), ("vn_lv_kv", vn_lv), ("sn_mva", sn_trafo)):
        if not value > 0:
            raise NetworkImportError(f"{where}: {label} must be positive, got {value!r}")
    if not math.isfinite(vk):
        raise NetworkImportError(f"{where}: vk_percent is missing")
    vkr = vkr if math.isfinite(vkr) else 0.0
    shift = _number(row.get("shift_degree"))
    shift = shift if math.isfinite(shift) else 0.0
    if _truthy(row.get("tap_dependency_table", False)):
        raise NetworkImportError(
            f"{where}: tabular tap characteristics (tap_dependency_table) are not supported"
        )
    for suffix in ("", "2"):
        if f"tap{suffix}_pos" not in row:
            continue
        tap_pos = _number(row.get(f"tap{suffix}_pos"))
        tap_neutral = _number(row.get(f"tap{suffix}_neutral"))
        side = row.get(f"tap{suffix}_side")
        if not math.isfinite(tap_pos) or side not in ("hv", "lv"):
            continue
        tap_diff = tap_pos - (tap_neutral if math.isfinite(tap_neutral) else 0.0)
        step_percent = _number(row.get(f"tap{suffix}_step_percent"))
        step_degree = _number(row.get(f"tap{suffix}_step_degree"))
        step_percent = step_percent if math.isfinite(step_percent) else 0.0
        step_degree = step_degree if math.isfinite(step_degree) else 0.0
        if f"tap{suffix}_changer_type" in row:
            changer = row.get(f"tap{suffix}_changer_type")
            ideal = changer == "Ideal"
            if changer == "Tabular":
                raise NetworkImportError(f"{where}: tabular tap changers are not supported")
            if changer not in ("Ratio", "Symmetrical", "Ideal"):
                continue
        else:
            ideal = _truthy(row.get(f"tap{suffix}_phase_shifter", False))
        direction = 1.0 if side == "hv" else -1.0
        if ideal:
            if step_degree != 0:
                shift += direction * tap_diff * step_degree
            else:
                shift += direction * 2 * math.degrees(math.asin(tap_diff * step_percent / 100 / 2))
            continue
        du_frac = step_percent * tap_diff / 100
        angle = math.radians(step_degree)
        real = 1 + du_frac * math.cos(angle)
        imag = du_frac * math.sin(angle)
        if side == "hv":
            vn_hv *= math.hypot(real, imag)
        else:
            vn_lv *= math.hypot(real, imag)
        shift += math.degrees(math.atan(direction * imag / real))
    parallel = _number(row.get("parallel", 1))
    parallel = parallel if parallel > 0 else 1.0
    # Short-circuit impedance on the system base, referred to the low-voltage bus.
    lv_referral = (vn_lv / lv_kv) ** 2 * sn_mva
    z_pu = vk / 100 / sn_trafo * lv_referral
    r_pu = vkr / 100 / sn_trafo * lv_referral
    if abs(r_pu) > abs(z_pu):
        raise NetworkImportError(f"{where}: vkr_percent {vkr} exceeds vk_percent {vk}")
    series = complex(r_pu, math.copysign(math.sqrt(z_pu**2 - r_pu**2), z_pu)) / parallel
    magnetising = _trafo_magnetising_pu(
        row, lv_kv=lv_kv, vn_lv_tapped=vn_lv, sn_mva=sn_mva, parallel=parallel
    )
    if magnetising != 0:
        # pandapower's default T model: the magnetising branch sits between the two
        # leakage halves; its pi equivalent has a slightly different series element.
        r_hv = _number(row.get("leakage_resistance_ratio_hv", 0.5))
        x_hv = _number(row.get("leakage_reactance_ratio_hv", 0.5))
        r_hv = r_hv if math.isfinite(r_hv) else 0.5
        x_hv = x_hv if math.isfinite(x_hv) else 0.5
        z_a = complex(series.real * r_hv, series.imag * x_hv)
        z_b = complex(series.real * (1 - r_hv), series.imag * (1 - x_hv))
        z_c = 1 / magnetising
        series = (z_a * z_b + z_a * z_c + z_b * z_c) / z_c
    ratio = (vn_hv / vn_lv) / (hv_kv / lv_kv)
    return series.imag, ratio, shift


def _trafo_magnetising_pu(
    row: Mapping[str, Any], *, lv_kv: float, vn_lv_tapped: float, sn_mva: float, parallel: float
) -> complex:
    """The magnetising admittance `g + jb` in per unit, as pandapower derives it from pfe_kw and i0_percent."""
    pfe_mw = _number(row.get("pfe_kw")) / 1000
    i0 = _number(row.get("i0_percent"))
    pfe_mw = pfe_mw if math.isfinite(pfe_mw) else 0.0
    i0 = i0 if math.isfinite(i0) else 0.0
    if pfe_mw == 0 and i0 == 0:
        return 0j
    vn_lv_rated = _number(row.get("vn_lv_kv"))
    ym_mva = i0 / 100 * _number(row.get("sn_mva"))
    b_mva = -math.sqrt(max(ym_mva**2 - pfe_mw**2, 0.0))
    scale = (lv_kv**2 / sn_mva) * parallel / vn_lv_rated**2 / (vn_lv_tapped / vn_lv_rated) ** 2
    return complex(pfe_mw * scale, b_mva * scale)


def import_pandapower(path: str | Path, options: ImportOptions | None = None) -> ImportedNetwork:
    """Read a pandapower JSON export and map it onto the grid YAML form."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return pandapower_to_grid(parse_pandapower_json(text), options, source_name=Path(path).name)
    except NetworkImportError as exc:
        raise NetworkImportError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Shared steps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Shift:
    line_id: str
    from_node: str
    to_node: str
    degrees: float


def _check_phase_shifts(lines: Sequence[Mapping[str, Any]], shifts: Sequence[_Shift]) -> list[str]:
    """Reject phase shifts that drive a circulating flow; report the harmless ones.

    A branch flow is `b * (theta_from - theta_to - shift)`. If bus offsets
    `phi` exist with `shift = phi_from - phi_to` on every branch, substituting
    `theta' = theta - phi` removes every shift and leaves the flows unchanged.
    Such offsets exist exactly when the shifts add up to zero around every loop.
    """
    if not shifts:
        return []
    shift_of = {s.line_id: s.degrees for s in shifts}
    adjacency: dict[str, list[tuple[str, str, float]]] = {}
    for line in lines:
        degrees = shift_of.get(str(line["id"]), 0.0)
        a, b = str(line["from"]), str(line["to"])
        adjacency.setdefault(a, []).append((b, str(line["id"]), degrees))
        adjacency.setdefault(b, []).append((a, str(line["id"]), -degrees))
    offset: dict[str, float] = {}
    for start in sorted(adjacency):
        if start in offset:
            continue
        offset[start] = 0.0
        stack = [start]
        while stack:
            node = stack.pop()
            for other, line_id, degrees in adjacency[node]:
                expected = offset[node] - degrees
                if other not in offset:
                    offset[other] = expected
                    stack.append(other)
                elif abs(offset[other] - expected) > _SHIFT_TOLERANCE_DEG:
                    raise NetworkImportError(
                        f"{line_id}: phase shifts add up to {offset[other] - expected:+.6g} degrees "
                        "around a loop through this branch; a PTDF model cannot represent the "
                        "circulating flow they drive"
                    )
    return [
        f"{len(shifts)} phase shift(s) dropped: they cancel around every loop, so no flow changes "
        "(bus voltage angles are offset instead)"
    ]


def _choose_slack(candidates: Sequence[str], options: ImportOptions, *, rule: str) -> str:
    if options.slack is not None:
        return options.slack
    if not candidates:
        raise NetworkImportError(f"no slack node: the network has no {rule}; choose one with --slack")
    if len(candidates) > 1:
        raise NetworkImportError(
            f"{len(candidates)} slack candidates ({', '.join(candidates)}): the grid has exactly one "
            "slack node; choose one with --slack"
        )
    return candidates[0]


def _grid_dict(
    *,
    nodes: list[dict[str, Any]],
    lines: list[dict[str, Any]],
    slack: str,
    options: ImportOptions,
    base_mva: float,
    source: str,
) -> dict[str, Any]:
    return {
        "interval_minutes": options.interval_minutes,
        "price_tick_micro_per_kwh": options.price_tick_micro_per_kwh,
        "slack": slack,
        "base_mva": base_mva,
        "source": source,
        "nodes": nodes,
        "lines": lines,
    }
