"""``python -m bench frames``: the relay's framing timed beside wsproto's on the same bytes."""
from __future__ import annotations

import pytest

from bench import frames


@pytest.fixture(autouse=True)
def few_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frames, "CALLS", 20)
    monkeypatch.setattr(frames, "REPEATS", 1)


def test_both_jobs_are_reported_for_both_framings() -> None:
    result = frames.run()

    assert set(result["jobs"]) == {"decode client frame", "build server frame"}
    for job in result["jobs"].values():
        assert job["relay_us"] > 0 and job["wsproto_us"] > 0
        # The times are reported to 0.01 µs and the ratio, from the unrounded times, to 0.001.
        relay, wsproto = job["relay_us"], job["wsproto_us"]
        low = (relay - 0.005) / (wsproto + 0.005) - 0.0005
        high = (relay + 0.005) / max(wsproto - 0.005, 1e-9) + 0.0005
        assert low <= job["ratio"] <= high


def test_framings_that_disagree_are_not_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frames, "_text_frame", lambda payload: b"\x81\x00")

    with pytest.raises(AssertionError, match="build server frame"):
        frames.run()
