"""Pure helpers of benchmarks/: percentile math, argument parsing, generated configurations, output parsing."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import body_path, cpu_samples
from benchmarks.cluster_instance import ClusterSettings, cpu_seconds_from_stat, render_config, role_from_cmdline
from benchmarks.cluster_metrics import shard_summary, signing_summary, sum_by_name
from benchmarks.e2e import parse_args, settings_summary, smtp_source_command
from benchmarks.memory import RolePeaks, parse_status_kib
from benchmarks.ports import free_ports_and_block
from benchmarks.postfix_instance import PostfixSettings, render_main_cf, render_master_cf
from benchmarks.profiler import top_frames
from benchmarks.report import comparisons, json_line, over_limit, render_table
from benchmarks.results import SideResult, figures
from benchmarks.scenarios import parse_layout, parse_layout_system, round_plan
from benchmarks.sink import parse_conversation, parse_counter, sink_command
from benchmarks.smtp_probe import make_body
from benchmarks.stats import percentile, rate, ratio, summarize_latencies
from cluster.config import UpConfig, config_from_dict, up_processes

# --- percentiles, rates, ratios


def test_percentile_interpolates_between_closest_ranks() -> None:
    samples = [4.0, 1.0, 3.0, 2.0]
    assert percentile(samples, 0.0) == 1.0
    assert percentile(samples, 1.0) == 4.0
    assert percentile(samples, 0.5) == pytest.approx(2.5)
    assert percentile(samples, 0.9) == pytest.approx(3.7)


def test_percentile_of_one_sample_and_of_none() -> None:
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) is None


def test_percentile_rejects_fraction_outside_0_1() -> None:
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        percentile([1.0], 99)


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=200),
       st.floats(min_value=0, max_value=1), st.floats(min_value=0, max_value=1))
def test_percentile_is_bounded_and_monotone(samples: list[float], a: float, b: float) -> None:
    low, high = sorted((a, b))
    p_low, p_high = percentile(samples, low), percentile(samples, high)
    assert p_low is not None and p_high is not None
    assert min(samples) <= p_low <= p_high <= max(samples)


def test_summarize_latencies_reports_milliseconds() -> None:
    summary = summarize_latencies([0.001 * i for i in range(1, 101)])
    assert summary.count == 100
    assert summary.p50_ms == pytest.approx(50.5)
    assert summary.p99_ms == pytest.approx(99.01)
    assert summary.max_ms == pytest.approx(100.0)
    assert summarize_latencies([]).p50_ms is None


def test_rate_and_ratio_handle_missing_values() -> None:
    assert rate(2000, 4.0) == 500.0
    assert rate(10, 0.0) is None
    assert rate(10, None) is None
    assert ratio(300.0, 600.0) == 0.5
    assert ratio(None, 1.0) is None
    assert ratio(1.0, 0.0) is None


# --- arguments


def test_defaults_match_the_issue() -> None:
    args = parse_args([])
    assert (args.messages, args.size_kib, args.sessions) == (3000, 4, 20)
    assert (args.bulk_messages, args.bulk_recipients) == (200, 100)
    assert (args.large_messages, args.large_size_kib) == (200, 1024)
    assert args.rss_limit_mib == 200
    assert args.scenarios == ("standard", "signed", "bulk", "large")
    assert args.systems == ("ours", "signed", "postfix")
    assert args.profile_dir is None
    assert args.time_limit <= 420
    assert (args.rounds, args.bulk_rounds, args.large_rounds) == (3, 2, 2)
    # ours runs what `mtacluster up` starts on this machine (its defaults scale with the CPUs)
    assert (args.frontends, args.workers, args.compare_layouts) == (*up_processes(UpConfig()), ())


def test_flags_are_parsed() -> None:
    args = parse_args(["--messages", "50", "--size", "16", "--sessions", "5", "--only", "postfix",
                       "--profile", "/tmp/p", "--profile-format", "raw", "--reuse-connections"])
    assert (args.messages, args.size_kib, args.sessions, args.systems) == (50, 16, 5, ("postfix",))
    assert args.profile_dir == Path("/tmp/p")
    assert args.profile_format == "raw"
    assert args.reuse_connections


@pytest.mark.parametrize("argv", [["--messages", "0"], ["--only", "exim"], ["--sessions", "x"],
                                  ["--time-limit", "0"], ["--probe-interval", "-1"], ["--scenarios", "huge"],
                                  ["--compare-layout", "1"], ["--compare-layout", "0/1"], ["--rss-limit", "0"],
                                  ["--bulk-recipients", "0"], ["--only", "postfix", "--scenarios", "signed"]])
def test_bad_arguments_exit_with_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_smtp_source_command() -> None:
    standard, bulk, large = parse_args(["--messages", "10", "--size", "2", "--bulk-recipients", "7"]).loads()
    command = smtp_source_command("/usr/sbin/smtp-source", standard, 2525)
    assert command[0] == "/usr/sbin/smtp-source"
    assert command[-1] == "127.0.0.1:2525"
    assert command[command.index("-m") + 1] == "10"
    assert command[command.index("-l") + 1] == "2048"
    assert command[command.index("-s") + 1] == "20"
    assert "-d" not in command and "-r" not in command
    assert "-d" in smtp_source_command("smtp-source", standard, 1, reuse_connections=True)
    bulk_command = smtp_source_command("smtp-source", bulk, 1)
    assert bulk_command[bulk_command.index("-r") + 1] == "7"
    assert bulk_command[bulk_command.index("-m") + 1] == "200"
    large_command = smtp_source_command("smtp-source", large, 1)
    assert large_command[large_command.index("-l") + 1] == str(1024 * 1024)


def test_only_takes_several_systems() -> None:
    assert parse_args(["--only", "ours", "signed"]).systems == ("ours", "signed")


# --- scenarios and the order of the runs


def test_default_plan_runs_every_scenario_round_major_postfix_first() -> None:
    loads = parse_args([]).loads()
    assert [(load.name, load.systems, load.rounds) for load in loads] == [
        ("standard", ("postfix", "ours", "signed"), 3), ("bulk", ("postfix", "ours"), 2),
        ("large", ("postfix", "ours"), 2)]
    assert [load.probe for load in loads] == [True, False, False]
    assert [load.counts_recipients for load in loads] == [False, True, False]
    plan = [(number, load.name, system) for number, load, system in round_plan(loads)]
    assert plan[:7] == [(1, "standard", "postfix"), (1, "standard", "ours"), (1, "standard", "signed"),
                        (1, "bulk", "postfix"), (1, "bulk", "ours"), (1, "large", "postfix"), (1, "large", "ours")]
    assert plan[-3:] == [(3, "standard", "postfix"), (3, "standard", "ours"), (3, "standard", "signed")]
    assert len(plan) == 3 * 3 + 2 * 2 + 2 * 2


def test_plan_follows_the_chosen_scenarios_and_systems() -> None:
    only_signed = parse_args(["--scenarios", "signed"]).loads()
    assert [(load.name, load.systems) for load in only_signed] == [("standard", ("ours", "signed"))]
    no_postfix = parse_args(["--only", "ours", "--scenarios", "bulk", "large"]).loads()
    assert [(load.name, load.systems) for load in no_postfix] == [("bulk", ("ours",)), ("large", ("ours",))]
    layouts = parse_args(["--scenarios", "standard", "--compare-layout", "1/1", "--compare-layout", "1/1",
                          "--compare-layout", "2/1"]).loads()
    assert layouts[0].systems == ("postfix", "ours", "ours-1f1w", "ours-2f1w")


def test_layouts_parse_and_name_systems() -> None:
    assert parse_layout("1/2") == (1, 2)
    assert parse_layout_system("ours-1f2w") == (1, 2)
    assert parse_layout_system("ours") is None and parse_layout_system("signed") is None
    for bad in ("1", "a/b", "0/1", "1/0", "1/"):
        with pytest.raises(ValueError, match="FRONTENDS/WORKERS"):
            parse_layout(bad)


def test_loads_describe_themselves() -> None:
    standard, bulk, large = parse_args([]).loads()
    assert standard.describe() == "3000 x 4 KiB, 20 sessions"
    assert bulk.describe() == "200 x 4 KiB, 100 recipients each, 20 sessions"
    assert large.describe() == "200 x 1 MiB, 20 sessions"


# --- generated configurations


def test_cluster_config_is_valid_for_mtacluster(tmp_path: Path) -> None:
    settings = ClusterSettings(tmp_path, smtp_port=30025, shard_port=30026, metrics_port=30100, sink_port=30027,
                               frontends=3, workers=4)
    config = config_from_dict(tomllib.loads(render_config(settings)), environ={})
    assert config.smtp.listen == ("127.0.0.1:30025",)
    assert config.queue.shards == ("tcp://127.0.0.1:30026",)
    assert config.queue.spool_dir == str(tmp_path / "spool")
    assert config.delivery.smarthost == "127.0.0.1:30027"
    assert config.mailbox.maildir_root == str(tmp_path / "maildir")
    assert config.metrics.listen == "127.0.0.1:30100"
    assert (config.up.frontends, config.up.workers) == (3, 4)
    assert settings.processes == 8
    assert not config.dkim.domains
    signed = ClusterSettings(tmp_path, 1, 2, 3, 4, dkim_domain="bench.example", dkim_key_file=tmp_path / "k.pem")
    entry = config_from_dict(tomllib.loads(render_config(signed)), environ={}).dkim.domains["bench.example"]
    assert (entry.selector, entry.key_file, entry.algorithm) == ("bench", str(tmp_path / "k.pem"), "rsa-sha256")


def test_postfix_main_cf_relays_everything_to_the_sink(tmp_path: Path) -> None:
    settings = PostfixSettings(tmp_path / "postfix", smtp_port=30025, relay_port=30027)
    lines = dict(line.split(" = ", 1) for line in render_main_cf(settings).splitlines())
    assert lines["relayhost"] == "[127.0.0.1]:30027"
    assert lines["inet_interfaces"] == "127.0.0.1"
    assert lines["queue_directory"] == str(tmp_path / "postfix" / "queue")
    assert lines["data_directory"] == str(tmp_path / "postfix" / "data")
    assert lines["maillog_file"].startswith(lines["maillog_file_prefixes"])
    assert lines["mydestination"] == ""


MASTER_CF = """\
# comment line
smtp      inet  n       -       y       -       -       smtpd
#submission inet n       -       y       -       -       smtpd
pickup    unix  n       -       y       60      1       pickup
relay     unix  -       -       y       -       -       smtp
        -o syslog_name=postfix/$service_name
