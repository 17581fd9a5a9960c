"""The reply locale last inferred for a user ("zh-CN" or "en"), kept for a bounded time."""
from __future__ import annotations

from typing import Optional

import marshmallow
from marshmallow import fields, validate

from middleware.routing import StoreProvider
from relay.stores.domain import Domain
from relay.stores.envelope import EnvelopeSchema

LOCALES = ("zh-CN", "en")


class LocaleSchema(marshmallow.Schema):
    locale = fields.String(required=True, validate=validate.OneOf(LOCALES))


DOMAIN = Domain("locale", EnvelopeSchema(1, LocaleSchema()))


class UserLocales:
    def __init__(self, store: StoreProvider, ttl_ms: int) -> None:
        self._store = store
        self.ttl_ms = ttl_ms

    def get(self, user_id: str) -> Optional[str]:
        data = self._store().get(user_id)
        return None if data is None else data["locale"]

    def prefetch(self, user_id: str) -> None:
        """``get`` will be asked for this user: read it with the unit of work's next round trip."""
        self._store().prefetch(user_id)

    def remember(self, user_ids: list[str], locale: str) -> None:
        """Store the users' reply locale, with the unit of work's next round trip."""
        users = sorted({u for u in user_ids if u})
        if users:
            self._store().mset({u: {"locale": locale} for u in users}, self.ttl_ms, defer=True)
