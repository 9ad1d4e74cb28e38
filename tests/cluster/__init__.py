"""Tests of real ``bench.raft_testnode`` processes on loopback, with a fault-injecting TCP proxy."""
