"""End-to-end benchmark: smtp-source -> system under test -> smtp-sink, for mtacluster and for Postfix.

    python -m benchmarks.e2e [--messages 2000] [--size 4] [--sessions 20] [--only ours|signed|postfix ...]
                             [--probe-sessions 2] [--profile DIR [--profile-format flamegraph|raw|speedscope]]

For each system ("ours" = `mtacluster up`, "postfix" = a private Postfix instance), on fresh loopback ports:
start a fresh smtp-sink, start the system with the sink as its relay, wait until it answers SMTP and one
warm-up message has reached the sink, then run smtp-source (N messages of S KiB over C sessions) and, side by
side, the latency probe (benchmarks/smtp_probe.py). Figures:

- accepted/s: messages accepted (smtp-source's N plus the probe's) / smtp-source wall time;
- delivered/s: the same messages / time from the start until the sink had every one of them;
- accept latency p50/p90/p99: the probe's end of DATA -> 250 times, measured while the load runs.

Output: a table on stdout (with ours/Postfix ratios), then one JSON line with every figure. Progress and errors
go to stderr. Everything started is stopped and the work directory removed on every exit path (Ctrl-C and
SIGTERM included). Exit code 0 when every requested system was measured, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.cluster_instance import ClusterError, ClusterInstance, ClusterSettings, cpu_by_role, tree_cpu_seconds
from benchmarks.cluster_metrics import scrape, shard_summary, sum_by_name
from benchmarks.ports import HOST, free_ports, free_ports_and_block
from benchmarks.postfix_instance import PostfixError, PostfixInstance, PostfixSettings
from benchmarks.profiler import Profiler, find_py_spy, top_frames
from benchmarks.sink import SinkError, SmtpSink
from benchmarks.smtp_probe import ProbeResult, ProbeSettings, SmtpProbeError, run_probe, send_one
from benchmarks.stats import LatencySummary, median, rate, ratio, summarize_latencies

# "signed" is ours with DKIM signing (rsa-sha256, 2048 bits) of every message: the cost of signing.
SYSTEMS = ("ours", "signed", "postfix")
SENDER = "bench@bench.example"
RECIPIENT = "sink@bench.example"
HELO = "bench.example"
READY_TIMEOUT = 30.0
SOURCE_TIMEOUT = 60.0
DELIVERY_TIMEOUT = 60.0
DEFAULT_TIME_LIMIT = 170.0


class BenchError(RuntimeError):
    """One system could not be measured; the message says why."""


@dataclass(frozen=True)
class BenchArgs:
    messages: int
    size_kib: int
    sessions: int
    systems: tuple[str, ...]
    rounds: int
    probe_sessions: int
    probe_interval: float
    frontends: int
    workers: int
    reuse_connections: bool
    time_limit: float
    profile_dir: Path | None
    profile_format: str
    keep_workdir: bool
    signed_algorithm: str = "rsa-sha256"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=_positive, default=2000, help="messages smtp-source sends (N)")
    parser.add_argument("--size", type=_positive, default=4, help="message payload in KiB (S)")
    parser.add_argument("--sessions", type=_positive, default=20, help="concurrent smtp-source sessions (C)")
    parser.add_argument("--only", choices=SYSTEMS, nargs="+", help="measure only these systems")
    parser.add_argument("--rounds", type=_positive, default=3,
                        help="rounds (each runs every system once); figures are medians over the rounds")
    parser.add_argument("--probe-sessions", type=_positive, default=2,
                        help="concurrent sessions of the latency probe (each sends one message after another)")
    parser.add_argument("--probe-interval", type=float, default=0.025,
                        help="seconds between the starts of two probe messages on one session (0 = no pause)")
    parser.add_argument("--frontends", type=_positive, default=2, help="mtacluster frontends (up.frontends)")
    parser.add_argument("--workers", type=_positive, default=2, help="mtacluster workers (up.workers)")
    parser.add_argument("--reuse-connections", action="store_true",
                        help="smtp-source sends every message of a session on one connection (-d)")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT,
                        help="seconds the whole run may take; waits are cut to fit")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record a py-spy profile of every mtacluster process into DIR")
    parser.add_argument("--profile-format", choices=("flamegraph", "raw", "speedscope"), default="flamegraph",
                        help="py-spy output format; raw also prints the top frames of each process")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs, spools and logs")
    parser.add_argument("--signed-algorithm", choices=("rsa-sha256", "ed25519-sha256"), default="rsa-sha256",
                        help="DKIM algorithm of the signed scenario (RSA keys have 2048 bits)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> BenchArgs:
    ns = build_parser().parse_args(argv)
    if ns.time_limit <= 0:
        build_parser().error("--time-limit must be positive")
    if ns.probe_interval < 0:
        build_parser().error("--probe-interval must not be negative")
    return BenchArgs(
        messages=ns.messages, size_kib=ns.size, sessions=ns.sessions,
        systems=tuple(dict.fromkeys(ns.only)) if ns.only else SYSTEMS, rounds=ns.rounds,
        probe_sessions=ns.probe_sessions,
        probe_interval=ns.probe_interval,
        frontends=ns.frontends, workers=ns.workers, reuse_connections=ns.reuse_connections,
        time_limit=ns.time_limit, profile_dir=ns.profile, profile_format=ns.profile_format,
        keep_workdir=ns.keep_workdir, signed_algorithm=ns.signed_algorithm,
    )


def find_tool(name: str) -> str:
    """A Postfix tool, also when /usr/sbin is not on PATH."""
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)),
                                      None)
    if path is None:
        raise BenchError(f"{name} is not installed (it comes with Postfix: apt-get install postfix)")
    return path


def smtp_source_command(binary: str, args: BenchArgs, port: int) -> list[str]:
    command = [binary, "-s", str(args.sessions), "-m", str(args.messages), "-l", str(args.size_kib * 1024),
               "-f", SENDER, "-t", RECIPIENT, "-M", HELO]
    if args.reuse_connections:
        command.append("-d")
    return [*command, f"{HOST}:{port}"]


@dataclass
class SideResult:
    system: str
    source_messages: int = 0
    probe_messages: int = 0
    accept_seconds: float | None = None
    deliver_seconds: float | None = None
    accepted_per_s: float | None = None
    source_accepted_per_s: float | None = None
    delivered_per_s: float | None = None
    latency: LatencySummary | None = None
    probe_refused: int = 0
    probe_errors: int = 0
    # Messages the sink received beyond those sent (duplicate deliveries), counted when the system stops.
    sink_extra: int = 0
    sink_expected: int = 0
    # ours only: figures from the queue shard's own /metrics, scraped after the run.
    shard_metrics: dict[str, float] = field(default_factory=dict)
    # CPU milliseconds per accepted message: per role for ours, all processes together for Postfix.
    cpu_ms_per_message: dict[str, float] = field(default_factory=dict)
    error: str = ""
    notes: list[str] = field(default_factory=list)


class Deadline:
    """The run's overall time budget; each wait takes min(its own timeout, what is left)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def within(self, timeout: float) -> float:
        return min(time.monotonic() + timeout, self.end)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def wait_smtp_ready(port: int, deadline: float, still_running: Callable[[], None] | None = None) -> None:
    """Until a connection to the SMTP port gets a 220 greeting (RFC 5321 4.3.1), or TimeoutError."""
    last = ""
    while time.monotonic() < deadline:
        if still_running is not None:
            still_running()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 1.0)
        except (OSError, TimeoutError) as exc:
            last = str(exc)
        else:
            try:
                greeting = await asyncio.wait_for(reader.readline(), 5.0)
            except (OSError, TimeoutError) as exc:
                greeting, last = b"", str(exc)
            writer.close()
            if greeting.startswith(b"220"):
                return
            last = last or greeting.decode(errors="replace").strip()
        await asyncio.sleep(0.05)  # polling interval while the server starts, not a synchronisation
    raise TimeoutError(f"no SMTP greeting on {HOST}:{port} by the deadline ({last})")


