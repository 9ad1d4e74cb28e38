"""The control protocol of the Raft test node (``bench.raft_control``): its one framer."""

from __future__ import annotations

import pytest

from bench.raft_control import FRAME_BYTES_MAX, HEADER, Framer, Propose, Reply, frame


def test_frames_split_at_every_offset_come_out_whole() -> None:
    data = frame(Propose(1, 7, b"x" * 40)) + frame(Reply(2, True, 3)) + frame(Reply(3, False))
    whole = Framer().feed(data)
    assert len(whole) == 3
    for cut in range(len(data) + 1):
        framer = Framer()
        assert framer.feed(data[:cut]) + framer.feed(data[cut:]) == whole
    framer = Framer()
    assert [b for i in range(len(data)) for b in framer.feed(data[i : i + 1])] == whole


def test_an_oversize_length_is_refused_before_its_body_arrives() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        Framer().feed(HEADER.pack(FRAME_BYTES_MAX + 1))
    assert Framer().feed(HEADER.pack(FRAME_BYTES_MAX)) == []  # at the limit: waits for the body
