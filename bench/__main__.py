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

from bench import audit, callbacks, instructions, store

Section = Callable[[], dict[str, Any]]

SECTIONS: list[tuple[str, Section]] = [
    ("store", store.run),
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
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
