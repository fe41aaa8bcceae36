"""The service's translations and its authentication rule, without starting anything."""

from __future__ import annotations

import math
import time

import nacl.signing
import pytest

from services.domain.credentials import GRID_CHECK_AUDIENCE, ORDER_BOOK_AUDIENCE, make_token
from services.domain.errors import InvalidArgument, Unauthenticated
from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.gridcheck.v1 import grid_check_pb2 as pb
from services.grid_check.adapters.convert import (
    clearing_from_proto,
    injections_from_proto,
    schedule_check_to_proto,
)
from services.grid_check.adapters.grpc_api import SERVICE_NAME, SET_LIMITS_METHOD, GridCheckAuthenticator
from services.grid_check.domain.checks import check_schedule, recheck_clearing
from services.grid_check.domain.limits import LineLimit
from services.grid_check.domain.network import FlowModel
from services.platform.auth import TokenAuthenticator

OPERATOR = nacl.signing.SigningKey.generate()
PARTICIPANT = nacl.signing.SigningKey.generate()
READ = f"/{SERVICE_NAME}/GetLimits"


def metadata(
    key: nacl.signing.SigningKey, audience: str = GRID_CHECK_AUDIENCE
) -> tuple[tuple[str, str], ...]:
    now_s = int(time.time())
    return (("authorization", f"Bearer {make_token(key, audience, now_s - 5, now_s + 60)}"),)


def authenticator(*, public_reads: bool) -> GridCheckAuthenticator:
    tokens = TokenAuthenticator(GRID_CHECK_AUDIENCE, operator_keys=frozenset({bytes(OPERATOR.verify_key)}))
    return GridCheckAuthenticator(tokens, public_reads=public_reads)


def test_reads_may_be_anonymous_but_setting_limits_always_needs_a_token() -> None:
    auth = authenticator(public_reads=True)
    assert auth.authenticate(READ, ()) is None
    with pytest.raises(Unauthenticated):
        auth.authenticate(SET_LIMITS_METHOD, ())
    with pytest.raises(Unauthenticated):
        authenticator(public_reads=False).authenticate(READ, ())


def test_a_token_that_is_sent_is_verified_even_on_a_read() -> None:
    with pytest.raises(Unauthenticated, match="forged token"):
        authenticator(public_reads=True).authenticate(READ, metadata(PARTICIPANT, ORDER_BOOK_AUDIENCE))


def test_only_a_listed_key_acts_as_operator() -> None:
    auth = authenticator(public_reads=True)
    operator = auth.authenticate(SET_LIMITS_METHOD, metadata(OPERATOR))
    participant = auth.authenticate(SET_LIMITS_METHOD, metadata(PARTICIPANT))
    assert operator is not None and operator.operator
    assert participant is not None and not participant.operator


def test_a_clearing_result_is_rechecked_from_its_trades_with_the_interval_default(
    radial_model: FlowModel,
) -> None:
    result = common_pb2.ClearingResult(
        interval=common_pb2.Interval(start_s=1_800_000_000),
        trades=[
            common_pb2.Trade(seller_node_id="n0", buyer_node_id="n2", energy_wh=5_000),
            common_pb2.Trade(seller_node_id="n3", buyer_node_id="n2", energy_wh=1_000),
        ],
    )
    clearing = clearing_from_proto(result, default_interval_s=900)
    assert clearing.interval_s == 900
    assert clearing.reported_flows_w is None
    limits = {line_id: LineLimit(line_id, rating_w) for line_id, rating_w in radial_model.ratings_w.items()}
    verdict = recheck_clearing(radial_model, limits, clearing)
    # 6,000 Wh into n2 over 900 s are 24,000 W on l2 (rated 20,000 W).
    assert not verdict.ok
    assert [(v.line_id, v.flow_w) for v in verdict.violations] == [("l2", 24_000)]


def test_a_node_named_twice_in_a_schedule_is_refused_with_its_position() -> None:
    with pytest.raises(InvalidArgument) as info:
        injections_from_proto(
            [pb.NodeInjection(node_id="n1", injection_w=5), pb.NodeInjection(node_id="n1", injection_w=-5)]
        )
    assert info.value.field == "injections[1].node_id"


def test_a_flow_on_a_line_limited_to_zero_reports_infinite_loading(radial_model: FlowModel) -> None:
    limits = {line_id: LineLimit(line_id, rating_w) for line_id, rating_w in radial_model.ratings_w.items()}
    limits["l3"] = LineLimit("l3", 0, "maintenance")
    check = schedule_check_to_proto(check_schedule(radial_model, {"n0": 10, "n3": -10}, limits))
    l3 = next(line for line in check.lines if line.line_id == "l3")
    assert math.isinf(l3.loading_pct) and l3.reason == "maintenance"
    assert [(v.line_id, v.kind, v.capacity_w) for v in check.violations] == [("l3", "overload", 0)]
    assert {i.node_id: i.injection_w for i in check.injections} == {"n0": 10, "n1": 0, "n2": 0, "n3": -10}
