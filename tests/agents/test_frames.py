"""ClientFrames against frames a wsproto client builds, and AgentServer over a socketpair."""
from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Iterator
from typing import Any, Optional, Union

import pytest
from simple_websocket import ConnectionClosed
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage

from relay.agents.frames import AgentServer, ClientFrames, Decoded, ForWsproto
from relay.agents.sessions import AgentSession, _text_frame
from tests.agents.test_sessions import AgentEnd, open_pair

LIMIT = 100_000


def client_frame(event: Any) -> bytes:
    """``event`` as a fresh wsproto client (masked, like an agent) puts it on the wire."""
    return Connection(ConnectionType.CLIENT).send(event)


def masked(first_byte: int, payload: bytes, *, length_bytes: int = 0) -> bytes:
    """A hand-built masked frame; ``length_bytes`` 2 or 8 forces an extended length field."""
    mask = os.urandom(4)
    size = len(payload)
    if length_bytes == 2 or (not length_bytes and 126 <= size < 65536):
        header = bytes((first_byte, 0x80 | 126)) + struct.pack("!H", size)
    elif length_bytes == 8 or (not length_bytes and size >= 65536):
        header = bytes((first_byte, 0x80 | 127)) + struct.pack("!Q", size)
    else:
        header = bytes((first_byte, 0x80 | size))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def feed_in_chunks(frames: ClientFrames, stream: bytes, sizes: random.Random) -> list[Decoded]:
    out: list[Decoded] = []
    pos = 0
    while pos < len(stream):
        step = sizes.choice((1, 2, 3, 7, 64, 4096, 70_000))
        out.extend(frames.feed(stream[pos:pos + step]))
        pos += step
    return out


MESSAGES: list[Message[Any]] = [
    TextMessage(data=""),
    TextMessage(data='{"type":"agent.result"}'),
    TextMessage(data="状态 ok " * 20),
    TextMessage(data="x" * 125),
    TextMessage(data="y" * 126),
    TextMessage(data="z" * 65_535),
    TextMessage(data="w" * 65_536),
    BytesMessage(data=b"\x00\xffbinary"),
    BytesMessage(data=bytes(range(256)) * 300),
]


def test_whole_masked_frames_of_every_length_class_decode_as_wsproto_does_in_any_chunking() -> None:
    stream = b"".join(client_frame(m) for m in MESSAGES)
    expected = [m.data for m in MESSAGES]
    for seed in range(5):
        frames = ClientFrames(LIMIT)
        assert feed_in_chunks(frames, stream, random.Random(seed)) == expected
        assert frames.feed(client_frame(TextMessage(data="next"))) == ["next"]


def test_a_frame_fed_a_byte_at_a_time_comes_out_once_whole() -> None:
    frame = client_frame(TextMessage(data="hello agent"))
    frames = ClientFrames(LIMIT)

    results = [frames.feed(frame[i:i + 1]) for i in range(len(frame))]

    assert results[:-1] == [[]] * (len(frame) - 1)
    assert results[-1] == ["hello agent"]


def test_control_frames_pass_to_wsproto_whole_and_in_order_between_messages() -> None:
    ping = client_frame(Ping(payload=b"are you there"))
    pong = client_frame(Pong(payload=b"yes"))
    close = client_frame(CloseConnection(code=1000, reason="bye"))
    before, after = client_frame(TextMessage(data="a")), client_frame(TextMessage(data="b"))
    frames = ClientFrames(LIMIT)

    decoded = feed_in_chunks(frames, before + ping + pong + after + close, random.Random(1))

    assert decoded == ["a", ForWsproto(ping), ForWsproto(pong), "b", ForWsproto(close)]


