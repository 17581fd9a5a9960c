"""Agent frames in-process, one at a time: the relay's own framing against wsproto's.

Two jobs every callback does: decoding the agent's result frame (a masked client text frame, read
by ``ClientFrames``) and building a frame to the agent (``_text_frame``). Each is timed beside
wsproto doing the same job on the same bytes, and both must give the same result, so the figure
compares like with like. Per call: the best of ``REPEATS`` runs of ``CALLS`` calls.
"""
from __future__ import annotations

import json
import timeit
from collections.abc import Callable
from typing import Any

from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import TextMessage

from relay.agents.frames import ClientFrames
from relay.agents.sessions import _text_frame

CALLS = 5_000
REPEATS = 5
#: A result as the agents of ``bench/callbacks.py`` send it (``bench/answering_agents.py``).
RESULT = {"type": "agent.result", "result": {
    "commandId": "0b6c2f7e-9a51-4d3c-8e2a-5f1d7c9b3a40", "machineId": "bench-m7", "status": "ok",
    "summary": "Patch generated successfully", "createdAt": "2026-11-26T12:00:00.000Z"}}


def _per_call_us(job: Callable[[], Any]) -> float:
    return min(timeit.repeat(job, number=CALLS, repeat=REPEATS)) / CALLS * 1e6


def _decoders(frame: bytes) -> dict[str, Callable[[], Any]]:
    server = Connection(ConnectionType.SERVER)

    def wsproto_decode() -> Any:
        server.receive_data(frame)
        return [event.data for event in server.events()]

    frames = ClientFrames(1 << 20)
    return {"wsproto": wsproto_decode, "relay": lambda: frames.feed(frame)}


def _encoders(payload: str) -> dict[str, Callable[[], Any]]:
    server = Connection(ConnectionType.SERVER)
    data = payload.encode()
    return {"wsproto": lambda: server.send(TextMessage(data=payload)), "relay": lambda: _text_frame(data)}


def run() -> dict[str, Any]:
    payload = json.dumps(RESULT, separators=(",", ":"))
    frame = Connection(ConnectionType.CLIENT).send(TextMessage(data=payload))
    jobs = {"decode client frame": _decoders(frame), "build server frame": _encoders(payload)}
    results: dict[str, Any] = {}
    print(f"one {len(frame)}-byte frame per call, best of {REPEATS} x {CALLS} calls")
    print(f"{'job':<22}{'wsproto µs':>12}{'relay µs':>10}{'relay/wsproto':>15}")
    for name, pair in jobs.items():
        if pair["wsproto"]() != pair["relay"]():
            raise AssertionError(f"{name}: the relay's framing and wsproto's disagree")
        ours, theirs = _per_call_us(pair["relay"]), _per_call_us(pair["wsproto"])
        results[name] = {"wsproto_us": round(theirs, 2), "relay_us": round(ours, 2), "ratio": round(ours / theirs, 3)}
        print(f"{name:<22}{theirs:>12.2f}{ours:>10.2f}{ours / theirs:>14.2f}x")
    return {"frame_bytes": len(frame), "calls": CALLS, "repeats": REPEATS, "jobs": results}


if __name__ == "__main__":
    run()
