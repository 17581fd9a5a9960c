"""Instructions per callback: the relay's worker under callgrind, a figure that does not move.

CPU seconds per callback (``bench/callbacks.py``) move by 15 % and more between runs on a shared
2-core VM, more than most single changes save. callgrind counts the instructions the worker
executes instead, which repeat within 1 to 2 percent, so a change can be measured alone.

Per mode (``memory``, ``redis`` and ``outage`` as in ``bench/callbacks.py``): the relay runs under
``valgrind --tool=callgrind`` with ``bench/callgrind_app.py`` (the relay plus a dump trigger),
20 answering agents attach, a first dump turns the instrumentation on, ``WARMUP`` callbacks warm
it, then a dump marks the start, ``CALLBACKS`` callbacks run two at a time (each answered and
audited before the relay counts as idle), and a third dump marks the end. The third dump holds the
instructions of the load and its results, divided by the callbacks answered. The relay starts with
instrumentation off when ``bench/callgrind_start.c`` can be built (gcc and valgrind's headers),
which saves most of a minute per mode; otherwise it is on from the start. Skipped when valgrind is
not installed.

The worker also works while no callback arrives (agents' heartbeats, its timers and watchers: some
1.2 M instructions per second in memory mode, 3 to 4 M in Redis mode and outage). Natively that is
a few thousand instructions per callback under load; under callgrind, where the load takes some
fifty times longer, it was 2 to 9 % of the count, more on a slower machine, whose run lasts longer.
So a fourth dump, ``IDLE_S`` later with nothing sent, measures that rate, and
``instructions_per_callback`` is the load's count less the idle rate over the load's duration
(``less_idle``); ``measured_per_callback`` keeps the count as it was.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from bench import callbacks
from tests.support.live_relay import live_relay
from tests.support.redisproc import RedisServer

MODES = ("memory", "redis", "outage")
WARMUP = 60
CALLBACKS = 300
CONCURRENCY = 2
DUMP_WAIT_S = 60.0
#: Seconds of idle worker measured after the load.
IDLE_S = 5.0
#: Under callgrind the worker runs some fifty times slower than natively, and a result's round
#: trips overlap the next callback's: a Redis reply can then take longer to be read than the 250 ms
#: socket timeout meant for real time, and the callback fails (half of 300 in one run). Redis mode
#: gets timeouts that fit; they bound how long a wait may last, not what the relay executes. Outage
#: mode keeps the defaults: its breaker must open on timeouts.
SLOW_RUN_TIMEOUTS = {"REDIS_SOCKET_TIMEOUT_MS": "30000", "REDIS_CONNECT_TIMEOUT_MS": "30000",
                     "REDIS_WAIT_TIMEOUT_MS": "10000", "REDIS_OP_DEADLINE_MS": "60000"}


def less_idle(load_instructions: int, callbacks: int, load_s: float, idle_instructions: int,
              idle_s: float) -> Optional[int]:
    """Instructions per callback of a load, less what the worker ran at its idle rate meanwhile."""
    if callbacks <= 0 or idle_s <= 0:
        return None
    return round((load_instructions - idle_instructions / idle_s * load_s) / callbacks)


def _totals(dump: Path) -> Optional[int]:
    for line in dump.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    return None


def _dump(trigger: Path, number: int, dumps: Path, pid: int) -> Path:
    """Ask the worker for dump ``number`` and wait until callgrind has written it."""
    trigger.write_text(str(number))
    target = dumps / f"callgrind.{pid}.{number}"
    deadline = time.monotonic() + DUMP_WAIT_S
    while time.monotonic() < deadline:
        if target.exists() and _totals(target) is not None:
            return target
        time.sleep(0.2)
    raise RuntimeError(f"callgrind wrote no dump {number} for worker {pid}")


def _build_start_lib(workdir: Path) -> Optional[Path]:
    """``callgrind_start.c`` as a shared library in ``workdir``; ``None`` without gcc or the header."""
    library = workdir / "libcallgrind_start.so"
    source = Path(__file__).with_name("callgrind_start.c")
    if shutil.which("gcc") is None:
        return None
    built = subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(library), str(source)],
                           capture_output=True, timeout=60)
    return library if built.returncode == 0 else None


def _run_mode(mode: str, server: RedisServer, workdir: Path, start_lib: Optional[Path] = None) -> dict[str, Any]:
    dumps = workdir / mode
    dumps.mkdir()
    trigger = dumps / "trigger"
    trigger.write_text("0")
    env = {**callbacks._env(mode, server, str(workdir)), "BENCH_CALLGRIND_TRIGGER": str(trigger),
           "PYTHONHASHSEED": "0", **(SLOW_RUN_TIMEOUTS if mode == "redis" else {})}
    launcher = ("valgrind", "--tool=callgrind", "-q", "--dump-before=getsid",
                f"--callgrind-out-file={dumps}/callgrind.%p")
    if start_lib is not None:
        env["BENCH_CALLGRIND_START_LIB"] = str(start_lib)
        launcher += ("--instr-atstart=no",)
    if mode != "memory":
        callbacks.emptied(server)
    with live_relay("bench.callgrind_app:app", env=env, startup_timeout_s=300, launcher=launcher) as relay, \
            callbacks._agents(relay, callbacks.MACHINES):
        (worker,) = relay.worker_pids()
        _dump(trigger, 1, dumps, worker)
        callbacks._load(relay, f"{mode}-warm", WARMUP, CONCURRENCY, 300.0)
        if mode == "outage":
            callbacks._open_breaker(relay, server, timeout_s=120.0)
        callbacks._quiesce(relay, 120.0)
        _dump(trigger, 2, dumps, worker)
        load_started = time.monotonic()
        load = callbacks._load(relay, mode, CALLBACKS, CONCURRENCY, 600.0)
        callbacks._quiesce(relay, 120.0)
        instructions = _totals(_dump(trigger, 3, dumps, worker)) or 0
        idle_started = time.monotonic()
        time.sleep(IDLE_S)
        idle = _totals(_dump(trigger, 4, dumps, worker)) or 0
        idle_s = time.monotonic() - idle_started
        server.resume()
    load_s = idle_started - load_started
    return {"callbacks": load.ok, "errors": load.errors, "load_s": round(load_s, 1),
            "idle_per_s": round(idle / idle_s),
            "measured_per_callback": round(instructions / load.ok) if load.ok else None,
            "instructions_per_callback": less_idle(instructions, load.ok, load_s, idle, idle_s)}


def run() -> dict[str, Any]:
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: skipped (Debian: apt-get install valgrind)")
        return {"skipped": "valgrind is not installed"}
    modes: dict[str, dict[str, Any]] = {}
    with RedisServer() as server, tempfile.TemporaryDirectory(prefix="bench-instructions-") as workdir:
        start_lib = _build_start_lib(Path(workdir))
        try:
            for mode in MODES:
                modes[mode] = _run_mode(mode, server, Path(workdir), start_lib)
        finally:
            server.resume()
    print(f"relay worker under callgrind, {CALLBACKS} callbacks {CONCURRENCY} at a time after {WARMUP} to warm up, "
          f"results and audits included")
    print(f"{'mode':<8}{'callbacks':>10}{'err':>5}{'load s':>8}{'measured per cb':>17}{'idle per s':>12}"
          f"{'per callback, less idle':>26}")
    for name, m in modes.items():
        print(f"{name:<8}{m['callbacks']:>10}{m['errors']:>5}{m['load_s']:>8.1f}"
              f"{(m['measured_per_callback'] or 0) / 1e6:>15.3f} M{m['idle_per_s'] / 1e6:>10.2f} M"
              f"{(m['instructions_per_callback'] or 0) / 1e6:>24.3f} M")
    return {"workload": {"callbacks": CALLBACKS, "concurrency": CONCURRENCY, "warmup": WARMUP, "idle_s": IDLE_S,
                         "machines": callbacks.MACHINES, "text": callbacks.TEXT}, "modes": modes}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
