"""Reading agent frames: the common ones decoded here, every other case left to wsproto.

simple-websocket hands every byte it receives to wsproto, which takes some 25 µs to decode one small
masked text frame, and every callback brings at least one agent frame. Agents send nearly nothing
but whole (FIN set), masked text or binary frames without reserved bits, within the size limit.
``ClientFrames`` decodes those itself and passes each whole control frame (close, ping, pong) to
wsproto as it came, so wsproto still answers pings and keeps the state of the close handshake. At
the first frame it would not decode (fragmented, unmasked, reserved bits set, unknown opcode, over
the size limit, a text frame that is not UTF-8, a length in more bytes than it needs), it passes
that frame and every byte after it to wsproto, for the rest of the connection: each odd case keeps
wsproto's answer. wsproto has seen only whole control frames until then, so it meets that frame at
a frame boundary, as it would have.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Union

from simple_websocket import Server
from wsproto.utilities import LocalProtocolError

_TEXT, _BINARY = 0x1, 0x2
_CONTROL = frozenset((0x8, 0x9, 0xA))
#: First byte of a whole frame, no reserved bits: FIN plus the opcode.
_WHOLE = 0x80
_MASKED = 0x80
_MAX_CONTROL_PAYLOAD = 125
#: Length marker 126 or 127: the bytes of the extended length that follows, and the least length
#: it may carry (a shorter one fits in fewer bytes, RFC 6455, 5.2).
_EXTENDED_LENGTH = {126: (2, 126), 127: (8, 65536)}


class ForWsproto(NamedTuple):
    """Bytes to give wsproto as they came: one whole control frame, or everything from the first
    frame ``ClientFrames`` does not decode on."""

    data: bytes


Decoded = Union[str, bytes, ForWsproto]


def _unmask(mask: bytes, payload: bytes) -> bytes:
    """XOR ``payload`` with the repeated 4-byte ``mask`` (RFC 6455, 5.3), as one big-integer XOR."""
    size = len(payload)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")


class ClientFrames:
    """Splits the bytes an agent sends into messages (``str`` for text, ``bytes`` for binary) and
    ``ForWsproto`` pieces, in the order they came. Not thread-safe: one reader feeds it."""

    def __init__(self, max_message_bytes: int) -> None:
        self._max = max_message_bytes
        self._partial = bytearray()
        #: A frame was passed on undecoded: from then on every byte goes to wsproto.
        self._handed_over = False

    def feed(self, data: bytes) -> list[Decoded]:
        """What ``data`` completes, after the bytes kept from earlier calls."""
        if self._handed_over:
            return [ForWsproto(bytes(data))]
        if self._partial:
            self._partial += data
            buffer: Union[bytes, bytearray] = self._partial
        else:
            buffer = data
        out: list[Decoded] = []
        pos, size = 0, len(buffer)
        while size - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            opcode = first & 0x0F
            length = second & 0x7F
            is_control = opcode in _CONTROL
            if first & 0xF0 != _WHOLE or not second & _MASKED or not (is_control or opcode in (_TEXT, _BINARY)):
                return self._hand_over(out, buffer, pos)
            start = pos + 6
            minimal = True
            if length >= 126:
                width, least = _EXTENDED_LENGTH[length]
                start += width
                if size < start:
                    break
                length = int.from_bytes(buffer[pos + 2:pos + 2 + width], "big")
                minimal = length >= least
            if not minimal or length > (_MAX_CONTROL_PAYLOAD if is_control else self._max):
                return self._hand_over(out, buffer, pos)
            end = start + length
            if end > size:
                break
            if is_control:
                out.append(ForWsproto(bytes(buffer[pos:end])))
            else:
                payload = _unmask(bytes(buffer[start - 4:start]), bytes(buffer[start:end]))
                if opcode == _TEXT:
                    try:
                        out.append(payload.decode("utf-8"))
                    except UnicodeDecodeError:
                        return self._hand_over(out, buffer, pos)
                else:
                    out.append(payload)
            pos = end
        self._keep(buffer, pos)
        return out

    def _keep(self, buffer: Union[bytes, bytearray], pos: int) -> None:
        """Keep the bytes from ``pos`` on (an unfinished frame) for the next ``feed``."""
        if buffer is self._partial:
            if pos:
                del self._partial[:pos]
        elif pos < len(buffer):  # ``_partial`` is empty when ``feed`` starts from ``data`` alone
            self._partial = bytearray(buffer[pos:])

    def _hand_over(self, out: list[Decoded], buffer: Union[bytes, bytearray], pos: int) -> list[Decoded]:
        self._handed_over = True
        out.append(ForWsproto(bytes(buffer[pos:])))
        self._partial = bytearray()
        return out


class AgentServer(Server):
    """simple-websocket's ``Server`` whose reader decodes frames with ``ClientFrames``.

    The reader loop is simple-websocket's own without its pings (the channel sends those), and it
    wakes the handler once more when it ends. Decoded messages go to the same ``input_buffer`` and
    ``event`` as before; whatever goes to wsproto is handled by simple-websocket's
    ``_handle_events``, unchanged.
    """

    def __init__(self, environ: dict[str, Any], *, max_message_size: int) -> None:
        # Set before the base class starts the reader.
        self._frames = ClientFrames(max_message_size)
        super().__init__(environ, max_message_size=max_message_size)

    def _thread(self) -> None:
        try:
            while self.connected:
                data = self.sock.recv(self.receive_bytes)
                if not data:
                    raise OSError("the agent closed the connection")
                self.connected = self._receive(data)
        except (OSError, LocalProtocolError):
            self.connected = False
        # Set again now that ``connected`` is false: simple-websocket sets the event for a close
        # before the reader marks the connection over, and a handler woken in between waits again.
        self.event.set()
        self.sock.close()

    def _receive(self, data: bytes) -> bool:
        """Hand what ``data`` completes on; ``False`` once the connection is over."""
        for item in self._frames.feed(data):
            if isinstance(item, ForWsproto):
                self.ws.receive_data(item.data)
                if not self._handle_events():
                    return False
            else:
                self.input_buffer.append(item)
                self.event.set()
        return True
