"""The route modules read the request and the relay object through ``relay.routes.app_context``,
not attribute by attribute through Flask's proxies (each such read builds and drops an
``AttributeError`` before the proxy's own lookup)."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from werkzeug.local import LocalProxy

from relay.routes.app_context import current_relay, current_request, query_dict
from tests.routes.test_errors_and_body import CALLBACK, make_app

ROOT = Path(__file__).resolve().parents[2]
OWN_CODE = (str(ROOT / "relay"), str(ROOT / "middleware"))


@pytest.fixture
def proxied_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Attribute reads through a Flask proxy, by the file and line of the code that made them."""
    reads: Counter[str] = Counter()
    lookup = LocalProxy.__getattr__

    def counting(proxy: Any, name: str) -> Any:
        caller = sys._getframe(1).f_code
        reads[f"{caller.co_filename}:{caller.co_name}.{name}"] += 1
        return lookup.__get__(proxy, type(proxy))(name)

    monkeypatch.setattr(LocalProxy, "__getattr__", counting)
    return reads


def test_a_callback_reads_nothing_through_flasks_proxies_from_the_relays_own_code(
        proxied_reads: Counter[str]) -> None:
    body = {"msgId": "m-1", "userId": "u-1", "machineId": "box", "text": "@dev status"}
    response = make_app().test_client().post(f"{CALLBACK}?timestamp=1&nonce=n", data=json.dumps(body),
                                             content_type="application/json")
    assert response.status_code == 200
    assert sum(proxied_reads.values()) > 0, "the counter saw none of Flask's own reads"
    assert [read for read in proxied_reads if read.startswith(OWN_CODE)] == []


def test_the_helpers_give_the_objects_behind_the_proxies() -> None:
    app = make_app()
    with app.test_request_context("/x?b=2&a=1&a=3", headers={"X-Test": "yes"}):
        assert type(current_request()).__name__ == "Request"
        assert current_request().headers["X-Test"] == "yes"
        assert query_dict("a", "b", "c") == {"a": "1,3", "b": "2"}
        assert current_relay() is app.extensions["relay"]
