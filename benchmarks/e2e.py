"""End-to-end benchmark: smtp-source -> system under test -> smtp-sink, for mtacluster and for Postfix.

    python -m benchmarks.e2e [--scenarios standard signed bulk large] [--only ours signed postfix]
                             [--messages 3000] [--size 4] [--sessions 20] [--rounds 3]
                             [--bulk-messages 200] [--bulk-recipients 100] [--bulk-rounds 2]
                             [--large-messages 200] [--large-size 1024] [--large-rounds 2]
                             [--compare-layout F/W] [--profile DIR [--profile-format flamegraph|raw|speedscope]]

Scenarios (benchmarks/scenarios.py): standard (N x S KiB over C sessions, with the latency probe), signed (the
standard load with DKIM signing), bulk (smtp-source -r R: R recipients per message) and large (1 MiB messages,
with each role's peak RSS). For each load, system and round (ours = `mtacluster up`, postfix = a private
Postfix instance), on fresh loopback ports: start a fresh smtp-sink, start the system with the sink as its
relay, wait until it answers SMTP and one warm-up message has reached the sink, then run smtp-source (and, on
the standard load, the latency probe, benchmarks/smtp_probe.py) beside it. Figures:

- accepted/s: messages accepted (smtp-source's N plus the probe's) / smtp-source wall time;
- delivered/s: the same messages / time from the start until the sink had every one of them (every recipient
  of every message, for bulk); delivered recipients/s: recipients / that same time;
- accept latency p50/p90/p99: the probe's end of DATA -> 250 times, measured while the load runs;
- CPU ms per message, per role for ours; peak RSS per role for ours (benchmarks/memory.py);
- load CPU ms per message: what smtp-source, smtp-sink and this harness (the probe) used of the same cores.

Output: one table per scenario on stdout (benchmarks/report.py), then one JSON line with every figure.
Progress and errors go to stderr. Everything started is stopped and the work directory removed on every exit
path (Ctrl-C and SIGTERM included). Exit code 0 when every requested run was measured, 1 otherwise, 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.cluster_instance import ClusterError, ClusterInstance, ClusterSettings, cpu_by_role, tree_cpu_seconds
from benchmarks.cluster_metrics import scrape, shard_summary, signing_summary, sum_by_name
from benchmarks.memory import RssSampler
from benchmarks.ports import HOST, free_ports, free_ports_and_block
from benchmarks.postfix_instance import PostfixError, PostfixInstance, PostfixSettings
from benchmarks.profiler import Profiler, find_py_spy, top_frames
from benchmarks.report import comparisons, json_line, render_table
from benchmarks.results import SideResult
from benchmarks.scenarios import SCENARIOS, SYSTEMS, Load, parse_layout, parse_layout_system, plan_loads, round_plan
from benchmarks.sink import SinkError, SmtpSink
from benchmarks.smtp_probe import ProbeResult, ProbeSettings, SmtpProbeError, run_probe, send_one
from benchmarks.stats import rate, summarize_latencies
from cluster.config import UpConfig, up_processes

SENDER = "bench@bench.example"
RECIPIENT = "sink@bench.example"
HELO = "bench.example"
READY_TIMEOUT = 30.0
SOURCE_TIMEOUT = 120.0
DELIVERY_TIMEOUT = 120.0
# Bounds the whole run (a default run takes 4-5 minutes on a quiet 2-core machine); later rounds are skipped.
DEFAULT_TIME_LIMIT = 420.0
RSS_LIMIT_MIB = 200.0  # issue 12: no role above 200 MiB while the large scenario runs


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
    scenarios: tuple[str, ...] = SCENARIOS
    bulk_messages: int = 200
    bulk_recipients: int = 100
    bulk_rounds: int = 2
    large_messages: int = 200
    large_size_kib: int = 1024
    large_rounds: int = 2
    compare_layouts: tuple[tuple[int, int], ...] = ()
    rss_limit_mib: float = RSS_LIMIT_MIB

    def loads(self) -> list[Load]:
        return plan_loads(
            self.scenarios, self.systems,
            standard=Load("standard", self.messages, self.size_kib, self.sessions, self.rounds, ()),
            bulk=Load("bulk", self.bulk_messages, self.size_kib, self.sessions, self.bulk_rounds, (),
                      recipients=self.bulk_recipients),
            large=Load("large", self.large_messages, self.large_size_kib, self.sessions, self.large_rounds, ()),
            compare_layouts=self.compare_layouts)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _layout(text: str) -> tuple[int, int]:
    try:
        return parse_layout(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", choices=SCENARIOS, nargs="+", help="run only these scenarios")
    parser.add_argument("--only", choices=SYSTEMS, nargs="+", help="measure only these systems")
    standard = parser.add_argument_group("standard (and signed) scenario")
    standard.add_argument("--messages", type=_positive, default=3000, help="messages smtp-source sends (N)")
    standard.add_argument("--size", type=_positive, default=4, help="message payload in KiB (S), also for bulk")
    standard.add_argument("--sessions", type=_positive, default=20,
                          help="concurrent smtp-source sessions (C), for every scenario")
    standard.add_argument("--rounds", type=_positive, default=3,
                          help="rounds (each runs every system once); figures are medians over the rounds")
    standard.add_argument("--probe-sessions", type=_positive, default=2,
                          help="concurrent sessions of the latency probe (each sends one message after another)")
    standard.add_argument("--probe-interval", type=float, default=0.025,
                          help="seconds between the starts of two probe messages on one session (0 = no pause)")
    bulk = parser.add_argument_group("bulk scenario")
    bulk.add_argument("--bulk-messages", type=_positive, default=200, help="messages smtp-source sends")
    bulk.add_argument("--bulk-recipients", type=_positive, default=100, help="recipients per message (-r)")
    bulk.add_argument("--bulk-rounds", type=_positive, default=2, help="rounds of the bulk scenario")
    large = parser.add_argument_group("large scenario")
    large.add_argument("--large-messages", type=_positive, default=200, help="messages smtp-source sends")
    large.add_argument("--large-size", type=_positive, default=1024, help="message payload in KiB")
    large.add_argument("--large-rounds", type=_positive, default=2, help="rounds of the large scenario")
    large.add_argument("--rss-limit", type=float, default=RSS_LIMIT_MIB,
                       help="flag roles whose peak RSS goes above this many MiB")
    ours = parser.add_argument_group("mtacluster")
    up_frontends, up_workers = up_processes(UpConfig())  # what `mtacluster up` starts on this machine
    ours.add_argument("--frontends", type=_positive, default=up_frontends,
                      help="mtacluster frontends (up.frontends; default: as `mtacluster up` here)")
    ours.add_argument("--workers", type=_positive, default=up_workers,
                      help="mtacluster workers (up.workers; default: as `mtacluster up` here)")
    ours.add_argument("--compare-layout", type=_layout, action="append", default=[], metavar="F/W",
                      help="also run ours with F frontends and W workers on the standard load, beside ours "
                           "(repeatable); its table compares it with ours")
    ours.add_argument("--signed-algorithm", choices=("rsa-sha256", "ed25519-sha256"), default="rsa-sha256",
                      help="DKIM algorithm of the signed scenario (RSA keys have 2048 bits)")
    ours.add_argument("--profile", type=Path, metavar="DIR",
                      help="record a py-spy profile of every mtacluster process into DIR/<load>-<system>-<round>")
    ours.add_argument("--profile-format", choices=("flamegraph", "raw", "speedscope"), default="flamegraph",
                      help="py-spy output format; raw also prints the top frames of each process")
    parser.add_argument("--reuse-connections", action="store_true",
                        help="smtp-source sends every message of a session on one connection (-d)")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT,
                        help="seconds the whole run may take; waits are cut to fit, later rounds skipped")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs, spools and logs")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> BenchArgs:
    ns = build_parser().parse_args(argv)
    if ns.time_limit <= 0:
        build_parser().error("--time-limit must be positive")
    if ns.probe_interval < 0:
        build_parser().error("--probe-interval must not be negative")
    if ns.rss_limit <= 0:
        build_parser().error("--rss-limit must be positive")
    args = BenchArgs(
        messages=ns.messages, size_kib=ns.size, sessions=ns.sessions,
        systems=tuple(dict.fromkeys(ns.only)) if ns.only else SYSTEMS, rounds=ns.rounds,
        probe_sessions=ns.probe_sessions, probe_interval=ns.probe_interval,
        frontends=ns.frontends, workers=ns.workers, reuse_connections=ns.reuse_connections,
        time_limit=ns.time_limit, profile_dir=ns.profile, profile_format=ns.profile_format,
        keep_workdir=ns.keep_workdir, signed_algorithm=ns.signed_algorithm,
        scenarios=tuple(dict.fromkeys(ns.scenarios)) if ns.scenarios else SCENARIOS,
        bulk_messages=ns.bulk_messages, bulk_recipients=ns.bulk_recipients, bulk_rounds=ns.bulk_rounds,
        large_messages=ns.large_messages, large_size_kib=ns.large_size, large_rounds=ns.large_rounds,
        compare_layouts=tuple(dict.fromkeys(ns.compare_layout)), rss_limit_mib=ns.rss_limit,
    )
    if not args.loads():
        build_parser().error(f"nothing to run: no system of {', '.join(args.systems)} takes part in "
                             f"{', '.join(args.scenarios)}")
    return args


def find_tool(name: str) -> str:
    """A Postfix tool, also when /usr/sbin is not on PATH."""
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)),
                                      None)
    if path is None:
        raise BenchError(f"{name} is not installed (it comes with Postfix: apt-get install postfix)")
    return path


def smtp_source_command(binary: str, load: Load, port: int, reuse_connections: bool = False) -> list[str]:
    command = [binary, "-s", str(load.sessions), "-m", str(load.messages), "-l", str(load.size_kib * 1024),
               "-f", SENDER, "-t", RECIPIENT, "-M", HELO]
    if load.recipients > 1:
        command += ["-r", str(load.recipients)]  # recipients "N" + RECIPIENT, N = 1.., all at one domain
    if reuse_connections:
        command.append("-d")
    return [*command, f"{HOST}:{port}"]


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


async def measure(system: str, load: Load, args: BenchArgs, smtp_port: int, sink: SmtpSink,
                  deadline: Deadline, on_started: Callable[[], None] | None = None) -> SideResult:
    """Run the load (and on the standard load the probe) against a ready system; wait for the sink to have
    every message (every recipient, when the load counts them)."""
    result = SideResult(system, load=load.name, recipients_per_message=load.recipients)
    probe_settings = ProbeSettings(HOST, smtp_port, load.size_kib * 1024, sender=SENDER, recipient=RECIPIENT)
    baseline_messages, baseline_recipients = sink.received, sink.recipients
    stop_probe = asyncio.Event()
    children_before, harness_before = _cpu_seconds(resource.RUSAGE_CHILDREN), _cpu_seconds(resource.RUSAGE_SELF)
    sink_before = tree_cpu_seconds(sink.pid) if sink.pid else None
    started = time.monotonic()
    source = await asyncio.create_subprocess_exec(
        *smtp_source_command(find_tool("smtp-source"), load, smtp_port, args.reuse_connections),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    probe_task = asyncio.create_task(run_probe(probe_settings, args.probe_sessions if load.probe else 0, stop_probe,
                                               args.probe_interval))
    if on_started is not None:
        on_started()
    try:
        _, stderr = await asyncio.wait_for(source.communicate(), deadline.within(SOURCE_TIMEOUT) - started)
    except TimeoutError:
        raise BenchError(f"smtp-source did not finish {load.messages} messages in time") from None
    finally:
        stop_probe.set()
        if source.returncode is None:
            source.kill()
            await source.wait()
            await asyncio.gather(probe_task, return_exceptions=True)
    accept_end = time.monotonic()
    # smtp-source was reaped just now, and is the only child of this process that ended since it started.
    source_cpu = _cpu_seconds(resource.RUSAGE_CHILDREN) - children_before
    probe: ProbeResult = await probe_task
    if source.returncode != 0:
        raise BenchError(f"smtp-source failed ({source.returncode}): {stderr.decode(errors='replace').strip()}")
    result.source_messages = load.messages
    result.probe_messages = probe.accepted
    result.probe_refused = probe.refused
    result.probe_errors = probe.connection_errors
    if probe.first_error:
        result.notes.append(f"probe: {probe.refused} refused, {probe.connection_errors} connection errors, "
                            f"first: {probe.first_error}")
    total = load.messages + probe.accepted
    recipients = load.messages * load.recipients + probe.accepted
    result.accept_seconds = accept_end - started
    result.accepted_per_s = rate(total, result.accept_seconds)
    result.source_accepted_per_s = rate(load.messages, result.accept_seconds)
    if load.probe:
        result.latency = summarize_latencies(probe.latencies)
    log(f"{system}: {total} accepted in {result.accept_seconds:.2f}s; waiting for the sink")
    if load.counts_recipients:
        result.sink_expected = baseline_recipients + recipients
        delivered_at = await sink.wait_for_recipients(result.sink_expected, deadline.within(DELIVERY_TIMEOUT))
    else:
        result.sink_expected = baseline_messages + total
        delivered_at = await sink.wait_for(result.sink_expected, deadline.within(DELIVERY_TIMEOUT))
    result.deliver_seconds = delivered_at - started
    load_cpu = {"smtp-source": source_cpu, "harness": _cpu_seconds(resource.RUSAGE_SELF) - harness_before}
    if sink_before is not None and sink.pid:
        load_cpu["smtp-sink"] = tree_cpu_seconds(sink.pid) - sink_before
    result.load_cpu_ms_per_message = {tool: 1000.0 * seconds / total for tool, seconds in sorted(load_cpu.items())}
    result.delivered_per_s = rate(total, result.deliver_seconds)
    result.delivered_recipients_per_s = rate(recipients, result.deliver_seconds)
    return result


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def note_duplicates(result: SideResult, sink: SmtpSink, load: Load) -> None:
    """After the system and the sink stopped: anything the sink got beyond what was sent was delivered twice."""
    received = sink.recipients if load.counts_recipients else sink.received
    unit = "recipients" if load.counts_recipients else "messages"
    result.sink_extra = received - result.sink_expected
    if result.sink_extra:
        result.notes.append(f"the sink received {result.sink_extra} {unit} more than were sent (duplicates)")


def _new_sink(port: int, load: Load) -> SmtpSink:
    return SmtpSink(HOST, port, find_tool("smtp-sink"), count_recipients=load.counts_recipients)


async def run_postfix(load: Load, args: BenchArgs, workdir: Path, deadline: Deadline, tag: str) -> SideResult:
    smtp_port, sink_port = free_ports(2)
    sink = _new_sink(sink_port, load)
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

        result = await measure("postfix", load, args, smtp_port, sink, deadline, on_started)
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
    note_duplicates(result, sink, load)
    return result


async def run_signed(load: Load, args: BenchArgs, workdir: Path, deadline: Deadline, tag: str) -> SideResult:
    """Ours with every message DKIM-signed at acceptance (a fresh key for the sender's domain: 2048-bit RSA, or
    Ed25519 with --signed-algorithm ed25519-sha256)."""
    from cluster.dkim.keys import generate, write_private_key

    (workdir / "signed").mkdir(parents=True, exist_ok=True)
    key_file = workdir / "signed" / "dkim.pem"
    write_private_key(str(key_file), generate(args.signed_algorithm, 2048))
    return await run_ours(load, args, workdir, deadline, tag, "signed", key_file, args.signed_algorithm)


async def run_ours(load: Load, args: BenchArgs, workdir: Path, deadline: Deadline, tag: str, system: str = "ours",
                   dkim_key_file: Path | None = None, dkim_algorithm: str = "rsa-sha256") -> SideResult:
    frontends, workers = parse_layout_system(system) or (args.frontends, args.workers)
    processes = 1 + frontends + workers  # each gets a metrics port: base + its index
    (smtp_port, sink_port, shard_port), metrics_base = free_ports_and_block(3, processes)
    settings = ClusterSettings(workdir / system, smtp_port, shard_port, metrics_base, sink_port, frontends,
                               workers, dkim_domain=SENDER.rpartition("@")[2], dkim_key_file=dkim_key_file,
                               dkim_algorithm=dkim_algorithm)
    sink = _new_sink(sink_port, load)
    instance = ClusterInstance(settings)
    profiler = _make_profiler(args, tag)
    sampler: RssSampler | None = None
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
        sampler = RssSampler(pids)
        cpu_before: dict[str, float] = {}

        def on_started() -> None:
            cpu_before.update(cpu_by_role(pids))
            assert sampler is not None
            sampler.start()
            if profiler is not None:
                profiler.start(pids)

        result = await measure(system, load, args, smtp_port, sink, deadline, on_started)
        cpu_after = cpu_by_role(pids)
        peaks = await sampler.stop()
        result.peak_rss_mib = peaks.peak_mib()
        result.sampled_rss_mib = dict(peaks.sampled_mib)
        rss = ", ".join(f"{role}={mib:.1f}" for role, mib in result.peak_rss_mib.items())
        result.notes.append(f"peak RSS MiB: {rss} ({peaks.samples} samples)")
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
            # Every child has its own metrics port (base + index); the frontends are the ones that sign.
            texts = await asyncio.gather(*(asyncio.to_thread(scrape, HOST, settings.metrics_port + index)
                                           for index in range(settings.processes)))
            totals: dict[str, float] = {}
            for text in texts:
                for name, value in sum_by_name(text).items():
                    totals[name] = totals.get(name, 0.0) + value
            result.signing = signing_summary(totals)
            if result.signing:
                result.notes.append(f"DKIM signing in the frontends: {result.signing['sign_ms_mean']:.3f} ms per "
                                    f"message (wall time of sign(), {result.signing['signed']:.0f} signed)")
        if profiler is not None:
            result.notes.extend(profiler.stop())
            result.notes.extend(_profile_notes(profiler, args.profile_format))
    except (ClusterError, SinkError, TimeoutError, SmtpProbeError) as exc:
        raise BenchError(f"{exc}\n{instance.log_tail(15)}") from exc
    finally:
        if sampler is not None:
            await sampler.stop()
        if profiler is not None:
            profiler.stop()
        instance.stop()
        await sink.stop()
    note_duplicates(result, sink, load)
    return result


def _make_profiler(args: BenchArgs, tag: str) -> Profiler | None:
    """A profiler writing into DIR/<load>-<system>-<round> (one directory per run), or None."""
    if args.profile_dir is None:
        return None
    binary = find_py_spy()
    if binary is None:
        log("--profile: py-spy is not installed (.venv/bin/pip install py-spy); running without profiling")
        return None
    return Profiler(binary, args.profile_dir / tag, args.profile_format)


def _profile_notes(profiler: Profiler, output_format: str) -> list[str]:
    notes = [f"profiles: {', '.join(str(p) for p in profiler.written())}"]
    if output_format != "raw":
        return notes
    for path in profiler.written():
        total, shares = top_frames(path.read_text(errors="replace"), limit=8)
        notes.append(f"{path.name}: {total} samples; top self time:")
        notes.extend(f"  {s.self_percent:5.1f}% self {s.inclusive_percent:5.1f}% incl  {s.frame}" for s in shares)
    return notes


async def run_one(system: str, load: Load, args: BenchArgs, workdir: Path, deadline: Deadline,
                  tag: str) -> SideResult:
    if system == "postfix":
        return await run_postfix(load, args, workdir, deadline, tag)
    if system == "signed":
        return await run_signed(load, args, workdir, deadline, tag)
    return await run_ours(load, args, workdir, deadline, tag, system)


async def run(args: BenchArgs, workdir: Path) -> dict[str, dict[str, list[SideResult]]]:
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main_task is not None:
        # SIGTERM gets the same clean shutdown as Ctrl-C: cancel, and let every `finally` stop what it started.
        loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    deadline = Deadline(args.time_limit)
    loads = args.loads()
    results: dict[str, dict[str, list[SideResult]]] = {load.name: {s: [] for s in load.systems} for load in loads}
    # Rounds alternate the systems (and the loads), so a burst of load from elsewhere on the machine hits all
    # alike, and a time limit cuts late rounds rather than whole scenarios.
    for number, load, system in round_plan(loads):
        if time.monotonic() >= deadline.end:
            log(f"{load.name}/{system}: round {number} skipped: --time-limit reached")
            continue
        log(f"{system}: {load.name} round {number}/{load.rounds}: {load.describe()}")
        tag = f"{load.name}-{system}-{number}"
        try:
            result = await run_one(system, load, args, workdir / tag, deadline, tag)
        except (BenchError, OSError) as exc:
            log(f"{system}: not measured: {exc}")
            result = SideResult(system, load=load.name, recipients_per_message=load.recipients,
                                error=str(exc).splitlines()[0] if str(exc) else repr(exc))
        for note in result.notes:
            log(f"{system}: {note}")
        results[load.name][system].append(result)
    return results


def settings_summary(args: BenchArgs) -> dict[str, object]:
    summary = asdict(args)
    summary["profile_dir"] = str(args.profile_dir) if args.profile_dir else None
    summary["compare_layouts"] = [f"{f}/{w}" for f, w in args.compare_layouts]
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mtabench-"))
    workdir.chmod(0o755)  # Postfix's daemons (user postfix) must reach their queue and data directories
    started = time.monotonic()
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
    log(f"run took {time.monotonic() - started:.0f}s")
    tables = comparisons(args.scenarios, args.loads())
    print("\n\n".join(render_table(table, results, args.rss_limit_mib) for table in tables))
    print(json_line(settings_summary(args), tables, results, args.rss_limit_mib))
    measured = [runs for by_system in results.values() for runs in by_system.values()]
    return 0 if all(runs and not any(r.error for r in runs) for runs in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
