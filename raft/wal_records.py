"""The record format of the write-ahead log (raft/wal.py): pure encoding and decoding, no I/O.

A record is a 13-byte header followed by a payload::

    [u32 payload length][u32 CRC32C][u8 type][u32 group][payload: msgspec msgpack]

little-endian.  The CRC32C covers type, group and payload (the header's last 5 bytes and the
payload are contiguous, so it is one checksum over ``record[8:]``).  Each type has one Struct:

    SEGMENT     SegmentHeader   first record of every segment file (group 0)
    ENTRIES     EntriesRecord   entries from ``entries[0].index``: replace the stored suffix
    HARD_STATE  HardState       the group's latest term, vote and commit
    SNAPSHOT    SnapshotRecord  the group's snapshot: its meta and the file holding its data
    TOMBSTONE   GroupTombstone  the group left this node: everything written for it before is
                                void; what is written for it after starts it anew (empty)

The encoder, ``append_record``, is in raft/wal_segments.py (compiled with mypyc; this module
holds msgspec Structs and is not).  Rules kept here: a record is never longer than
``RECORD_BYTES_MAX``; ``Scanner`` stops at the first record that is short, zero, oversized or
fails its CRC and never decodes past it.  A record whose CRC is right but whose type or payload
cannot be decoded is not torn but written by a bug or a newer version: that raises
``InvariantViolation``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Generator
from dataclasses import dataclass

import msgspec
import msgspec.msgpack
from crc32c import crc32c

from .errors import InvariantViolation, check
from .messages import Entry, HardState, SnapshotMeta

HEADER = struct.Struct("<IIBI")
HEADER_BYTES = HEADER.size  # 13
RECORD_BYTES_MAX = 1 << 30  # one record, header included (entries are chunked far below this)
FORMAT_VERSION = 1
GROUP_MAX = (1 << 32) - 1


class RecordType(enum.IntEnum):
    SEGMENT = 1
    ENTRIES = 2
    HARD_STATE = 3
    SNAPSHOT = 4
    TOMBSTONE = 5


class SegmentHeader(msgspec.Struct, array_like=True, frozen=True):
    """Names the segment and where the previous one ended (to tell a clean end from damage)."""

    version: int
    seq: int
    prev_seq: int  # 0 when there was no previous segment
    prev_end: int  # bytes of valid records in segment prev_seq when this one was started


class EntriesRecord(msgspec.Struct, array_like=True, frozen=True, gc=False):
    entries: list[Entry]


class SnapshotRecord(msgspec.Struct, array_like=True, frozen=True):
    """The group's compaction point: entries <= meta.index are dropped.

    ``replace``: a snapshot received from the leader, which also drops every entry after it
    (``MemoryStorage.apply_snapshot``); otherwise one taken by the application at its applied
    index (``create_snapshot`` + ``compact``), which keeps the entries after it.
    """

    meta: SnapshotMeta
    file: str
    replace: bool


class GroupTombstone(msgspec.Struct, array_like=True, frozen=True):
    """The group was removed from this node (it applied its own removal from the group's
    membership).  Replay forgets every earlier record of the group; a later record starts it
    again from nothing (the node hosts it anew, as a fresh learner).  ``last_index``: the last
    index the group's log held when it was removed (for the record: replay does not use it)."""

    last_index: int


Payload = SegmentHeader | EntriesRecord | HardState | SnapshotRecord | GroupTombstone

# A record's type code by its payload's class: the encoder (``raft.wal_segments.append_record``,
# compiled: it runs for every group of every round) looks them up here.
TYPE_CODES: dict[type, RecordType] = {
    SegmentHeader: RecordType.SEGMENT,
    EntriesRecord: RecordType.ENTRIES,
    HardState: RecordType.HARD_STATE,
    SnapshotRecord: RecordType.SNAPSHOT,
    GroupTombstone: RecordType.TOMBSTONE,
}
_decoders: dict[RecordType, msgspec.msgpack.Decoder[Payload]] = {
    RecordType.SEGMENT: msgspec.msgpack.Decoder(SegmentHeader),
    RecordType.ENTRIES: msgspec.msgpack.Decoder(EntriesRecord),
    RecordType.HARD_STATE: msgspec.msgpack.Decoder(HardState),
    RecordType.SNAPSHOT: msgspec.msgpack.Decoder(SnapshotRecord),
    RecordType.TOMBSTONE: msgspec.msgpack.Decoder(GroupTombstone),
}


@dataclass(frozen=True, slots=True)
class Record:
    offset: int  # of the header, in the scanned buffer
    length: int  # header included
    type: RecordType
    group: int
    payload: Payload


def decode(kind: int, data: memoryview | bytes) -> Payload:
    try:
        return _decoders[RecordType(kind)].decode(data)
    except (ValueError, msgspec.DecodeError) as e:  # the CRC matched: not a torn write
        raise InvariantViolation(f"undecodable WAL record of type {kind}: {e}") from e


def parse(data: memoryview | bytes, group: int, kind: RecordType) -> Payload:
    """Verify and decode one record read back from disk (the whole record, header included)."""
    view = memoryview(data)
    check(len(view) >= HEADER_BYTES, "WAL record read back short")
    length, crc, t, g = HEADER.unpack_from(view)
    check(length + HEADER_BYTES == len(view), "WAL record length changed on disk")
    check(crc32c(view[8:]) == crc, "WAL record read back with a bad CRC")
    if t != kind or g != group:
        raise InvariantViolation(f"WAL record ({t}, {g}) read back, ({kind}, {group}) expected")
    return decode(t, view[HEADER_BYTES:])


class Scanner:
    """The good records of ``data`` (a segment's bytes) from ``records()``; then ``end``, ``clean``.

    ``end`` is the offset just after the last good record; ``clean`` is True when the data ends
    there (EOF, or zero padding of a preallocated file) and False when a torn or corrupt record
    follows.
    """

    def __init__(self, data: memoryview, record_bytes_max: int) -> None:
        self._data = data
        self._limit = min(record_bytes_max, RECORD_BYTES_MAX)
        self.end = 0
        self.clean = True

    def records(self) -> Generator[Record, None, None]:
        data, pos, n = self._data, 0, len(self._data)
        while n - pos >= HEADER_BYTES:
            length, crc, kind, group = HEADER.unpack_from(data, pos)
            end = pos + HEADER_BYTES + length
            if length == 0 or HEADER_BYTES + length > self._limit or end > n:
                break
            if crc32c(data[pos + 8 : end]) != crc:
                break
            if kind not in _DECODABLE:
                raise InvariantViolation(f"WAL record of unknown type {kind} with a valid CRC")
            payload = decode(kind, data[pos + HEADER_BYTES : end])
            yield Record(pos, end - pos, RecordType(kind), group, payload)
            pos = self.end = end
        self.clean = not any(data[pos : pos + HEADER_BYTES])


_DECODABLE = frozenset(int(t) for t in RecordType)