local     unix  -       n       n       -       -       local
"""


def test_postfix_master_cf_moves_the_listener_and_turns_chroot_off() -> None:
    lines = render_master_cf(MASTER_CF, 30025).splitlines()
    assert lines[0] == "# comment line"
    assert lines[1].split() == ["127.0.0.1:30025", "inet", "n", "-", "n", "-", "-", "smtpd"]
    assert lines[2].startswith("#submission")
    assert lines[3].split()[4] == "n"
    assert lines[4].split()[:5] == ["relay", "unix", "-", "-", "n"]
    assert lines[5] == "        -o syslog_name=postfix/$service_name"
    assert lines[6].split()[4] == "n"


# --- parsing tool output


def test_parse_counter_reads_smtp_sink_counters() -> None:
    assert parse_counter(b"sess=4 quit=4 mesg=17") == 17
    assert parse_counter(b"smtp-sink: warning: something") is None


def test_parse_conversation_counts_recipients_and_ends_of_data() -> None:
    # smtp-sink -v prefixes each line with its argv[0]; message content is never shown.
    lines = [b"/usr/sbin/smtp-sink: connect (AF_INET 127.0.0.1)", b"/usr/sbin/smtp-sink: MAIL FROM:<a@b.example>",
             b"/usr/sbin/smtp-sink: RCPT TO:<2s@b.example>", b"smtp-sink: rcpt to:<s@b.example>\r",
             b"/usr/sbin/smtp-sink: DATA", b"/usr/sbin/smtp-sink: .", b"smtp-sink: RCPT TO:<x@b.example>",
             b"smtp-sink: warning: RCPT TO: something", b"other: RCPT TO:<y@b.example>", b"smtp-sink: QUIT"]
    counts = parse_conversation(lines)
    assert (counts.recipients, counts.messages, counts.events) == (3, 1, "rr.r")
    assert parse_conversation([]).events == ""


def test_sink_drops_root_privileges() -> None:
    assert "-u" in sink_command("smtp-sink", "127.0.0.1", 1, as_root=True)
    assert "-u" not in sink_command("smtp-sink", "127.0.0.1", 1, as_root=False)
    assert sink_command("smtp-sink", "127.0.0.1", 1, as_root=False)[-2:] == ["127.0.0.1:1", "1024"]


def test_sink_counts_recipients_from_its_conversation() -> None:
    assert "-c" in sink_command("smtp-sink", "127.0.0.1", 1, as_root=False)
    verbose = sink_command("smtp-sink", "127.0.0.1", 1, as_root=False, count_recipients=True)
    assert "-v" in verbose and "-c" not in verbose


def test_parse_status_kib_reads_rss_fields() -> None:
    status = "Name:\tpython3\nVmHWM:\t  204800 kB\nVmRSS:\t   51200 kB\nThreads:\t3\n"
    assert parse_status_kib(status, "VmRSS") == 51200
    assert parse_status_kib(status, "VmHWM") == 204800
    assert parse_status_kib(status, "VmSwap") is None
    assert parse_status_kib("VmRSS:\n", "VmRSS") is None


def test_role_peaks_keep_the_largest_process_of_each_role() -> None:
    peaks = RolePeaks()
    for role, kib in (("frontend", 51200), ("frontend", 102400), ("worker", 40960)):
        peaks.note(peaks.sampled_mib, role, kib)
    peaks.note(peaks.hwm_mib, "worker", 61440)
    assert peaks.peak_mib() == {"frontend": 100.0, "worker": 60.0}


def test_role_from_cmdline() -> None:
    assert role_from_cmdline(["/venv/bin/python", "-m", "cluster", "serve", "queue", "--shard", "0"]) == "queue"
    assert role_from_cmdline(["mtacluster", "serve", "frontend"]) == "frontend"
    assert role_from_cmdline(["mtacluster", "up"]) is None


def test_top_frames_counts_self_and_inclusive_samples() -> None:
    collapsed = "main;loop;parse 30\nmain;loop;write 50\nmain;idle 20\nnot a stack line\n"
    total, shares = top_frames(collapsed, limit=2)
    assert total == 100
    assert [(s.frame, s.self_samples) for s in shares] == [("write", 50), ("parse", 30)]
    assert shares[0].inclusive_percent == 50.0
    assert top_frames("", 5) == (0, [])


def test_probe_body_has_the_requested_payload_and_crlf_lines() -> None:
    body = make_body(4096, "a@b.example", "c@b.example")
    payload = body.split(b"\r\n\r\n", 1)[1]
    assert len(payload) == 4096
    assert b"\n" not in payload.replace(b"\r\n", b"")
    assert not any(line.startswith(b".") for line in body.split(b"\r\n"))


# --- output


def _results() -> dict[str, dict[str, list[SideResult]]]:
    ours = SideResult("ours", accepted_per_s=300.0, delivered_per_s=250.0,
                      cpu_ms_per_message={"frontend": 1.0, "queue": 0.5},
                      load_cpu_ms_per_message={"harness": 0.25, "smtp-sink": 0.125, "smtp-source": 0.125})
    postfix = SideResult("postfix", accepted_per_s=600.0, delivered_per_s=500.0, cpu_ms_per_message={"postfix": 2.0},
                         load_cpu_ms_per_message={"harness": 0.5, "smtp-sink": 0.25, "smtp-source": 0.25})
    signed = SideResult("signed", accepted_per_s=270.0, delivered_per_s=225.0)
    bulk_ours = SideResult("ours", load="bulk", recipients_per_message=100, accepted_per_s=30.0,
                           delivered_per_s=20.0, delivered_recipients_per_s=2000.0, sink_extra=3)
    bulk_postfix = SideResult("postfix", load="bulk", recipients_per_message=100, accepted_per_s=30.0,
                              delivered_per_s=40.0, delivered_recipients_per_s=4000.0)
    large_ours = SideResult("ours", load="large", accepted_per_s=40.0, delivered_per_s=30.0,
                            peak_rss_mib={"frontend": 250.0, "queue": 120.0})
    large_postfix = SideResult("postfix", load="large", accepted_per_s=80.0, delivered_per_s=60.0)
    return {"standard": {"postfix": [postfix], "ours": [ours], "signed": [signed]},
            "bulk": {"postfix": [bulk_postfix], "ours": [bulk_ours]},
            "large": {"postfix": [large_postfix], "ours": [large_ours]}}


def test_one_table_per_scenario_with_ratios() -> None:
    args = parse_args([])
    tables = comparisons(args.scenarios, args.loads())
    assert [t.scenario for t in tables] == ["standard", "signed", "bulk", "large"]
    results = _results()
    standard, signed, bulk, large = (render_table(t, results) for t in tables)
    assert standard.startswith("standard: 3000 x 4 KiB, 20 sessions; median of 3 rounds")
    assert "ours/postfix" in standard and "600.0" in standard and "0.50" in standard
    assert "CPU ms/message frontend" in standard and "CPU ms/message postfix" not in standard
    # What the load generator, the sink and the harness used of the same cores, per message, for each system.
    rows = {line.strip().split("  ")[0]: line.split() for line in standard.splitlines()}
    assert rows["load CPU ms/message"][-3:] == ["0.5", "1.0", "0.50"]
    assert rows["load CPU ms/message smtp-source"][-3:] == ["0.1", "0.2", "0.50"]
    assert "signed/ours" in signed and "0.90" in signed
    assert "delivered recipients/s" in bulk and "duplicate recipients at sink" in bulk
    assert "peak RSS MiB frontend" in large and "RSS above 200 MiB (ours): frontend 250.0 MiB" in large
    assert "peak RSS" not in standard and "delivered recipients/s" not in standard


def test_json_line_carries_every_figure_of_every_scenario() -> None:
    args = parse_args(["--compare-layout", "1/1"])
    tables = comparisons(args.scenarios, args.loads())
    results = _results()
    results["standard"]["ours-1f1w"] = [SideResult("ours-1f1w", accepted_per_s=330.0)]
    payload = json.loads(json_line(settings_summary(args), tables, results))
    scenarios = payload["scenarios"]
    assert set(scenarios) == {"standard", "signed", "layout 1/1", "bulk", "large"}
    assert scenarios["standard"]["ratio"]["delivered_per_s"] == 0.5
    assert scenarios["standard"]["ours"]["cpu_ms_per_message"] == 1.5
    assert scenarios["standard"]["ours"]["cpu_ms_per_message.queue"] == 0.5
    assert scenarios["standard"]["postfix"]["cpu_ms_per_message"] == 2.0
    assert scenarios["standard"]["ours"]["load_cpu_ms_per_message"] == 0.5
    assert scenarios["standard"]["postfix"]["load_cpu_ms_per_message.smtp-sink"] == 0.25
    assert "p99_ms" not in scenarios["standard"]["postfix"]
    assert scenarios["signed"]["ratio"]["accepted_per_s"] == 0.9
    assert scenarios["layout 1/1"]["ratio"]["accepted_per_s"] == pytest.approx(1.1)
    assert scenarios["bulk"]["ratio"]["delivered_recipients_per_s"] == 0.5
    assert scenarios["bulk"]["duplicates"] == {"ours": 3, "postfix": 0}
    assert scenarios["large"]["ours"]["peak_rss_mib.queue"] == 120.0
    assert scenarios["large"]["rss_over_limit"] == {"frontend": 250.0}
    assert payload["settings"]["messages"] == 3000
    assert payload["settings"]["compare_layouts"] == ["1/1"]
    assert payload["details"]["bulk"]["ours"][0]["recipients_per_message"] == 100


def test_over_limit_names_roles_above_it() -> None:
    assert over_limit({"peak_rss_mib.queue": 201.0, "peak_rss_mib.worker": 200.0, "accepted_per_s": 900.0},
                      200.0) == {"queue": 201.0}


def test_free_ports_and_block_are_distinct_and_consecutive() -> None:
    singles, base = free_ports_and_block(3, 5)
    block = set(range(base, base + 5))
    assert len(set(singles)) == 3
    assert not block & set(singles)


def test_figures_are_medians_over_measured_rounds() -> None:
    rounds = [SideResult("ours", accepted_per_s=100.0), SideResult("ours", accepted_per_s=300.0),
              SideResult("ours", accepted_per_s=200.0), SideResult("ours", error="sink died")]
    assert figures(rounds)["accepted_per_s"] == 200.0
    assert "p99_ms" not in figures(rounds)
    assert figures([]) == {}


METRICS_TEXT = """\
# HELP mtacluster_queue_spool_commit_batch_messages Messages per spool transaction
# TYPE mtacluster_queue_spool_commit_batch_messages histogram
mtacluster_queue_spool_commit_batch_messages_bucket{shard="0",le="1.0"} 3.0
mtacluster_queue_spool_commit_batch_messages_count{shard="0"} 40.0
mtacluster_queue_spool_commit_batch_messages_sum{shard="0"} 200.0
mtacluster_queue_spool_commit_duration_seconds_count{shard="0"} 100.0
mtacluster_queue_spool_commit_duration_seconds_sum{shard="0"} 0.5
mtacluster_queue_leases_expired_total{shard="0"} 2.0
mtacluster_queue_messages_stored_total{shard="0"} 200.0
"""


def test_shard_summary_from_metrics_text() -> None:
    summary = shard_summary(sum_by_name(METRICS_TEXT))
    assert summary["spool_commits"] == 40.0
    assert summary["messages_per_commit"] == 5.0
    assert summary["spool_transactions"] == 100.0  # every transaction, not only those that stored mail
    assert summary["commit_ms_mean"] == pytest.approx(5.0)
    assert summary["leases_expired"] == 2.0
    assert summary["transactions_per_message"] == pytest.approx(0.5)
    assert shard_summary(sum_by_name("")) == {}


def test_signing_summary_from_the_frontends_metrics() -> None:
    text = ("mtacluster_dkim_sign_duration_seconds_count 400.0\n"
            "mtacluster_dkim_sign_duration_seconds_sum 0.3\n")
    summary = signing_summary(sum_by_name(text))
    assert summary["signed"] == 400.0 and summary["sign_ms_mean"] == pytest.approx(0.75)
    assert signing_summary(sum_by_name(METRICS_TEXT)) == {}


def test_cpu_seconds_from_proc_stat_survives_spaces_in_the_command_name() -> None:
    stat = "1234 (python -m x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 0 0"
    assert cpu_seconds_from_stat(stat, 100) == 3.0
    assert cpu_seconds_from_stat(stat.replace(" 250 50 0 0 ", " 250 50 70 30 "), 100, reaped_children=True) == 4.0


def test_body_path_measures_every_step_of_a_big_body(tmp_path: Path) -> None:
    """benchmarks/body_path.py, run tiny (one repeat of a 200 KiB message: big enough for every big-body path)."""
    figures = body_path.measure(200 * 1024, 64 * 1024, 1, 1, str(tmp_path))
    assert set(figures) == {"data_reader", "chunk_reader", "inject_encode", "inject_decode", "dot_stuff",
                            "spool_store_remove"}
    assert all(value > 0 for value in figures.values())
    assert list(tmp_path.iterdir()) == []  # its spool is removed
    body = body_path.message(4096)
    assert body.startswith(body_path.HEADER) and body.endswith(b"X\r\n") and len(body) <= 4096



def test_cpu_samples_are_summarised_by_function_without_startup() -> None:
    lines = [
        "main (x.py:1);work (w.py:5);encode (s.py:9) 600\n",
        "main (x.py:1);work (w.py:6) 300\n",
        "main (x.py:1);work (w.py:7);work (w.py:8) 100\n",  # recursion: counted once inclusive
        "[other threads] 1000\n",
        "main (x.py:1);_find_and_load (<frozen importlib._bootstrap>:1);x (y.py:1) 5000\n",  # an import: left out
        "not a sample\n",
    ]
    total, own, inclusive = cpu_samples.summarise(lines)
    assert total == 2000
    assert own == {"encode (s.py)": 600, "work (w.py)": 400, "[other threads]": 1000}
    assert inclusive["work (w.py)"] == 1000 and inclusive["main (x.py)"] == 1000 and inclusive["encode (s.py)"] == 600
