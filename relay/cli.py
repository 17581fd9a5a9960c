"""``python -m relay.cli``: the store migration's operator tool, talking to a running relay's admin API.

    python -m relay.cli status                       phase and flags per domain, breaker, latencies, rates
    python -m relay.cli flags show                   the flag overrides in force and where they come from
    python -m relay.cli flags set NAME=VALUE ...     change flags at runtime (PUT /ops/store/flags)
    python -m relay.cli flags unset NAME ...         drop runtime overrides (back to the environment)
    python -m relay.cli gates                        the current phase's exit gates: GO or NO-GO
    python -m relay.cli reconcile DOMAIN [--repair]  compare memory and Redis for a domain
    python -m relay.cli inventory                    key counts and memory use per domain

Options before the command: ``--url`` (default ``$RELAY_URL`` or http://127.0.0.1:8787), ``--token``
(default ``$RELAY_ADMIN_TOKEN``), ``--json`` (one JSON document on stdout), ``--timeout`` seconds
per request, ``--progress/--no-progress`` (progress of long operations on stderr; default: when
stderr is a terminal). ``gates`` reads its targets from ``--config``, ``$RELAY_GATES_FILE`` or
``config/gates.json``.

Exit status: 0 success (gates: GO; reconcile: no difference left), 1 a negative answer (gates:
NO-GO; reconcile: differences remain; flags: change refused), 2 an error (usage, connection,
authentication, server error).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from config.phases import DOMAINS, FLAGS, PHASES, flag_names

EXIT_OK, EXIT_NEGATIVE, EXIT_ERROR = 0, 1, 2
DEFAULT_URL = "http://127.0.0.1:8787"
DEFAULT_GATES = Path(__file__).resolve().parents[1] / "config" / "gates.json"
ADMIN_HEADER = "x-admin-token"
#: The phase a domain is promoted to once its gates pass.
NEXT_PHASE = dict(zip(PHASES, PHASES[1:]))


class CliError(Exception):
    """A failure that ends the command with exit status 2."""


class HttpError(CliError):
    """The relay answered with an error status."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        detail = body.get("error") if isinstance(body, dict) else body
        super().__init__(f"{method} {path}: HTTP {status} {detail or ''}".rstrip())
        self.status = status
        self.body = body


# -- talking to the relay ------------------------------------------------------------------------
class AdminClient:
    """The relay's admin API over HTTP (standard library only)."""

    def __init__(self, url: str, token: Optional[str], timeout_s: float) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def _open(self, method: str, path: str, body: Optional[Any] = None) -> Any:
        headers = {"accept": "application/json"}
        if self.token:
            headers[ADMIN_HEADER] = self.token
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["content-type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")
            try:
                payload: Any = json.loads(text)
            except ValueError:
                payload = text.strip()[:200]
            raise HttpError(method, path, exc.code, payload) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"cannot reach the relay at {self.url}: {reason}") from None

    def get(self, path: str) -> Any:
        with self._open("GET", path) as reply:
            return json.load(reply)

    def put(self, path: str, body: Any) -> Any:
        with self._open("PUT", path, body) as reply:
            return json.load(reply)

    def stream(self, path: str) -> Iterator[dict[str, Any]]:
        """The JSON lines of an NDJSON reply, as they arrive."""
        with self._open("GET", path) as reply:
            for line in reply:
                if line.strip():
                    yield json.loads(line)


