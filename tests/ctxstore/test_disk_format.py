"""What ctxstore writes to disk, pinned byte for byte: every Raft command (each entry of the
WAL is one) and a group snapshot.  A node must read what an older node wrote, so a change of
these bytes must be deliberate.  Commands and snapshots hold ctxstore's own records
(ctxstore/records.py), not the client protocol's types, so a change to the protocol cannot
change them.  Regenerate after a deliberate change and review the diff:

    REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/ctxstore/test_disk_format.py
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from ctxstore import commands
from ctxstore.records import AgentRecord, SkipParts, StoredMessage, WindowConfig, encode_parts
from ctxstore.state import ConversationState, StateLimits, fingerprint
from raft.messages import Entry

GOLDEN = Path(__file__).parent / "golden_disk"
BEFORE_FINGERPRINT = GOLDEN / "before_fingerprint"  # appends as written before it was carried
REGEN = os.environ.get("REGEN_GOLDEN") == "1"
T0 = 1_700_000_000_000
PARTS = [{"type": "text", "text": "hi"}, {"type": "tool-x", "toolCallId": "c", "state":
         "input-available", "input": {"q": 1}}]  # fmt: skip
APPEND = commands.Append("s-1", "agent", "a-1", "text", "", {"k": 1}, "m-1", 3, 7, T0,
                         "assistant", encode_parts(PARTS), [1, 6], 2,
                         commands.Actor("agent", "a-1"),
                         fingerprint("agent", "a-1", "text", "", {"k": 1}, "assistant",
                                     encode_parts(PARTS)))  # fmt: skip
CONFIG = WindowConfig(8000, 0.7, SkipParts(["tool-"], 50), "o200k_base")
SUMMARY = StoredMessage("s-1", 0, "system", "", "summary", "so far", {}, None, T0, 2, "system")
AGENT = AgentRecord("bot", "https://agent.example/hook", {"x-key": "v"}, 60_000, 10_000, 500,
                    "tail 20", 5, "active", "auto")  # fmt: skip

APPEND_SHORT = commands.Append("s-1", "user", "u-1", "text", "hello", {}, None, None, 1, T0)

COMMANDS: dict[str, commands.Command] = {
    "create_session": commands.CreateSession("s-1", "u-1", "a-1", {"title": "Trip"}, T0),
    "append_short": APPEND_SHORT,
    "append_structured": APPEND,
    "mark_read": commands.MarkRead("s-1", "u-1", 2),
    "set_context_config": commands.SetContextConfig("s-1", CONFIG, [(1, 2, []), (2, 7, [1, 6])]),
    "compact": commands.Compact("s-1", 1, 2, [SUMMARY], [[]], 4),
    "postgres_flushed": commands.PostgresFlushed([("s-1", 2, 9)], 1, False),
    "put_agent": commands.PutAgent(AGENT, True),
    "disable_agent": commands.DisableAgent("bot"),
    "dispatch_begin": commands.DispatchBegin("s-1", 2, 1, T0),
    "dispatch_end": commands.DispatchEnd("s-1", 2, 1, APPEND),
    "append_batch": commands.AppendBatch([APPEND_SHORT, APPEND]),
}


def _snapshot() -> bytes:
    """A group snapshot holding a session with a tail, dedupe ids, cursors and a window."""
    state = ConversationState(StateLimits(), groups=None)
    for index, name in enumerate(
        ["create_session", "append_short", "set_context_config", "append_structured",
         "mark_read", "compact", "put_agent"], start=1,
    ):  # fmt: skip
        cmd = COMMANDS[name]
        if isinstance(cmd, commands.Append):  # no guards: every command applies
            cmd = msgspec.structs.replace(cmd, actor=None, if_version=None, expected_seq=None)
        if isinstance(cmd, commands.Compact):
            cmd = msgspec.structs.replace(cmd, if_version=None)
        result = state.apply(0, [Entry(1, index, data=commands.encode_command(cmd))])[0]
        assert not isinstance(result, commands.Rejected), (name, result)
    return state.snapshot(0)


RECORDS: dict[str, bytes] = {
    **{f"command_{k}": commands.encode_command(v) for k, v in COMMANDS.items()},
    "snapshot_group": _snapshot(),
}


def test_every_command_type_is_pinned() -> None:
    assert {type(c) for c in COMMANDS.values()} == set(commands.Command.__args__)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_the_bytes_on_disk_are_as_pinned(name: str) -> None:
    data = RECORDS[name]
    path = GOLDEN / f"{name}.hex"
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        hexed = data.hex()
        rows = [hexed[i : i + 64] for i in range(0, len(hexed), 64)]
        path.write_text("\n".join([f"# {name}: {len(data)} bytes", *rows, ""]))
    assert path.exists(), f"no golden file {path.name}: run with REGEN_GOLDEN=1"
    golden = _read_golden(path)
    assert data == golden, f"what is written to disk for {name} changed (REGEN_GOLDEN=1)"
    if name.startswith("command_"):  # and it reads back as itself
        assert commands.decode_command(golden) == COMMANDS[name.removeprefix("command_")]
    else:
        restored = ConversationState(StateLimits(), groups=None)
        restored.restore(0, golden)
        assert restored.snapshot(0) == golden


def _read_golden(path: Path) -> bytes:
    return bytes.fromhex("".join(x for x in path.read_text().splitlines() if not x.startswith("#")))


def _without_fingerprint(cmd: commands.Command) -> commands.Command:
    match cmd:
        case commands.Append():
            return msgspec.structs.replace(cmd, fingerprint=None)
        case commands.DispatchEnd():
            return msgspec.structs.replace(cmd, append=_without_fingerprint(cmd.append))
        case commands.AppendBatch():
            return commands.AppendBatch([_without_fingerprint(a) for a in cmd.appends])  # type: ignore[misc]
    return cmd


@pytest.mark.parametrize("path", sorted(BEFORE_FINGERPRINT.glob("*.hex")), ids=lambda p: p.stem)
def test_appends_written_before_the_carried_fingerprint_still_read(path: Path) -> None:
    """An entry written before ``Append.fingerprint`` reads back without it (apply hashes)."""
    cmd = COMMANDS[path.stem.removeprefix("command_")]
    old = _without_fingerprint(cmd)
    assert commands.decode_command(_read_golden(path)) == old


def test_a_snapshot_is_the_same_from_appends_with_or_without_the_fingerprint() -> None:
    """Replaying the entries written before ``Append.fingerprint`` reaches the pinned snapshot
    (the dedupe window holds the same fingerprints, the replica the same state)."""
    state = ConversationState(StateLimits(), groups=None)
    for index, name in enumerate(
        ["create_session", "append_short", "set_context_config", "append_structured",
         "mark_read", "compact", "put_agent"], start=1,
    ):  # fmt: skip
        old = BEFORE_FINGERPRINT / f"command_{name}.hex"
        data = _read_golden(old) if old.exists() else RECORDS[f"command_{name}"]
        cmd = commands.decode_command(data)
        if isinstance(cmd, commands.Append):
            assert cmd.fingerprint is None
            cmd = msgspec.structs.replace(cmd, actor=None, if_version=None, expected_seq=None)
        if isinstance(cmd, commands.Compact):
            cmd = msgspec.structs.replace(cmd, if_version=None)
        state.apply(0, [Entry(1, index, data=commands.encode_command(cmd))])
    assert state.snapshot(0) == RECORDS["snapshot_group"]


def test_an_append_batch_is_written_from_its_appends_bytes() -> None:
    """The router builds a batch from the appends' encoded bytes: the same bytes as encoding
    the batch, and at most APPEND_BATCH_OVERHEAD_BYTES more than its appends."""
    batch = COMMANDS["append_batch"]
    assert isinstance(batch, commands.AppendBatch)
    parts = [commands.encode_command(a) for a in batch.appends]
    data = commands.encode_append_batch(parts)
    assert data == RECORDS["command_append_batch"]
    many = parts * 5000  # a 3-byte list header
    size = len(commands.encode_append_batch(many)) - sum(map(len, many))
    assert 0 < size <= commands.APPEND_BATCH_OVERHEAD_BYTES


def _struct_modules(types: list[object]) -> set[str]:
    modules: set[str] = set()
    for info in msgspec.inspect.multi_type_info(types):
        stack: list[msgspec.inspect.Type] = [info]
        seen: set[int] = set()
        while stack:
            t = stack.pop()
            if id(t) in seen:
                continue
            seen.add(id(t))
            if isinstance(t, msgspec.inspect.StructType):
                modules.add(t.cls.__module__)
                stack.extend(f.type for f in t.fields)
            else:  # containers and unions: their item types
                for name in ("item_type", "key_type", "value_type"):
                    if hasattr(t, name):
                        stack.append(getattr(t, name))
                stack.extend(getattr(t, "types", ()) or ())
                stack.extend(getattr(t, "item_types", ()) or ())
    return modules


def test_what_is_written_holds_no_client_protocol_type() -> None:
    """A change to wire/protocol.py cannot change the disk: no record embeds its Structs."""
    from ctxstore.records import StoredMessage as Row  # an archive row
    from ctxstore.state_schema import GroupSnap

    modules = _struct_modules([commands.Command, GroupSnap, Row])
    assert modules == {"ctxstore.commands", "ctxstore.records", "ctxstore.state_schema"}
