"""The phases of a CA rotation (central.meshes), exhaustively: every step from every
state, and the switch decision over every combination of dataplane and clock."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import msgspec
import pytest

from meshagent.central.meshes import (
    MeshSpec,
    RotationConflict,
    decode_spec,
    encode_spec,
    finish_rotation,
    mesh_ca,
    new_mesh,
    rotation_phase,
    rotation_view,
    signing_fingerprint,
    signing_pair,
    start_rotation,
    switch_decision,
    switch_signer,
    waiting_for_bundle,
    with_bundle_revision,
)
from meshagent.central.store import DataplaneRecord, MeshRecord
from meshagent.pki.rotation import ca_fingerprint
from meshagent.pki.secrets import key_from_file_bytes, new_key_file_bytes

SEAL = key_from_file_bytes(new_key_file_bytes())
STARTED = 1000.0
TIMEOUT = 600.0
REVISION = 7

_BASE = new_mesh("shop", mtls="strict", ca="builtin", seal_key=SEAL, now=1.0)
_DISTRIBUTING = start_rotation(_BASE, ca="builtin", seal_key=SEAL, now=STARTED)
OLD = ca_fingerprint(decode_spec(_BASE).ca_cert)
NEW = ca_fingerprint(decode_spec(_DISTRIBUTING).ca_cert)


def _legacy() -> MeshRecord:
    """A rotation stored before phases existed: its spec has none of their fields."""
    spec = msgspec.json.decode(_DISTRIBUTING.spec)
    for key in ("rotation_phase", "bundle_revision", "switched_at"):
        del spec[key]
    return msgspec.structs.replace(_DISTRIBUTING, spec=msgspec.json.encode(spec))


STATES: dict[str, Callable[[], MeshRecord]] = {
    "idle": lambda: _BASE,
    "distributing, not recorded": lambda: _DISTRIBUTING,
    "distributing": lambda: _recorded(),
    "renewing": lambda: switch_signer(_recorded(), now=STARTED + 5),
    "legacy rotation": _legacy,
}


def _recorded() -> MeshRecord:
    record = with_bundle_revision(_DISTRIBUTING, REVISION)
    assert record is not None
    return record


def dp(name: str, *, online: bool = True, applied: int = 0, issuers: tuple[str, ...] = ()) -> (
    DataplaneRecord
):
    return DataplaneRecord(
        mesh="shop", name=name, node=name, address="10.0.0.1", spec=b"{}",
        applied_version=applied, last_seen=100.0 if online else 0.0, cert_issuers=issuers,
    )


def online(record: DataplaneRecord) -> bool:
    return record.last_seen > 50


# ---------------------------------------------------------------------------- every state


# state: (phase, signing CA, bundle revision)
EXPECTED_STATE = {
    "idle": (None, OLD, 0),
    "distributing, not recorded": ("distributing", OLD, 0),
    "distributing": ("distributing", OLD, REVISION),
    "renewing": ("renewing", NEW, REVISION),
    "legacy rotation": ("renewing", NEW, 0),
}


@pytest.mark.parametrize("state", STATES)
def test_each_state_names_its_phase_and_signer(state: str) -> None:
    record = STATES[state]()
    spec = decode_spec(record)
    phase, signer, revision = EXPECTED_STATE[state]
    assert rotation_phase(spec) == phase
    assert signing_fingerprint(spec) == signer
    assert ca_fingerprint(signing_pair(record, SEAL).cert_pem) == signer
    assert spec.bundle_revision == revision
    view = rotation_view(record, [dp("a")], is_online=online)
    assert view["phase"] == phase and view["signing_ca_fingerprint"] == signer
    assert view["bundle_revision"] == (revision if phase == "distributing" else None)
    if phase is None:
        assert signing_pair(record, SEAL) == mesh_ca(record, SEAL)


# ---------------------------------------------------------------------------- every step


def _start(record: MeshRecord) -> MeshRecord:
    return start_rotation(record, ca="builtin", seal_key=SEAL, now=STARTED + 10)


def _record(record: MeshRecord) -> MeshRecord | None:
    return with_bundle_revision(record, REVISION + 3)


def _switch(record: MeshRecord) -> MeshRecord:
    return switch_signer(record, now=STARTED + 20)


def _finish(record: MeshRecord) -> MeshRecord:
    return finish_rotation(record, [dp("a", issuers=(NEW,))], is_online=online)


def _force(record: MeshRecord) -> MeshRecord:
    return finish_rotation(record, [dp("a", issuers=(OLD,))], is_online=online, force=True)


STEPS: dict[str, Callable[[MeshRecord], MeshRecord | None]] = {
    "start": _start,
    "record revision": _record,
    "switch": _switch,
    "finish": _finish,
    "finish --force": _force,
}

# (state, step) -> the state after it, "unchanged" (None: nothing to record), or the
# message of the RotationConflict it raises.
TRANSITIONS: dict[tuple[str, str], str] = {
    ("idle", "start"): "distributing, not recorded",
    ("idle", "record revision"): "unchanged",
    ("idle", "switch"): "no new CA is being distributed",
    ("idle", "finish"): "no CA rotation in progress",
    ("idle", "finish --force"): "no CA rotation in progress",
    ("distributing, not recorded", "start"): "already in progress",
    ("distributing, not recorded", "record revision"): "distributing",
    ("distributing, not recorded", "switch"): "renewing",
    ("distributing, not recorded", "finish"): "still being distributed",
    ("distributing, not recorded", "finish --force"): "still being distributed",
    ("distributing", "start"): "already in progress",
    ("distributing", "record revision"): "unchanged",
    ("distributing", "switch"): "renewing",
    ("distributing", "finish"): "still being distributed",
    ("distributing", "finish --force"): "still being distributed",
    ("renewing", "start"): "already in progress",
    ("renewing", "record revision"): "unchanged",
    ("renewing", "switch"): "no new CA is being distributed",
    ("renewing", "finish"): "idle",
    ("renewing", "finish --force"): "idle",
    ("legacy rotation", "start"): "already in progress",
    ("legacy rotation", "record revision"): "unchanged",
    ("legacy rotation", "switch"): "no new CA is being distributed",
    ("legacy rotation", "finish"): "idle",
    ("legacy rotation", "finish --force"): "idle",
}


def test_the_transition_table_is_complete() -> None:
    assert set(TRANSITIONS) == set(itertools.product(STATES, STEPS))


def _phase_of(record: MeshRecord) -> str:
    spec = decode_spec(record)
    phase = rotation_phase(spec)
    if phase is None:
        return "idle"
    if phase == "distributing":
        return "distributing" if spec.bundle_revision else "distributing, not recorded"
    return "renewing"


@pytest.mark.parametrize(("state", "step"), sorted(TRANSITIONS))
def test_every_step_from_every_state(state: str, step: str) -> None:
    before = STATES[state]()
    expected = TRANSITIONS[(state, step)]
    if expected not in STATES:
        if expected == "unchanged":
            assert STEPS[step](before) is None
            return
        with pytest.raises(RotationConflict, match=expected) as refused:
            STEPS[step](before)
        assert "\n" not in str(refused.value)
        return
    after = STEPS[step](before)
    assert after is not None
    assert _phase_of(after) == expected
    spec, old_spec = decode_spec(after), decode_spec(before)
    if step == "switch":  # the signer moves; the bundle and the keys stay
        assert signing_fingerprint(spec) == NEW and spec.switched_at == STARTED + 20
        assert (after.ca, after.previous_ca) == (before.ca, before.previous_ca)
        assert spec.bundle_revision == old_spec.bundle_revision
    if step == "start":  # the old CA keeps signing
        assert signing_fingerprint(spec) == signing_fingerprint(old_spec)
    if step.startswith("finish"):
        assert after.previous_ca == b"" and spec == MeshSpec(
            mtls=spec.mtls, default_allow=spec.default_allow, ca=spec.ca, ca_cert=spec.ca_cert
        )


def test_a_spec_without_phases_decodes_as_renewing() -> None:
    spec = decode_spec(_legacy())
    assert spec.rotation_phase == "renewing" and spec.bundle_revision == 0
    assert spec.switched_at is None
    # And one written now round-trips.
    assert msgspec.json.decode(encode_spec(spec), type=MeshSpec) == spec


# ---------------------------------------------------------------------------- the switch


DATAPLANE_KINDS = {
    "offline, behind": dp("x", online=False, applied=REVISION - 1),
    "offline, applied": dp("x", online=False, applied=REVISION),
    "online, never applied": dp("x", applied=0),
    "online, behind": dp("x", applied=REVISION - 1),
    "online, applied": dp("x", applied=REVISION),
    "online, newer": dp("x", applied=REVISION + 5),
}
CLOCKS = {
    "at the start": STARTED,
    "just before the timeout": STARTED + TIMEOUT - 0.001,
    "at the timeout": STARTED + TIMEOUT,
    "after the timeout": STARTED + TIMEOUT + 100,
}


@pytest.mark.parametrize("recorded", [True, False])
@pytest.mark.parametrize("clock", CLOCKS)
@pytest.mark.parametrize(
    "kinds",
    [combo for n in range(3) for combo in itertools.combinations_with_replacement(DATAPLANE_KINDS, n)],
)
def test_the_switch_waits_for_every_online_dataplane_or_the_timeout(
    recorded: bool, clock: str, kinds: tuple[str, ...]
) -> None:
    record = _recorded() if recorded else _DISTRIBUTING
    dataplanes = [
        msgspec.structs.replace(DATAPLANE_KINDS[kind], name=f"dp-{i}")
        for i, kind in enumerate(kinds)
    ]
    now = CLOCKS[clock]
    decision = switch_decision(
        record, dataplanes, is_online=online, now=now, timeout_seconds=TIMEOUT
    )
    assert decision is not None
    # The oracle.
    waiting = [
        f"dp-{i}"
        for i, kind in enumerate(kinds)
        if kind.startswith("online") and (not recorded or kind in (
            "online, never applied", "online, behind"
        ))
    ]
    timed_out = now - STARTED >= TIMEOUT
    assert decision.waiting == waiting
    assert waiting_for_bundle(record, dataplanes, is_online=online) == waiting
    assert decision.switch == ((recorded and not waiting) or timed_out)
    assert decision.timed_out == (decision.switch and bool(waiting))


@pytest.mark.parametrize("state", ["idle", "renewing", "legacy rotation"])
def test_there_is_nothing_to_switch_outside_distributing(state: str) -> None:
    record = STATES[state]()
    assert switch_decision(
        record, [dp("a")], is_online=online, now=STARTED + 10 * TIMEOUT
    ) is None
    assert waiting_for_bundle(record, [dp("a")], is_online=online) == []


def test_a_zero_timeout_switches_at_once_and_a_bad_revision_is_not_recorded() -> None:
    decision = switch_decision(
        _DISTRIBUTING, [dp("a")], is_online=online, now=STARTED, timeout_seconds=0
    )
    assert decision is not None and decision.switch and decision.waiting == ["a"]
    assert with_bundle_revision(_DISTRIBUTING, 0) is None


def test_the_finish_refusal_while_distributing_names_at_most_ten() -> None:
    many = [dp(f"vm-{i:02}") for i in range(12)]
    with pytest.raises(RotationConflict) as refused:
        finish_rotation(_recorded(), many, is_online=online)
    assert "waiting for: vm-00" in str(refused.value)
    assert "vm-09 and 2 more" in str(refused.value) and "vm-10" not in str(refused.value)
