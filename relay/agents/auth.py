"""Optional agent authentication for ``/agent``.

Configured with ``AGENT_AUTH_TOKEN`` (one token every agent may use) and/or ``AGENT_TOKENS``
(``machine:token`` pairs, comma separated; the token is what follows the last ``:``, so machine ids
may contain ``:``). A machine listed in ``AGENT_TOKENS`` must present its own token; any other
machine the shared token, when there is one; with neither configured there is no check at all (the
reference's behaviour, with a warning at startup).

The token travels in the hello frame's ``token`` field or in the upgrade request's
``Authorization: Bearer <token>`` header (the frame's wins when both are present). It is never read
from the query string: the channel accepts the target ``/agent`` exactly (anything else is a 404, as
the reference refuses it), and a token in a URL ends up in proxy access logs. Tokens are compared in constant time and never logged.
"""
from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

#: WebSocket close code for a hello without a valid token (4000-4999 are the application's).
CLOSE_UNAUTHORIZED = 4401


def bearer_token(authorization: Optional[str]) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header, else ``None``."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _same(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


@dataclass(frozen=True)
class AgentAuth:
    """Which token a hello for a machine must carry (see the module docstring)."""

    shared_token: Optional[str] = None
    machine_tokens: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Any) -> "AgentAuth":
        return cls(settings.agent_auth_token, dict(settings.agent_tokens))

    @property
    def enabled(self) -> bool:
        return self.shared_token is not None or bool(self.machine_tokens)

    @property
    def mode(self) -> str:
        """For ``/ops/config``: ``off``, ``shared``, ``per-machine`` or ``per-machine+shared``."""
        if not self.enabled:
            return "off"
        if not self.machine_tokens:
            return "shared"
        return "per-machine+shared" if self.shared_token else "per-machine"

    def allows(self, machine_id: str, frame: Mapping[str, Any], authorization: Optional[str]) -> bool:
        """Whether a hello for ``machine_id`` may be accepted (always, when auth is off)."""
        if not self.enabled:
            return True
        token = frame.get("token")
        presented = token if isinstance(token, str) and token else bearer_token(authorization)
        if presented is None:
            return False
        expected = self.machine_tokens.get(machine_id, self.shared_token)
        return expected is not None and _same(presented, expected)