class Progress:
    """Progress of a long operation on stderr: one rewritten line on a terminal, else a line per step."""

    def __init__(self, enabled: Optional[bool], stream: TextIO = sys.stderr) -> None:
        self.tty = stream.isatty()
        self.enabled = self.tty if enabled is None else enabled
        self._stream = stream
        self._shown = False

    def update(self, step: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        done, total = step.get("done", 0), step.get("total", 0)
        percent = f" {100 * done // total}%" if total else ""
        text = f"{step.get('stage', 'working')}: {done}/{total}{percent}"
        if self.tty:
            self._stream.write("\r\x1b[K" + text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown and self.tty:
            self._stream.write("\n")
            self._stream.flush()


def run_streamed(client: AdminClient, path: str, progress: Progress) -> dict[str, Any]:
    """Follow an NDJSON operation (``progress=1``) to its result, reporting progress on the way."""
    try:
        for step in client.stream(path):
            if "progress" in step:
                progress.update(step["progress"])
            elif "result" in step:
                result: dict[str, Any] = step["result"]
                return result
            elif "error" in step:
                raise CliError(f"GET {path}: {step['error']} ({step.get('detail', '')})")
    finally:
        progress.close()
    raise CliError(f"GET {path}: the reply ended before its result")


# -- formatting ------------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table, columns left-aligned and padded."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def fmt_rate(value: Optional[float]) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def fmt_ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def fmt_bytes(value: Optional[int]) -> str:
    if value is None:
        return "-"
    if value < 1024:
        return f"{value} B"
    size = value / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


# -- status ------------------------------------------------------------------------------------------
def collect_status(client: AdminClient) -> dict[str, Any]:
    """``/ops/store`` and ``/metrics`` merged per domain."""
    store = client.get("/ops/store")
    summaries = (client.get("/metrics").get("store") or {}).get("domains") or {}
    domains = {}
    for domain, entry in store["domains"].items():
        domains[domain] = {**entry, "metrics": summaries.get(domain, {})}
    breakers = {entry.get("breaker") for entry in store["domains"].values()} - {None}
    breaker = "open" if "open" in breakers else "half-open" if "half-open" in breakers else next(iter(breakers), None)
    return {"url": client.url, "pid": store.get("pid"), "breaker": breaker, "flags": store.get("flags", {}),
            "domains": domains}


def render_status(status: Mapping[str, Any]) -> str:
    flags = status["flags"]
    source = flags.get("source", "?")
    if flags.get("version"):
        source += f" v{flags['version']}"
    lines = [f"relay {status['url']}  worker {status['pid']}  breaker {status['breaker'] or 'n/a'}  "
             f"flags from {source}" + (f" ({flags['updatedAt']})" if flags.get("updatedAt") else "")]
    rows = []
    window = None
    for domain, entry in status["domains"].items():
        f, m = entry["flags"], entry["metrics"]
        window = m.get("windowSeconds", window)
        rows.append([
            domain, f.get("phase") or "custom", f["backend"], f["readPreference"], "on" if f["dualWrite"] else "off",
            "on" if f["fallbackToMemory"] else "off", "on" if f["shadowCompare"] else "off",
            m.get("operations", 0), fmt_ms(m.get("p50Ms")), fmt_ms(m.get("p95Ms")), fmt_ms(m.get("p99Ms")),
            fmt_rate(m.get("errorRate")), fmt_rate(m.get("timeoutRate")), fmt_rate(m.get("fallbackRate")),
            f"{fmt_rate(m.get('mismatchRate'))} ({m.get('comparisons', 0)})",
        ])
    lines.append(table(["domain", "phase", "backend", "reads", "dual", "fallback", "shadow", "ops", "p50ms",
                        "p95ms", "p99ms", "errors", "timeouts", "fallbacks", "mismatch (n)"], rows))
    if window:
        lines.append(f"(latencies and rates over the last {window} s of worker {status['pid']})")
    return "\n".join(lines)


def cmd_status(client: AdminClient, args: argparse.Namespace) -> tuple[int, Any, str]:
    status = collect_status(client)
    return EXIT_OK, status, render_status(status)


# -- flags ---------------------------------------------------------------------------------------------
def flag_variable(name: str, domain: Optional[str]) -> str:
    """A full flag variable from ``STORE_...`` or a short name (``PHASE``, ``read_preference``...)."""
    upper = name.strip().upper().replace("-", "_")
    if upper in flag_names():
        if domain and not upper.startswith(f"STORE_{domain.upper()}_"):
            raise CliError(f"{name}: a full variable name cannot be combined with --domain {domain}")
        return upper
    if upper in (*FLAGS, "PHASE"):
        return f"STORE_{domain.upper()}_{upper}" if domain else f"STORE_{upper}"
    raise CliError(f"{name}: not a store flag (one of PHASE, {', '.join(FLAGS)}, or a STORE_* variable)")


def parse_assignments(items: Sequence[str], domain: Optional[str]) -> dict[str, str]:
    changes = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"{item}: expected NAME=VALUE")
        changes[flag_variable(name, domain)] = value.strip()
    return changes


def _assignments(flags: Optional[Mapping[str, Any]]) -> str:
    """``NAME=value`` pairs, sorted, or ``none``."""
    return " ".join(f"{k}={v}" for k, v in sorted((flags or {}).items())) or "none"


def _flag_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    return ", ".join(f"{name} {old.get(name)} -> {value}" for name, value in new.items() if old.get(name) != value)


def render_flag_change(result: Mapping[str, Any]) -> str:
    changed = result.get("changed") or {}
    lines = [f"{len(changed)} domain(s) changed" if changed else "no domain changed (the flags were already in force)"]
    for domain, change in changed.items():
        lines.append(f"  {domain}: {_flag_diff(change['old'], change['new'])}")
    lines.append("overrides in force: " + _assignments(result.get("overrides")))
    channels = ", ".join(f"{name} {state}" for name, state in sorted((result.get("channels") or {}).items()))
    lines.append(f"persisted: {'yes' if result.get('persisted') else 'no'} ({channels})")
    if result.get("failed"):
        lines.append("WARNING: not written to " + ", ".join(result["failed"]) +
                     ": other workers and instances may not apply this change")
    elif not result.get("persisted"):
        lines.append("WARNING: no shared channel is configured: only the worker that answered applied this change")
    return "\n".join(lines)


def cmd_flags_set(client: AdminClient, args: argparse.Namespace) -> tuple[int, Any, str]:
    changes: dict[str, Optional[str]] = dict(parse_assignments(args.assignments, args.domain))
    return _put_flags(client, changes)


def cmd_flags_unset(client: AdminClient, args: argparse.Namespace) -> tuple[int, Any, str]:
    return _put_flags(client, {flag_variable(name, args.domain): None for name in args.names})


def _put_flags(client: AdminClient, changes: Mapping[str, Optional[str]]) -> tuple[int, Any, str]:
    try:
        result = client.put("/ops/store/flags", dict(changes))
    except HttpError as exc:
        if exc.status != 400 or not isinstance(exc.body, dict):
            raise
        details = exc.body.get("details") or {}
        text = "flag change refused, nothing changed:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(details.items()))
        return EXIT_NEGATIVE, exc.body, text
    return EXIT_OK, result, render_flag_change(result)


def cmd_flags_show(client: AdminClient, args: argparse.Namespace) -> tuple[int, Any, str]:
    store = client.get("/ops/store")
    flags = store.get("flags", {})
    phases = {domain: entry["flags"] for domain, entry in store["domains"].items()}
    lines = [f"source: {flags.get('source')}" + (f" v{flags['version']}" if flags.get("version") else "") +
             (f" ({flags['updatedAt']})" if flags.get("updatedAt") else ""),
             "overrides: " + _assignments(flags.get("overrides")),
             "environment: " + _assignments(flags.get("environment"))]
    for name, channel in sorted((flags.get("channels") or {}).items()):
        state = channel.get("state") if channel.get("configured") else "not configured"
        lines.append(f"channel {name}: {state}" + (f" ({channel['error']})" if channel.get("error") else ""))
    rows = [[d, f.get("phase") or "custom", f["backend"], f["readPreference"], f["dualWrite"], f["fallbackToMemory"],
             f["shadowCompare"], f["shadowSampleRate"]] for d, f in phases.items()]
    lines.append(table(["domain", "phase", "backend", "reads", "dualWrite", "fallback", "shadow", "sampleRate"], rows))
    return EXIT_OK, {"flags": flags, "domains": phases}, "\n".join(lines)


# -- gates ---------------------------------------------------------------------------------------------
TARGETS = ("backend", "breakerClosed", "minOperations", "maxErrorRate", "maxTimeoutRate", "maxP95Ms", "maxP99Ms",
           "maxFallbackRate", "minComparisons", "maxMismatchRate", "minPhaseAgeSeconds")


def load_gates(path: Path) -> dict[str, Any]:
    """The gates file, checked: only known sections, phases, domains and targets (``_`` keys are comments)."""
    try:
        config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CliError(f"gates file {path}: {exc}") from None
    if not isinstance(config, dict):
        raise CliError(f"gates file {path}: expected a JSON object")
    problems = [f"{key}: unknown section" for key in config
                if key not in ("defaults", "phases", "domains") and not key.startswith("_")]
    sections = [("defaults", config.get("defaults", {}))]
    for kind, known in (("phases", PHASES), ("domains", DOMAINS)):
        layer = config.get(kind, {})
        if not isinstance(layer, dict):
            problems.append(f"{kind}: expected an object")
            continue
        problems += [f"{kind}.{name}: unknown {kind[:-1]}" for name in layer if name not in known]
        sections += [(f"{kind}.{name}", targets) for name, targets in layer.items()]
    for where, targets in sections:
        if not isinstance(targets, dict):
            problems.append(f"{where}: expected an object")
            continue
        problems += [f"{where}.{name}: unknown target" for name in targets
                     if name not in TARGETS and not name.startswith("_")]
    if problems:
        raise CliError(f"gates file {path}:\n  " + "\n  ".join(problems))
    return config


def targets_for(config: Mapping[str, Any], phase: str, domain: str) -> dict[str, Any]:
    """The targets of ``domain`` in ``phase``; unset ones are ``None`` (not checked), except ``backend``,
    which defaults to the backend the phase migrates to."""
    targets: dict[str, Any] = dict.fromkeys(TARGETS)
    targets["backend"] = "memory" if phase == "memory" else "redis"
    for layer in (config.get("defaults", {}), config.get("phases", {}).get(phase, {}),
                  config.get("domains", {}).get(domain, {})):
        targets.update({k: v for k, v in layer.items() if not k.startswith("_")})
    return targets


def _age_s(updated_at: Optional[str], now_s: float) -> Optional[float]:
    if not updated_at:
        return None
    return now_s - datetime.fromisoformat(updated_at.replace("Z", "+00:00")).timestamp()


def evaluate_domain(domain: str, entry: Mapping[str, Any], summary: Mapping[str, Any], breaker: Optional[str],
                    config: Mapping[str, Any], flags_updated_at: Optional[str], now_s: float) -> dict[str, Any]:
    """The exit gates of the phase ``domain`` is in, against its live figures.

    A rate or latency that is ``None`` (no calls or comparisons in the window) passes its own check;
    ``minOperations`` and ``minComparisons`` are what refuse a window with too little traffic.
    """
    phase = entry["flags"].get("phase")
    checks: list[dict[str, Any]] = []

    def at_least(name: str, value: Any, target: Any) -> None:
        if target is not None and value is not None:
            checks.append({"name": name, "value": value, "target": f">= {target}", "ok": value >= target})

    def at_most(name: str, value: Any, target: Any) -> None:
        if target is not None:
            checks.append({"name": name, "value": value, "target": f"<= {target}",
                           "ok": value is None or value <= target})

    if phase is None:
        checks.append({"name": "phase", "value": "custom", "target": "a named phase", "ok": False})
        return {"phase": "custom", "go": False, "next": None, "checks": checks}
    targets = targets_for(config, phase, domain)
    backend = targets["backend"]
    figures = (summary.get("backends") or {}).get(backend) or {}
    if targets["breakerClosed"]:
        checks.append({"name": "breaker", "value": breaker, "target": "closed", "ok": breaker == "closed"})
    at_least(f"{backend} operations", figures.get("operations", 0), targets["minOperations"])
    for target, field in (("maxErrorRate", "errorRate"), ("maxTimeoutRate", "timeoutRate"),
                          ("maxP95Ms", "p95Ms"), ("maxP99Ms", "p99Ms")):
        at_most(f"{backend} {field}", figures.get(field), targets[target])
    at_most("fallbackRate", summary.get("fallbackRate"), targets["maxFallbackRate"])
    at_least("comparisons", summary.get("comparisons", 0), targets["minComparisons"])
    at_most("mismatchRate", summary.get("mismatchRate"), targets["maxMismatchRate"])
    age = _age_s(flags_updated_at, now_s)
    at_least("flags age s", None if age is None else round(age, 1), targets["minPhaseAgeSeconds"])
    return {"phase": phase, "go": all(c["ok"] for c in checks), "next": NEXT_PHASE.get(phase), "checks": checks}


def evaluate_gates(status: Mapping[str, Any], config: Mapping[str, Any], domains: Sequence[str],
                   now_s: float) -> dict[str, Any]:
    """Every selected domain's gates; GO only when all of them pass."""
    results = {}
    for domain in domains:
        entry = status["domains"][domain]
        results[domain] = evaluate_domain(domain, entry, entry.get("metrics", {}), status["breaker"], config,
                                          status["flags"].get("updatedAt"), now_s)
    return {"go": bool(results) and all(r["go"] for r in results.values()), "pid": status["pid"],
            "domains": results}


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def render_gates(result: Mapping[str, Any], config_path: Path) -> str:
    rows = []
    for domain, gate in result["domains"].items():
        for c in gate["checks"]:
            rows.append([domain, gate["phase"], c["name"], _fmt_value(c["value"]), c["target"],
                         "ok" if c["ok"] else "FAIL"])
    lines = [table(["domain", "phase", "check", "value", "target", "result"], rows), ""]
    passing = [d for d, g in result["domains"].items() if g["go"]]
    failing = [d for d, g in result["domains"].items() if not g["go"]]
    if passing:
        lines.append("passing: " + ", ".join(f"{d} (next: {result['domains'][d]['next'] or 'cleanup sign-off'})"
                                             for d in passing))
    if failing:
        lines.append("failing: " + ", ".join(failing))
    lines.append(f"{'GO' if result['go'] else 'NO-GO'}  (targets: {config_path}; figures of worker {result['pid']})")
    return "\n".join(lines)


def cmd_gates(client: AdminClient, args: argparse.Namespace) -> tuple[int, Any, str]:
    config = load_gates(Path(args.config))
    status = collect_status(client)
    unknown = sorted(set(args.domain or ()) - set(status["domains"]))
    if unknown:
        raise CliError(f"unknown domain(s): {', '.join(unknown)}")
    result = evaluate_gates(status, config, args.domain or list(status["domains"]), time.time())
    result["config"] = str(args.config)
    return (EXIT_OK if result["go"] else EXIT_NEGATIVE), result, render_gates(result, Path(args.config))


# -- reconcile and inventory ---------------------------------------------------------------------------
def render_reconcile(report: Mapping[str, Any]) -> str:
    lines = [
        f"reconcile {report['domain']} (phase {report['phase'] or 'custom'}, authoritative {report['authoritative']},"
        f" other {report['other']}, worker {report['pid']}, {report['elapsedS']} s)",
        f"  keys {report['keys']} ({report['authoritative']} {report['authoritativeKeys']}, {report['other']} "
        f"{report['otherKeys']})  compared {report['compared']}  skipped {report['skipped']}",
        f"  match {report['match']}  missing {report['missing']}  extra {report['extra']}  "
        f"different {report['different']}",
    ]
    if report["differences"]:
        rows = [[d["outcome"], d["kind"], d["key"], ", ".join(d["fields"]) or "-"] for d in report["differences"]]
        lines.append(table(["  outcome", "kind", "key (hash)", "fields"], [[f"  {r[0]}", *r[1:]] for r in rows]))
        if report["truncated"]:
            lines.append("  (list truncated: raise --limit to see more)")
    if report["repair"]:
        r = report["repaired"]
        lines.append(f"  repair from {report['authoritative']}: written {r['written']}, kept newer {r['keptNewer']}, "
                     f"skipped {r['skipped']}, errors {r['errors']}; still differing: {report['remaining']}")
    return "\n".join(lines)


def cmd_reconcile(client: AdminClient, args: argparse.Namespace) -> tuple[int, Any, str]:
    query = urllib.parse.urlencode({"repair": int(args.repair), "limit": args.limit, "progress": 1})
    path = f"/ops/store/reconcile/{urllib.parse.quote(args.domain, safe='')}?{query}"
    report = run_streamed(client, path, Progress(args.progress))
    left = report["remaining"] if args.repair else report["missing"] + report["extra"] + report["different"]
    return (EXIT_OK if left == 0 else EXIT_NEGATIVE), report, render_reconcile(report)


def render_inventory(result: Mapping[str, Any]) -> str:
    rows = []
    for domain, entry in result["domains"].items():
        for backend, f in entry["backends"].items():
            if "error" in f:
                rows.append([domain, entry["phase"] or "custom", entry["authoritative"], backend, "-", "-",
                             f"error: {f['error']}"])
            else:
                rows.append([domain, entry["phase"] or "custom", entry["authoritative"], backend, f["keys"],
                             f["records"], f"{fmt_bytes(f['bytes'])} ({f['method']}, {f['sampled']} sampled)"])
    lines = [table(["domain", "phase", "authoritative", "backend", "keys", "records", "memory"], rows)]
    for backend, total in sorted(result["totals"].items()):
        lines.append(f"total {backend}: {total['keys']} keys, {total['records']} records, {fmt_bytes(total['bytes'])}")
    return "\n".join(lines)


def cmd_inventory(client: AdminClient, args: argparse.Namespace) -> tuple[int, Any, str]:
    path = "/ops/store/inventory?" + urllib.parse.urlencode({"sample": args.sample, "progress": 1})
    result = run_streamed(client, path, Progress(args.progress))
    return EXIT_OK, result, render_inventory(result)


# -- the command line ----------------------------------------------------------------------------------
Command = Callable[[AdminClient, argparse.Namespace], tuple[int, Any, str]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m relay.cli", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("RELAY_URL") or DEFAULT_URL,
                        help="the relay's base URL (default: $RELAY_URL or %(default)s)")
    parser.add_argument("--token", default=os.environ.get("RELAY_ADMIN_TOKEN"),
                        help="admin token (default: $RELAY_ADMIN_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: %(default)s)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress of long operations on stderr (default: when stderr is a terminal)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("status", help="phase, flags, breaker, latencies and rates per domain").set_defaults(
        run=cmd_status)

    flags = commands.add_parser("flags", help="show or change the store flags at runtime")
    flag_commands = flags.add_subparsers(dest="flags_command", required=True, metavar="ACTION")
    flag_commands.add_parser("show", help="the overrides in force and each domain's flags").set_defaults(
        run=cmd_flags_show)
    set_ = flag_commands.add_parser("set", help="set flags: NAME=VALUE (STORE_* names, or short ones with --domain)")
    set_.add_argument("--domain", choices=DOMAINS, help="apply short names to this domain only")
    set_.add_argument("assignments", nargs="+", metavar="NAME=VALUE")
    set_.set_defaults(run=cmd_flags_set)
    unset = flag_commands.add_parser("unset", help="drop runtime overrides, back to the environment's value")
    unset.add_argument("--domain", choices=DOMAINS)
    unset.add_argument("names", nargs="+", metavar="NAME")
    unset.set_defaults(run=cmd_flags_unset)

    gates = commands.add_parser("gates", help="evaluate the exit gates of each domain's phase: GO or NO-GO")
    gates.add_argument("--config", default=os.environ.get("RELAY_GATES_FILE") or str(DEFAULT_GATES),
                       help="targets file (default: $RELAY_GATES_FILE or config/gates.json)")
    gates.add_argument("--domain", action="append", choices=DOMAINS, help="only this domain (repeatable)")
    gates.set_defaults(run=cmd_gates)

    reconcile = commands.add_parser("reconcile", help="compare memory and Redis for a domain")
    reconcile.add_argument("domain", choices=DOMAINS)
    reconcile.add_argument("--repair", action="store_true", help="copy missing and differing keys from the "
                                                                 "authoritative side")
    reconcile.add_argument("--limit", type=int, default=50, help="differing keys listed (default: %(default)s)")
    reconcile.set_defaults(run=cmd_reconcile)

    inventory = commands.add_parser("inventory", help="key counts and memory use per domain and backend")
    inventory.add_argument("--sample", type=int, default=200, help="keys sized per domain (default: %(default)s)")
    inventory.set_defaults(run=cmd_inventory)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    client = AdminClient(args.url, args.token, args.timeout)
    run: Command = args.run
    try:
        code, payload, text = run(client, args)
    except CliError as exc:
        if args.json:
            print(json.dumps({"error": str(exc)}))
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(payload, indent=2, sort_keys=True) if args.json else text)
    return code


if __name__ == "__main__":
    sys.exit(main())
