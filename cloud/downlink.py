"""The cloud's link to its nodes: each node gets only the global state it does not hold, and
rounds short of their quorum are re-sent — the network work of a round, kept out of the
strategy's ``aggregate_*``.

:class:`Downlink` wraps Flower's ``Grid`` (the only thing it changes is ``send_and_receive``,
which ``Strategy.start`` and the quorum's retries call). Per node it keeps a *ledger*: group →
digest of what that node is known to hold (protocol.state_sync). Each outgoing round message
gets the manifest of its groups and loses the groups the ledger says the node holds; a reply
that is not an error confirms the node now holds every group of its message. A ``need-state``
reply (the node lost its cache, or never had it) clears the node's ledger and the whole message
is sent to it once more, in the same call, so the strategy sees one ordinary reply.

The bytes counted (``account``) are those of the messages as they leave: the stripped ones and
any re-sends. The ledger lives in memory: a restarted cloud starts with empty ledgers and sends
everything once, which is correct, only larger.

Why a wrapper around the grid and not part of the strategy: the strategy decides *what* a round
needs; how much of it must travel to a given node is a property of the link, and keeping it here
leaves ``configure_*`` pure (the same messages whatever each node caches).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from protocol.state_sync import ARRAYS, CONFIG, manifest_of, need_state, strip
from protocol.wire_pack import PackError, pack_record, unpack_record

log = logging.getLogger(__name__)


# Reply polling of an exchange (see Downlink._round_trip): first after 50 ms, then doubling.
POLL_FIRST_S = 0.05
POLL_MAX_S = 0.4


class Downlink:
    """A Grid whose round messages carry only what each destination lacks (``delta``), or are
    sent whole (``full``: the ledger is not used, nothing is stripped)."""

    def __init__(self, grid: Grid, account: Callable[[RecordDict], None], delta: bool = True,
                 ledger: dict[int, dict[str, str]] | None = None,
                 retry: Callable[[list[Message], int], list[Message]] | None = None):
        self._grid = grid
        self.retry = retry
        self._account = account
        self.delta = delta
        self.ledger: dict[int, dict[str, str]] = {} if ledger is None else ledger
        self.resent = 0  # full re-sends after a need-state reply (for metrics and tests)
        # Wall seconds of the last send_and_receive, retries included: the round's exchange as
        # the cloud sees it (the clients' work plus every overhead on the way).
        self.last_exchange_s = 0.0

    def __getattr__(self, name: str) -> Any:  # get_node_ids, push_messages, … as Flower's
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None
                         ) -> Iterable[Message]:
        """One exchange, then the retries ``retry(replies so far, attempt)`` asks for (the
        strategy's quorum policy), each an exchange of its own; every reply is returned."""
        t0 = time.monotonic()
        replies = self._exchange(messages, timeout)
        attempt = 1
        while self.retry is not None and (again := self.retry(replies, attempt)):
            replies += self._exchange(again, timeout)
            attempt += 1
        self.last_exchange_s = time.monotonic() - t0
        return replies

    def _round_trip(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Push ``messages`` and pull their replies until all are in or ``timeout`` passes.

        Flower's deployed Grid polls for replies every 3 s (``send_and_receive``), so every
        exchange lasted a multiple of 3 s however quick the clients were; the replies are
        pulled here at POLL_FIRST_S, backing off to POLL_MAX_S (a pull is one cheap request to
        the SuperLink). A grid that is not Flower's (a test's) keeps its own send_and_receive."""
        if not isinstance(self._grid, Grid):
            return _unpacked(self._grid.send_and_receive(messages, timeout=timeout))
        waiting = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        out: list[Message] = []
        delay = POLL_FIRST_S
        while waiting:
            got = list(self._grid.pull_messages(waiting))
            out += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (end is not None and time.monotonic() >= end):
                break
            time.sleep(delay if end is None else max(0.0, min(delay, end - time.monotonic())))
            delay = min(2 * delay, POLL_MAX_S)
        return _unpacked(out)

    def _outgoing(self, m: Message, content: RecordDict) -> Message:
        """``content`` for ``m``'s node, counted as it leaves and packed for the wire."""
        self._account(content)
        return _like(m, pack_record(content))

    def _exchange(self, messages: Iterable[Message], timeout: float | None) -> list[Message]:
        # destination node → (the full message, its manifest). A round sends a node one message
        # (Flower's sampling, the quorum's re-sends), and Grids number messages differently
        # (uuid in memory, content id over gRPC), so a reply is matched by its sender.
        full: dict[int, tuple[Message, dict[str, str]]] = {}
        out: list[Message] = []
        manifests: dict[int, dict[str, str]] = {}  # id(ArrayRecord) → manifest: one digest pass
        for m in messages:
            if self.delta and CONFIG in m.content and ARRAYS in m.content:
                key = id(m.content[ARRAYS])
                man = manifests.get(key)
                if man is None:
                    man = manifests[key] = manifest_of(m.content)
                node = m.metadata.dst_node_id
                content = strip(m.content, man, self.ledger.get(node, {}))
                full[node] = (m, man)
            else:
                content = m.content
            out.append(self._outgoing(m, content))
        replies = self._round_trip(out, timeout)
        again: list[tuple[int, Message, dict[str, str]]] = []
        result: list[Message] = []
        for r in replies:
            node = r.metadata.src_node_id
            origin = full.get(node)
            if origin is None or r.has_error():
                result.append(r)
                continue
            m, man = origin
            groups = need_state(r.content)
            if groups is None:
                self.ledger.setdefault(node, {}).update(man)
                result.append(r)
            else:
                log.info("node %d holds none of %s at the current version: sending it the whole "
                         "state", node, groups or "its groups")
                self.ledger.pop(node, None)
                again.append((node, m, man))
        if again:
            resend = []
            for _, m, man in again:
                resend.append(self._outgoing(m, strip(m.content, man, {})))  # every group
            self.resent += len(resend)
            for r in self._round_trip(resend, timeout):
                origin = full.get(r.metadata.src_node_id)
                if origin is not None and not r.has_error() and need_state(r.content) is None:
                    self.ledger.setdefault(r.metadata.src_node_id, {}).update(origin[1])
                result.append(r)
        return result


def _unpacked(replies: Iterable[Message]) -> list[Message]:
    """Replies with their arrays unpacked (protocol.wire_pack). A reply whose packed arrays do
    not unpack keeps them as they came: the strategy then refuses it as malformed and counts it."""
    out = list(replies)
    for r in out:
        if not r.has_error():
            try:
                r.content = unpack_record(r.content)
            except PackError as e:
                log.warning("reply from node %d: %s", r.metadata.src_node_id, e)
    return out


def _like(m: Message, content: RecordDict) -> Message:
    """A new message to ``m``'s node with ``content`` (type and group as ``m``)."""
    return Message(content=content, message_type=m.metadata.message_type,
                   dst_node_id=m.metadata.dst_node_id, group_id=m.metadata.group_id)
