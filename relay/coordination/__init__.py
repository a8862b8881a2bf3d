"""Deterministic coordination state machines folded from a namespace's log.

Each machine is pure: requests and the log's own time go in, outcomes come out, and
the same log gives the same state anywhere. Wiring them into the relay (outcomes as
relay-signed events in the same log) is the work ledger's job (issue 3).
"""
