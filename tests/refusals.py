"""Awaiting what must be refused: a relay error (by code) or a coordination refusal
(by problem). Each returns the exception, for checks of its reason."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import pytest

from agent_sdk.errors import ErrorCode, ProtocolError
from agent_sdk.ledger import LedgerRefusal


async def refused(code: ErrorCode, call: Awaitable[Any]) -> ProtocolError:
    """Await ``call`` and return the ProtocolError it must raise."""
    with pytest.raises(ProtocolError) as info:
        await call
    assert info.value.code is code, info.value
    return info.value


async def declined(problem: str, call: Awaitable[Any]) -> LedgerRefusal:
    """Await ``call`` and return the refusal (``problem``) it must raise."""
    with pytest.raises(LedgerRefusal) as info:
        await call
    assert info.value.problem == problem, info.value
    return info.value
