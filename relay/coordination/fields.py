"""Checks on the fields of a coordination request's body (pure).

A request body is remote input: each check raises :class:`BadRequest` with a reason
that names the field, and the relay answers the request with a ``bad_request``
refusal instead of touching any state.
"""

from __future__ import annotations

from typing import Any

from agent_sdk.wire import canonical

MAX_TEXT = 16 * 1024
"""Characters in a free-text field: a description, a note, a reason."""
MAX_LIST = 256
"""Items in a list field: acceptance criteria, files, labels."""


class BadRequest(Exception):
    """A request body that does not say what its kind needs."""


class Conflict(Exception):
    """A well-formed request that the namespace's state refuses; ``problem`` says why
    (``not_found``, ``closed``, ``insufficient_stake``...)."""

    def __init__(self, problem: str, reason: str) -> None:
        super().__init__(reason)
        self.problem = problem
        self.reason = reason


def as_map(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("the body of a request is a map")
    return body


def only(body: dict[str, Any], *allowed: str) -> None:
    extra = sorted(set(body) - set(allowed))
    if extra:
        # Name a few, shortened: an outcome must never be bigger than its request.
        shown = ", ".join(repr(name[:32]) for name in extra[:5])
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise BadRequest(f"unknown fields {shown}{more}")


def text(body: dict[str, Any], name: str, limit: int, default: str | None = None) -> str:
    value = body.get(name, default)
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be text")
    if len(value) > limit:
        raise BadRequest(f"{name} is over {limit} characters")
    return value


def opt_text(body: dict[str, Any], name: str, limit: int) -> str | None:
    """An optional text field that may also be nil, meaning absent (the ones 8.3 names)."""
    return None if body.get(name) is None else text(body, name, limit)


def texts(body: dict[str, Any], name: str) -> tuple[str, ...]:
    value = body.get(name, [])
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise BadRequest(f"{name} must be a list of at most {MAX_LIST} texts")
    if not all(isinstance(item, str) and len(item) <= MAX_TEXT for item in value):
        raise BadRequest(f"{name} must hold texts of at most {MAX_TEXT} characters")
    return tuple(value)


def integer(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if type(value) is not int:
        raise BadRequest(f"{name} must be an integer")
    return value


def opt_integer(body: dict[str, Any], name: str) -> int | None:
    return None if body.get(name) is None else integer(body, name)


def document(body: dict[str, Any], name: str, limit: int) -> Any:
    """A JSON-shaped value (text, numbers, booleans, null, lists, maps with text keys)
    of at most ``limit`` bytes in its canonical encoding."""
    value = body.get(name)
    if not _json_shaped(value, depth=0):
        raise BadRequest(f"{name} must be text or JSON (maps with text keys, no bytes)")
    size = len(canonical(value))
    if size > limit:
        raise BadRequest(f"{name} is {size} bytes; the limit is {limit}")
    return value


def _json_shaped(value: Any, depth: int) -> bool:
    if depth > 32:
        return False
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_json_shaped(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(
            isinstance(key, str) and _json_shaped(item, depth + 1) for key, item in value.items()
        )
    return False
