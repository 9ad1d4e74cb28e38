"""Tests of real ``raft.node`` processes on loopback, with a fault-injecting TCP proxy."""
