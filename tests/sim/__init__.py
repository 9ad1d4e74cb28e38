"""Deterministic simulation of many Raft groups on a faulty network and disk (design §9)."""
