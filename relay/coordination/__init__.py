"""Deterministic coordination state machines folded from a namespace's log.

Each machine is pure: requests and the log's own time go in, outcomes come out, and
the same log gives the same state anywhere. The relay appends each outcome to the
same log as its own signed event (relay/node.py), so ``state == fold(log)``.
"""
