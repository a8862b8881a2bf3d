"""A small linearizability checker in the manner of Porcupine (pure, test-only).

Theory of operation
-------------------
A history is a list of :class:`Operation`: who called, when the call started, when its
answer came back, what was asked and what was answered. The history is linearizable
against a sequential :class:`Model` when every operation can be given one instant
between its call and its return such that replaying the operations in the order of
those instants through the model reproduces every recorded answer (Herlihy & Wing).

The search is Wing & Gong's, with Lowe's memoization, as Porcupine does it: from the
operations not linearized yet, try as the next one any whose call came before the
earliest return among them (anything later would contradict real-time order); step
the model; on success go deeper, on failure try the next candidate, and when none is
left, undo the last choice. A ``(set of linearized operations, model state)`` pair
that was reached before is never explored again: the rest of the search from it
would be the same, so it failed then and would fail now. That cache is what makes
histories of hundreds of operations cheap when the model is mostly deterministic.

P-compositionality: a model may split a history into parts that do not interact
(leases on different resources), and the whole is linearizable exactly when each part
is. Checking parts separately keeps the search space the product of small pieces'
sizes instead of one large one.

Times are whatever the recorder used (``trio.current_time()`` in our tests). An
operation whose call is not strictly after another's return counts as concurrent
with it, the permissive reading, so equal timestamps cannot produce a false failure.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

S = TypeVar("S", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Operation:
    """One completed call: ``input`` was asked at ``call``, ``output`` came back at ``ret``."""

    client: int
    call: float
    ret: float
    input: Any
    output: Any

    def __post_init__(self) -> None:
        if self.ret < self.call:
            raise ValueError(f"an operation returns before it is called: {self}")


def _whole(history: Sequence[Operation]) -> list[list[Operation]]:
    return [list(history)]


@dataclass(frozen=True)
class Model(Generic[S]):
    """A sequential specification.

    ``step(state, input, output)`` says whether ``output`` is a correct answer to
    ``input`` in ``state`` and gives the state after it. States must be hashable and
    compare by value: the search memoizes on them. ``partition`` splits a history into
    independent parts (default: one part).
    """

    init: Callable[[], S]
    step: Callable[[S, Any, Any], tuple[bool, S]]
    partition: Callable[[Sequence[Operation]], list[list[Operation]]] = _whole
    describe: Callable[[Operation], str] = repr
    """How an operation is printed in :meth:`Verdict.explain`."""


@dataclass(frozen=True)
class Verdict:
    """The result of :func:`check`.

    When ``ok``, ``order`` is a witness: every operation, in one valid linearization
    (parts one after the other). Otherwise ``order`` is the longest linearizable
    prefix the search found in the first failing part, and ``stuck`` the operations of
    that part it could not place after it.
    """

    ok: bool
    order: tuple[Operation, ...]
    stuck: tuple[Operation, ...] = ()
    describe: Callable[[Operation], str] = field(default=repr, repr=False, compare=False)

    def explain(self) -> str:
        """A readable account for an assertion message."""
        if self.ok:
            return f"linearizable ({len(self.order)} operations)"
        lines = ["not linearizable; the longest linearizable prefix of the failing part is:"]
        lines += [f"  {self.describe(op)}" for op in self.order]
        lines.append("and none of these can come next:")
        lines += [f"  {self.describe(op)}" for op in self.stuck]
        return "\n".join(lines)


def check(model: Model[S], history: Sequence[Operation]) -> Verdict:
    """Whether ``history`` is linearizable against ``model``, with a witness or a reason."""
    order: list[Operation] = []
    for part in model.partition(history):
        ok, linear, stuck = _check_part(model, part)
        if not ok:
            return Verdict(False, tuple(linear), tuple(stuck), model.describe)
        order.extend(linear)
    return Verdict(True, tuple(order), (), model.describe)


def _check_part(
    model: Model[S], part: Sequence[Operation]
) -> tuple[bool, list[Operation], list[Operation]]:
    """WGL depth-first search over one part; ``(ok, linearization or best prefix, stuck)``."""
    ops = sorted(part, key=lambda op: (op.call, op.ret))
    everything = (1 << len(ops)) - 1
    seen: set[tuple[int, S]] = set()
    # Each frame: the state and the linearized set before a choice, the operation
    # chosen there, and the candidates still to try at that depth.
    stack: list[tuple[S, int, int, list[int]]] = []
    state, done = model.init(), 0
    candidates = _candidates(ops, done)
    best: list[int] = []
    while done != everything:
        advanced = False
        while candidates:
            i = candidates.pop(0)
            ok, after = model.step(state, ops[i].input, ops[i].output)
            key = (done | 1 << i, after)
            if not ok or key in seen:
                continue
            seen.add(key)
            stack.append((state, done, i, candidates))
            state, done = after, done | 1 << i
            candidates = _candidates(ops, done)
            advanced = True
            break
        if advanced:
            if len(stack) > len(best):
                best = [frame[2] for frame in stack]
            continue
        if not stack:
            placed = set(best)
            linear = [ops[i] for i in best]
            return False, linear, [op for j, op in enumerate(ops) if j not in placed]
        state, done, _, candidates = stack.pop()
    return True, [ops[frame[2]] for frame in stack], []


def _candidates(ops: Sequence[Operation], done: int) -> list[int]:
    """The operations that may be linearized next: not done, called before every
    pending operation's return (``ops`` is sorted by call time)."""
    pending = [i for i in range(len(ops)) if not done >> i & 1]
    if not pending:
        return []
    first_return = min(ops[i].ret for i in pending)
    return [i for i in pending if ops[i].call <= first_return]