async def warm_up(probe: ProbeSettings, sink: SmtpSink, deadline: float,
                  still_running: Callable[[], None] | None = None) -> None:
    """One message through the whole path: proves the queue and the workers are up, not only the listener."""
    last = ""
    target = sink.received + 1
    while time.monotonic() < deadline:
        if still_running is not None:
            still_running()
        try:
            code, text = await send_one(probe)
        except SmtpProbeError as exc:
            code, text = 0, str(exc)
        if code == 250:
            await sink.wait_for(target, deadline)
            return
        last = text
        await asyncio.sleep(0.2)  # the system answered 4xx while starting: try again shortly
    raise TimeoutError(f"the warm-up message was not accepted by the deadline (last reply: {last})")


async def measure(system: str, args: BenchArgs, smtp_port: int, sink: SmtpSink, deadline: Deadline,
                  on_started: Callable[[], None] | None = None) -> SideResult:
    """Run the load and the probe against a ready system; wait for the sink to have every message."""
    result = SideResult(system)
    probe_settings = ProbeSettings(HOST, smtp_port, args.size_kib * 1024, sender=SENDER, recipient=RECIPIENT)
    baseline = sink.received
    stop_probe = asyncio.Event()
    started = time.monotonic()
    source = await asyncio.create_subprocess_exec(
        *smtp_source_command(find_tool("smtp-source"), args, smtp_port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    probe_task = asyncio.create_task(run_probe(probe_settings, args.probe_sessions, stop_probe, args.probe_interval))
    if on_started is not None:
        on_started()
    try:
        _, stderr = await asyncio.wait_for(source.communicate(), deadline.within(SOURCE_TIMEOUT) - started)
    except TimeoutError:
        raise BenchError(f"smtp-source did not finish {args.messages} messages in time") from None
    finally:
        stop_probe.set()
        if source.returncode is None:
            source.kill()
            await source.wait()
            await asyncio.gather(probe_task, return_exceptions=True)
    accept_end = time.monotonic()
    probe: ProbeResult = await probe_task
    if source.returncode != 0:
        raise BenchError(f"smtp-source failed ({source.returncode}): {stderr.decode(errors='replace').strip()}")
    result.source_messages = args.messages
    result.probe_messages = probe.accepted
    result.probe_refused = probe.refused
    result.probe_errors = probe.connection_errors
    if probe.first_error:
        result.notes.append(f"probe: {probe.refused} refused, {probe.connection_errors} connection errors, "
                            f"first: {probe.first_error}")
    total = args.messages + probe.accepted
    result.accept_seconds = accept_end - started
    result.accepted_per_s = rate(total, result.accept_seconds)
    result.source_accepted_per_s = rate(args.messages, result.accept_seconds)
    result.latency = summarize_latencies(probe.latencies)
    log(f"{system}: {total} accepted in {result.accept_seconds:.2f}s; waiting for the sink")
    delivered_at = await sink.wait_for(baseline + total, deadline.within(DELIVERY_TIMEOUT))
    result.deliver_seconds = delivered_at - started
    result.delivered_per_s = rate(total, result.deliver_seconds)
    result.sink_expected = baseline + total
    return result


def note_duplicates(result: SideResult, sink: SmtpSink) -> None:
    """After the system and the sink stopped: anything the sink got beyond what was sent was delivered twice."""
    result.sink_extra = sink.received - result.sink_expected
    if result.sink_extra:
        result.notes.append(f"the sink received {result.sink_extra} messages more than were sent (duplicates)")


async def run_postfix(args: BenchArgs, workdir: Path, deadline: Deadline) -> SideResult:
    smtp_port, sink_port = free_ports(2)
    sink = SmtpSink(HOST, sink_port, find_tool("smtp-sink"))
    instance = PostfixInstance(PostfixSettings(workdir / "postfix", smtp_port, sink_port), find_tool("postfix"))
    try:
        await sink.start()
        await wait_smtp_ready(sink_port, deadline.within(READY_TIMEOUT))
        instance.start()
        await wait_smtp_ready(smtp_port, deadline.within(READY_TIMEOUT))
        probe = ProbeSettings(HOST, smtp_port, 1024, sender=SENDER, recipient=RECIPIENT)
        await warm_up(probe, sink, deadline.within(READY_TIMEOUT))
        log(f"postfix: ready on {HOST}:{smtp_port}, relaying to the sink on {HOST}:{sink_port}")
        master = instance.master_pid()
        cpu_before = [0.0]

        def on_started() -> None:
            cpu_before[0] = tree_cpu_seconds(master) if master else 0.0

        result = await measure("postfix", args, smtp_port, sink, deadline, on_started)
        if master:
            used = tree_cpu_seconds(master) - cpu_before[0]
            result.cpu_ms_per_message = {"postfix": 1000.0 * used / (result.source_messages + result.probe_messages)}
            result.notes.append(f"CPU ms per message: all Postfix processes={result.cpu_ms_per_message['postfix']:.2f}")
    except PostfixError as exc:
        raise BenchError(str(exc)) from exc
    except (SinkError, TimeoutError, SmtpProbeError) as exc:
        raise BenchError(f"{exc}\n{instance.log_tail(10)}") from exc
    finally:
        instance.stop()
        await sink.stop()
    note_duplicates(result, sink)
    return result


async def run_signed(args: BenchArgs, workdir: Path, deadline: Deadline) -> SideResult:
    """Ours with every message DKIM-signed at acceptance (a fresh key for the sender's domain: 2048-bit RSA, or
    Ed25519 with --signed-algorithm ed25519-sha256)."""
    from cluster.dkim.keys import generate, write_private_key

    (workdir / "signed").mkdir(parents=True, exist_ok=True)
    key_file = workdir / "signed" / "dkim.pem"
    write_private_key(str(key_file), generate(args.signed_algorithm, 2048))
    return await run_ours(args, workdir, deadline, "signed", key_file, args.signed_algorithm)


async def run_ours(args: BenchArgs, workdir: Path, deadline: Deadline, system: str = "ours",
                   dkim_key_file: Path | None = None, dkim_algorithm: str = "rsa-sha256") -> SideResult:
    processes = 1 + args.frontends + args.workers  # each gets a metrics port: base + its index
    (smtp_port, sink_port, shard_port), metrics_base = free_ports_and_block(3, processes)
    settings = ClusterSettings(workdir / system, smtp_port, shard_port, metrics_base, sink_port, args.frontends,
                               args.workers, dkim_domain=SENDER.rpartition("@")[2], dkim_key_file=dkim_key_file,
                               dkim_algorithm=dkim_algorithm)
    sink = SmtpSink(HOST, sink_port, find_tool("smtp-sink"))
    instance = ClusterInstance(settings)
    profiler = _make_profiler(args)
    try:
        await sink.start()
        await wait_smtp_ready(sink_port, deadline.within(READY_TIMEOUT))
        instance.start()
        await wait_smtp_ready(smtp_port, deadline.within(READY_TIMEOUT), instance.check_running)
        probe = ProbeSettings(HOST, smtp_port, 1024, sender=SENDER, recipient=RECIPIENT)
        await warm_up(probe, sink, deadline.within(READY_TIMEOUT), instance.check_running)
        log(f"{system}: ready on {HOST}:{smtp_port} ({settings.frontends} frontends, {settings.workers} workers, "
            f"1 shard), relaying to the sink on {HOST}:{sink_port}")

        pids = instance.role_pids()
        cpu_before: dict[str, float] = {}

        def on_started() -> None:
            cpu_before.update(cpu_by_role(pids))
            if profiler is not None:
                profiler.start(pids)

        result = await measure(system, args, smtp_port, sink, deadline, on_started)
        cpu_after = cpu_by_role(pids)
        messages = result.source_messages + result.probe_messages
        result.cpu_ms_per_message = {role: 1000.0 * (cpu_after[role] - cpu_before.get(role, 0.0)) / messages
                                     for role in sorted(cpu_after)}
        result.notes.append("CPU ms per message: " + ", ".join(f"{role}={ms:.2f}"
                                                                for role, ms in result.cpu_ms_per_message.items()))
        # The supervisor gives the shard (its first child) the first metrics port.
        shard_text = await asyncio.to_thread(scrape, HOST, settings.metrics_port)
        result.shard_metrics = shard_summary(sum_by_name(shard_text))
        if result.shard_metrics:
            result.notes.append("shard: " + ", ".join(f"{k}={v:.4g}" for k, v in result.shard_metrics.items()))
        if dkim_key_file is not None:
            signed = settings.log_file.read_text(errors="replace").count(" dkim=signed")
            result.notes.append(f"messages DKIM-signed at acceptance: {signed}")
        if profiler is not None:
            result.notes.extend(profiler.stop())
            result.notes.extend(_profile_notes(profiler, args.profile_format))
    except (ClusterError, SinkError, TimeoutError, SmtpProbeError) as exc:
        raise BenchError(f"{exc}\n{instance.log_tail(15)}") from exc
    finally:
        if profiler is not None:
            profiler.stop()
        instance.stop()
        await sink.stop()
    note_duplicates(result, sink)
    return result


def _make_profiler(args: BenchArgs) -> Profiler | None:
    if args.profile_dir is None:
        return None
    binary = find_py_spy()
    if binary is None:
        log("--profile: py-spy is not installed (.venv/bin/pip install py-spy); running without profiling")
        return None
    return Profiler(binary, args.profile_dir, args.profile_format)


def _profile_notes(profiler: Profiler, output_format: str) -> list[str]:
    notes = [f"profiles: {', '.join(str(p) for p in profiler.written())}"]
    if output_format != "raw":
        return notes
    for path in profiler.written():
        total, shares = top_frames(path.read_text(errors="replace"), limit=8)
        notes.append(f"{path.name}: {total} samples; top self time:")
        notes.extend(f"  {s.self_percent:5.1f}% self {s.inclusive_percent:5.1f}% incl  {s.frame}" for s in shares)
    return notes


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


FIGURES = {"accepted_per_s": "accepted/s", "delivered_per_s": "delivered/s", "p50_ms": "accept p50 ms",
           "p90_ms": "accept p90 ms", "p99_ms": "accept p99 ms", "cpu_ms_per_message": "CPU ms/message"}


def round_figures(result: SideResult) -> dict[str, float | None]:
    latency = result.latency
    return {
        "accepted_per_s": result.accepted_per_s,
        "delivered_per_s": result.delivered_per_s,
        "p50_ms": latency.p50_ms if latency else None,
        "p90_ms": latency.p90_ms if latency else None,
        "p99_ms": latency.p99_ms if latency else None,
        "cpu_ms_per_message": sum(result.cpu_ms_per_message.values()) if result.cpu_ms_per_message else None,
    }


def figures(rounds: Sequence[SideResult]) -> dict[str, float | None]:
    """Each figure's median over the rounds that measured it (None when none did)."""
    per_round = [round_figures(result) for result in rounds if not result.error]
    return {key: median([v for f in per_round if (v := f[key]) is not None]) for key in FIGURES}


def render_table(results: Mapping[str, Sequence[SideResult]]) -> str:
    ours, signed, postfix = (figures(results.get(name, ())) for name in SYSTEMS)
    rows = [("figure", "ours", "signed", "postfix", "ours/postfix", "signed/ours")]
    for key, label in FIGURES.items():
        rows.append((label, _fmt(ours[key]), _fmt(signed[key]), _fmt(postfix[key]),
                     _fmt(ratio(ours[key], postfix[key]), 2), _fmt(ratio(signed[key], ours[key]), 2)))
    measured = {name: sum(1 for r in results.get(name, ()) if not r.error) for name in SYSTEMS}
    rows.append(("rounds measured", *(str(measured[name]) for name in SYSTEMS), "", ""))
    extra = {name: sum(r.sink_extra for r in results.get(name, ())) for name in SYSTEMS}
    rows.append(("duplicates at sink", *(str(extra[name]) for name in SYSTEMS), "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def json_line(args: BenchArgs, results: Mapping[str, Sequence[SideResult]]) -> str:
    ours, signed, postfix = (figures(results.get(name, ())) for name in SYSTEMS)
    payload: dict[str, object] = {
        "benchmark": "e2e", "messages": args.messages, "size_kib": args.size_kib, "sessions": args.sessions,
        "rounds": args.rounds, "probe_sessions": args.probe_sessions, "probe_interval": args.probe_interval,
        "reuse_connections": args.reuse_connections,
        "ours": ours, "signed": signed, "postfix": postfix,
        "ratio": {key: ratio(ours[key], postfix[key]) for key in ours},
        "signed_vs_ours": {key: ratio(signed[key], ours[key]) for key in ours},
        "details": {name: [asdict(result) for result in rounds] for name, rounds in results.items()},
    }
    return json.dumps(payload, sort_keys=True, default=str)


async def run(args: BenchArgs, workdir: Path) -> dict[str, list[SideResult]]:
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main_task is not None:
        # SIGTERM gets the same clean shutdown as Ctrl-C: cancel, and let every `finally` stop what it started.
        loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    deadline = Deadline(args.time_limit)
    results: dict[str, list[SideResult]] = {system: [] for system in args.systems}
    runners = {"postfix": run_postfix, "ours": run_ours, "signed": run_signed}
    # Rounds alternate the systems, so a burst of load from elsewhere on the machine hits both alike.
    for number in range(1, args.rounds + 1):
        for system in sorted(args.systems, key=lambda name: name != "postfix"):
            if time.monotonic() >= deadline.end:
                log(f"{system}: round {number} skipped: --time-limit reached")
                continue
            log(f"{system}: round {number}/{args.rounds}: {args.messages} messages of {args.size_kib} KiB over "
                f"{args.sessions} sessions")
            try:
                result = await runners[system](args, workdir / f"round-{number}", deadline)
            except (BenchError, OSError) as exc:
                log(f"{system}: not measured: {exc}")
                result = SideResult(system, error=str(exc).splitlines()[0] if str(exc) else repr(exc))
            for note in result.notes:
                log(f"{system}: {note}")
            results[system].append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mtabench-"))
    workdir.chmod(0o755)  # Postfix's daemons (user postfix) must reach their queue and data directories
    try:
        results = asyncio.run(run(args, workdir))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted; everything started was stopped")
        return 130
    finally:
        if args.keep_workdir:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render_table(results))
    print(json_line(args, results))
    return 0 if all(rounds and not any(r.error for r in rounds) for rounds in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
