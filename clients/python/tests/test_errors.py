"""How an error answer of the gateway becomes an exception (no gateway)."""

from portcullis_client import ApprovalPending, Denied
from portcullis_client._errors import from_body


def test_approval_required_takes_the_elevation_id_field():
    e = from_body(
        403,
        {"error": "approval_required", "detail": "approval required", "elevation_id": "elv_1"},
    )
    assert isinstance(e, ApprovalPending)
    assert e.elevation_id == "elv_1"


def test_an_older_gateway_names_the_elevation_in_the_detail_only():
    e = from_body(
        403,
        {"error": "approval_required", "detail": "x; held as elevation request elv_2"},
    )
    assert isinstance(e, ApprovalPending)
    assert e.elevation_id == "elv_2"


def test_a_non_string_elevation_id_is_ignored():
    e = from_body(403, {"error": "approval_required", "detail": "", "elevation_id": 7})
    assert isinstance(e, ApprovalPending)
    assert e.elevation_id is None


def test_other_denials_carry_no_elevation():
    e = from_body(403, {"error": "policy_forbid", "detail": "no", "elevation_id": "elv_3"})
    assert isinstance(e, Denied) and not isinstance(e, ApprovalPending)

