"""``python -m bench [SECTION ...]``: run benchmark sections and report.

Each section is a function that prints its own human-readable table and
returns a JSON-able dict; at the end one JSON document holds every section's
dict. Add a section by appending to ``SECTIONS``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

from bench import audit, callbacks, frames, instructions, store

Section = Callable[[], dict[str, Any]]

SECTIONS: list[tuple[str, Section]] = [
    ("store", store.run),
    ("frames", frames.run),
    ("callbacks", callbacks.run),
    ("instructions", instructions.run),
    ("audit", audit.run),
]


def main(argv: Optional[Sequence[str]] = None) -> int:
    names = [name for name, _ in SECTIONS]
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=f"one of {names} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections) - set(names))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {names}")
    chosen = args.sections or names
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sections": {},
    }
    for name, run in SECTIONS:
        if name not in chosen:
            continue
        print(f"== {name} ==", flush=True)
        started = time.monotonic()
        result = run()
        result["seconds"] = round(time.monotonic() - started, 1)
        report["sections"][name] = result
        print(flush=True)
    speed = machine_speed(report["sections"])
    if speed is not None:
        report["machine_speed"] = speed
        print("== machine speed ==")
        print("instructions the worker executes per callback / relay CPU per callback, in billions per CPU-second "
              "(the same code runs at different rates on different machines; compare CPU figures across machines "
              "with it):")
        print("  ".join(f"{mode} {rate:.2f}" for mode, rate in speed.items()))
        print(flush=True)
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


def machine_speed(sections: dict[str, Any]) -> Optional[dict[str, float]]:
    """Billions of instructions per relay CPU-second, per mode, when both the ``callbacks`` and the
    ``instructions`` sections ran: what turns instruction counts (which do not depend on the machine)
    into CPU time (which does). An estimate: the instructions are the worker's at concurrency 2,
    less its idle work (``bench.instructions.less_idle``), the CPU time is every relay process's at
    concurrency 32."""
    counted = (sections.get("instructions") or {}).get("modes") or {}
    timed = (sections.get("callbacks") or {}).get("modes") or {}
    speed = {}
    for mode, timing in timed.items():
        instructions = (counted.get(mode) or {}).get("instructions_per_callback")
        cpu_ms = timing.get("relay_cpu_per_callback_ms")
        if instructions and cpu_ms:
            speed[mode] = round(instructions / (cpu_ms / 1000) / 1e9, 2)
    return speed or None


if __name__ == "__main__":
    sys.exit(main())