ODD_FRAMES = {
    "fragmented": client_frame(TextMessage(data="first half", message_finished=False)),
    "continuation": masked(0x80, b"orphan"),
    "unmasked": _text_frame(b'{"type":"agent.heartbeat"}'),
    "reserved bit": masked(0x80 | 0x40 | 0x1, b"compressed?"),
    "unknown opcode": masked(0x80 | 0x3, b"?"),
    "control over 125 bytes": masked(0x80 | 0x9, b"p" * 126),
    "fragmented control": masked(0x9, b"p"),
    "over the size limit": masked(0x81, b"x" * (LIMIT + 1)),
    "invalid UTF-8": masked(0x81, b"\xff\xfe"),
    "16-bit length for 5 bytes": masked(0x81, b"short", length_bytes=2),
    "64-bit length for 200 bytes": masked(0x82, b"b" * 200, length_bytes=8),
}


@pytest.mark.parametrize("odd", ODD_FRAMES.values(), ids=list(ODD_FRAMES))
def test_the_first_frame_not_decoded_here_and_all_after_it_go_to_wsproto(odd: bytes) -> None:
    before, after = client_frame(TextMessage(data="before")), client_frame(TextMessage(data="after"))
    frames = ClientFrames(LIMIT)

    decoded = frames.feed(before + odd + after)

    assert decoded == ["before", ForWsproto(odd + after)]
    later = client_frame(TextMessage(data="later"))
    assert frames.feed(later) == [ForWsproto(later)]


def test_an_odd_frame_is_recognised_from_its_header_before_its_payload_arrives() -> None:
    odd = masked(0x81, b"x" * (LIMIT + 1))
    frames = ClientFrames(LIMIT)

    assert frames.feed(odd[:20]) == [ForWsproto(odd[:20])]
    assert frames.feed(odd[20:]) == [ForWsproto(odd[20:])]


def wsproto_outcome(frames: Optional[ClientFrames], chunks: list[bytes]) -> list[Any]:
    """Messages and close codes a server gets from ``chunks``: through ``frames`` and wsproto, or
    (``frames`` ``None``) through wsproto alone. Fragments are joined as simple-websocket joins them."""
    server = Connection(ConnectionType.SERVER)
    outcome: list[Any] = []
    partial: list[Any] = []

    def from_wsproto(data: bytes) -> bool:
        server.receive_data(data)
        for event in server.events():
            if isinstance(event, CloseConnection):
                outcome.append(("close", event.code))
                return False
            if isinstance(event, (TextMessage, BytesMessage)):
                partial.append(event.data)
                if event.message_finished:
                    outcome.append(type(partial[0])().join(partial))
                    partial.clear()
            elif isinstance(event, (Ping, Pong)):
                outcome.append((type(event).__name__, bytes(event.payload)))
        return True

    for chunk in chunks:
        items: list[Decoded] = [ForWsproto(chunk)] if frames is None else frames.feed(chunk)
        for item in items:
            if isinstance(item, ForWsproto):
                if not from_wsproto(item.data):
                    return outcome
            else:
                outcome.append(item)
    return outcome


def random_frame(rng: random.Random) -> bytes:
    """Mostly frames agents send, now and then one of the odd ones."""
    roll = rng.random()
    if roll < 0.55:
        text = "".join(rng.choice("ab状态 {}\"") for _ in range(rng.choice((0, 5, 130, 300))))
        return client_frame(TextMessage(data=text))
    if roll < 0.65:
        return client_frame(BytesMessage(data=rng.randbytes(rng.choice((0, 3, 200)))))
    if roll < 0.75:
        return client_frame(rng.choice((Ping, Pong))(payload=rng.randbytes(rng.randint(0, 20))))
    if roll < 0.8:
        agent = Connection(ConnectionType.CLIENT)
        return agent.send(TextMessage(data="part", message_finished=False)) + agent.send(TextMessage(data=" end"))
    return rng.choice([*ODD_FRAMES.values(), masked(0x81, b"\xc3"), masked(0x81, b"ok")])


def test_any_stream_gives_the_messages_and_close_codes_wsproto_alone_gives() -> None:
    limit = 1 << 20  # above every frame here: the size limit is simple-websocket's, not wsproto's
    for seed in range(300):
        rng = random.Random(seed)
        stream = b"".join(random_frame(rng) for _ in range(rng.randint(1, 12)))
        chunks, pos = [], 0
        while pos < len(stream):
            step = rng.choice((1, 5, 64, 700, 4096))
            chunks.append(stream[pos:pos + step])
            pos += step

        assert wsproto_outcome(ClientFrames(limit), chunks) == wsproto_outcome(None, chunks), seed


