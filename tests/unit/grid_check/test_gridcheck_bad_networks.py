"""Bad source networks are refused on the way in, with a message naming the element and the rule.

The rules live in the shared grid model (`services.domain.grid`) and in the
importers; these tests go through the import path a user takes.
"""

from __future__ import annotations

import pytest

from services.domain.grid import ConsistencyError, grid_from_dict
from services.grid_check.domain.importers import NetworkImportError, matpower_to_grid, parse_matpower

HEAD = """function mpc = bad
mpc.baseMVA = 100;
mpc.bus = [
	1	3	0	0	0	0	1	1	0	20	1	1.1	0.9;
	2	1	0	0	0	0	1	1	0	20	1	1.1	0.9;
	3	1	0	0	0	0	1	1	0	20	1	1.1	0.9;
	4	1	0	0	0	0	1	1	0	20	1	1.1	0.9;
];
"""


def import_case(branches: str, head: str = HEAD) -> None:
    text = head + "mpc.branch = [\n" + branches + "];\n"
    grid_from_dict(matpower_to_grid(parse_matpower(text)).grid)


RING = """	1	2	0	0.1	0	10	0	0	0	0	1	-360	360;
	2	3	0	0.1	0	10	0	0	0	0	1	-360	360;
	3	1	0	0.1	0	10	0	0	0	0	1	-360	360;
	3	4	0	0.1	0	10	0	0	0	0	1	-360	360;
"""


def test_a_well_formed_ring_imports() -> None:
    import_case(RING)


def test_an_islanded_node_is_refused_by_name() -> None:
    without_bus_4 = RING.rsplit("\t3\t4", 1)[0]
    with pytest.raises(
        ConsistencyError, match=r"node bus4: is islanded: no path of lines joins it to the slack"
    ):
        import_case(without_bus_4)


def test_a_line_to_an_unknown_node_is_refused_by_name() -> None:
    with pytest.raises(ConsistencyError, match=r"line br4: 'to' names unknown node 'bus9'"):
        import_case(RING.replace("\t3\t4\t0", "\t3\t9\t0"))


def test_a_negative_capacity_is_refused_by_name() -> None:
    with pytest.raises(ConsistencyError, match=r"line br2: capacity_w must not be negative"):
        import_case(RING.replace("\t2\t3\t0\t0.1\t0\t10", "\t2\t3\t0\t0.1\t0\t-10"))


def test_a_missing_reactance_on_a_loop_is_refused_naming_the_loop() -> None:
    with pytest.raises(
        ConsistencyError, match=r"line br2: reactance_pu is missing, but the line lies on a loop"
    ):
        import_case(RING.replace("\t2\t3\t0\t0.1", "\t2\t3\t0\t0"))


def test_a_missing_reactance_off_any_loop_is_fine() -> None:
    import_case(RING.replace("\t3\t4\t0\t0.1", "\t3\t4\t0\t0"))


def test_a_network_without_a_slack_is_refused() -> None:
    with pytest.raises(NetworkImportError, match=r"no slack node"):
        import_case(RING, head=HEAD.replace("\t1\t3\t0", "\t1\t1\t0"))
    with pytest.raises(ConsistencyError, match=r"slack: is missing"):
        grid_from_dict({"interval_minutes": 15, "price_tick_micro_per_kwh": 100, "nodes": [{"id": "a"}]})