# -- AgentServer: the relay's end of a socketpair, a wsproto client at the other ------------------
@pytest.fixture
def pair() -> Iterator[tuple[AgentSession, AgentEnd]]:
    session, agent, _ = open_pair(max_message_bytes=LIMIT)
    yield session, agent
    session.close()
    session.release(0.0)
    agent.sock.close()


def received(session: AgentSession, count: int) -> list[Optional[Union[str, bytes]]]:
    return [session.receive(timeout=2.0) for _ in range(count)]


def test_decoded_messages_reach_the_session_in_order(pair: tuple[AgentSession, AgentEnd]) -> None:
    session, agent = pair
    for message in MESSAGES:
        agent.send(message)

    assert received(session, len(MESSAGES)) == [m.data for m in MESSAGES]


def test_a_ping_from_the_agent_is_answered_with_its_payload(pair: tuple[AgentSession, AgentEnd]) -> None:
    session, agent = pair
    agent.send(Ping(payload=b"are you there"))

    pongs = [e for e in agent.events(until=Pong) if isinstance(e, Pong)]

    assert [p.payload for p in pongs] == [b"are you there"]
    agent.send(TextMessage(data="still decoded here"))
    assert received(session, 1) == ["still decoded here"]


def test_a_fragmented_message_arrives_whole_through_wsproto_and_so_do_later_ones(
    pair: tuple[AgentSession, AgentEnd]
) -> None:
    session, agent = pair
    agent.send(TextMessage(data="one "))
    agent.send(TextMessage(data="two ", message_finished=False))
    agent.send(TextMessage(data="three"))
    agent.send(TextMessage(data="four"))

    assert received(session, 3) == ["one ", "two three", "four"]


@pytest.mark.parametrize(("frame", "code"), [
    (masked(0x81, b"\xff\xfe"), 1007),
    (_text_frame(b"unmasked"), 1002),
    (masked(0x81, b"x" * (LIMIT + 1)), 1009),
], ids=["invalid UTF-8", "unmasked", "too big"])
def test_a_bad_frame_gets_the_close_code_wsproto_and_simple_websocket_give(
    pair: tuple[AgentSession, AgentEnd], frame: bytes, code: int
) -> None:
    session, agent = pair
    agent.send(TextMessage(data="fine"))
    agent.sock.sendall(frame)

    closes = [e for e in agent.events(until=CloseConnection) if isinstance(e, CloseConnection)]

    assert [c.code for c in closes] == [code]
    assert session.receive(timeout=2.0) == "fine"
    with pytest.raises(ConnectionClosed):
        session.receive(timeout=2.0)


def test_the_agents_close_is_answered_and_ends_the_session(pair: tuple[AgentSession, AgentEnd]) -> None:
    session, agent = pair
    agent.send(CloseConnection(code=1000, reason="bye"))

    closes = [e for e in agent.events(until=CloseConnection) if isinstance(e, CloseConnection)]

    assert [c.code for c in closes] == [1000]
    with pytest.raises(ConnectionClosed):
        session.receive(timeout=2.0)
    assert session.closed


def test_a_handler_woken_before_the_reader_ends_is_woken_again(
    pair: tuple[AgentSession, AgentEnd], monkeypatch: pytest.MonkeyPatch
) -> None:
    session, agent = pair
    handle_events = AgentServer._handle_events

    def slow_to_return(server: AgentServer) -> bool:
        keep_going = handle_events(server)
        if not keep_going:  # closed with 1009 and set the event: the handler wakes, finds the
            time.sleep(0.3)  # connection still up and waits again
        return keep_going

    monkeypatch.setattr(AgentServer, "_handle_events", slow_to_return)
    agent.sock.sendall(masked(0x81, b"x" * (LIMIT + 1)))

    with pytest.raises(ConnectionClosed):
        session.receive(timeout=5.0)
