"""Whole-process benchmarks of paystream (run through scripts/bench, which builds and starts the
dev stack). Each benchmark runs the release binary as users do and reads what it prints, its
/metrics and /proc; nothing here is a pass/fail test. Prints one table, writes a JSON file.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/paystream")
RAW = os.path.join(ROOT, "target/release/raw-parse")
WORK = os.path.join(ROOT, "target/bench")
BROKERS = os.environ["PAYSTREAM_BROKERS"]
# The memory-storage broker scripts/bench starts for throughput figures (the sqlite one consumes
# only 4-7k msg/s); falls back to the dev broker when run by hand without it.
FAST_BROKERS = os.environ.get("PAYSTREAM_BENCH_BROKERS", BROKERS)
STRIPE = os.environ["PAYSTREAM_STRIPE_API_BASE"]
PG_URL = os.environ["PAYSTREAM_POSTGRES_URL"]
TICK = os.sysconf("SC_CLK_TCK")

# Sizes: (full, quick).
SIZES = {
    # payments, share pending: about 1M events, 20,000 pending at the end (the RSS target).
    "1m": ((205_000, 0.0976), (4_000, 0.1)),
    # about 5M events, still 20,000 pending: memory must not grow with events seen.
    "5m": ((1_025_000, 0.0195), (8_000, 0.05)),
    "pending": (1_000_000, 5_000),
    "scaling": ((10_000, 100_000, 1_000_000), (1_000, 5_000)),  # pending payments per row
    "spread": ((10_000, 200), (1_000, 200)),  # pending payments, --stripe-rps
    "kafka": ((10_000, 20), (500, 4)),  # events/s, seconds
    "updater": (200_000, 2_000),
    "restore": (20_000, 2_000),  # pending payments in the changelog (the sqlite broker slows as topics grow)
    # pending payments, --stripe-rps, poll interval s, rounds, share resolved (and new) per round
    "feed": ((100_000, 25, 60, 3, 0.10), (1_000, 10, 3, 2, 0.10)),
    # through real Debezium: (payments a minute, minutes) at the quoted load; then payments
    # inserted as fast as one connection does, 100 a statement
    "debezium": (((1_000, 1), 1_000), ((600, 0.1), 200)),
    # payments (about 5 events each: 1M events), rounds of the Flink/paystream pair
    "flink": ((200_000, 2), (4_000, 1)),
}


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def size(name, quick):
    full, small = SIZES[name]
    return small if quick else full


def run(args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def free_port():
    import random
    import socket

    while True:
        port = random.randint(20000, 24999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def gen(name, payments, pending, extra=()):
    """A generated event file, cached by its parameters."""
    os.makedirs(os.path.join(WORK, "files"), exist_ok=True)
    tag = "-".join([name, str(payments), str(pending), *extra]).replace("--", "")
    path = os.path.join(WORK, "files", tag + ".jsonl")
    if not os.path.exists(path):
        log(f"generating {path}")
        run([BIN, "gen-events", "--payments", str(payments), "--pending-fraction", str(pending),
             "--out", path + ".tmp", *extra])
        os.rename(path + ".tmp", path)
    return path


def replay(path, data_dir, extra=()):
    shutil.rmtree(data_dir, ignore_errors=True)
    out = run([BIN, "replay", "--no-poll", "--input", path, "--data-dir", data_dir, *extra]).stdout
    return json.loads(out.strip().splitlines()[-1])


def raw_parse(path):
    return json.loads(run([RAW, path]).stdout.strip().splitlines()[-1])


def scrape(port):
    """/metrics as {series: value}, series as printed (name{labels})."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def total(metrics, name):
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def answers(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def ready(port):
    return answers(port, "/readyz")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def create_topic(name, brokers, partitions=1):
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": brokers, "broker.address.family": "v4"})
    for f in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        f.result(30)


class Daemon:
    """`paystream run` on a data dir, with fresh topics and its own admin port."""

    def __init__(self, data_dir, extra=(), brokers=BROKERS, tag=None):
        """With `tag`, joins that daemon's topics and group instead of making new ones."""
        self.tag = tag or uuid.uuid4().hex[:8]
        self.cdc = f"bench-cdc-{self.tag}"
        if tag is None:
            create_topic(self.cdc, brokers)
        self.port = free_port()
        self.log = open(os.path.join(WORK, f"daemon-{self.tag}.log"), "w")
        args = [BIN, "run", "--brokers", brokers, "--cdc-topic", self.cdc,
                "--status-topic", f"bench-status-{self.tag}", "--dlq-topic", f"bench-dlq-{self.tag}",
                "--group-id", f"bench-{self.tag}", "--data-dir", data_dir,
                "--stripe-api-base", STRIPE, "--stripe-key", "sk_test_paystream_bench",
                "--metrics-addr", f"127.0.0.1:{self.port}",
                "--kafka-option", "session.timeout.ms=6000", *extra]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log)

    def wait_ready(self, timeout=120, until=None):
        """Seconds from process start until `until(port)` (default: /readyz answers 200)."""
        until = until or ready
        while time.monotonic() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}; see {self.log.name}")
            if until(self.port):
                return time.monotonic() - self.started
            time.sleep(0.01)
        raise RuntimeError(f"daemon not ready in {timeout}s; see {self.log.name}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def bench_replay(label, quick):
    payments, pending = size(label, quick)
    path = gen(label, payments, pending)
    base = raw_parse(path)
    r = replay(path, os.path.join(WORK, f"state-{label}"))
    return {
        "events": r["events"],
        "bytes_per_event": round(base["bytes"] / base["lines"]),
        "pending_at_end": r["pending"],
        "checkpoints": r["checkpoints"],
        "events_per_s": round(r["events_per_s"]),
        "peak_rss_mb": round(r["peak_rss_bytes"] / 2**20, 1),
        "serde_json_value_lines_per_s": round(base["value_lines_per_s"]),
        "serde_json_ignored_any_lines_per_s": round(base["ignored_any_lines_per_s"]),
        "decode_only_lines_per_s": round(base["paystream_decode_lines_per_s"]),
        "ratio_to_value_parse": round(r["events_per_s"] / base["value_lines_per_s"], 2),
        "ratio_to_ignored_any_parse": round(r["events_per_s"] / base["ignored_any_lines_per_s"], 2),
    }


def pending_state(quick):
    """A data dir with N pending payments (create + two pending updates each), none due for
    100 hours; built once per size and binary (a marker names both), then reused."""
    n = size("pending", quick)
    path = gen("pending", n, 1.0)
    d = os.path.join(WORK, f"state-pending-{n}")
    marker = os.path.join(WORK, f"state-pending-{n}.built")
    stamp = f"{os.path.getmtime(BIN)}"
    if not (os.path.exists(marker) and open(marker).read() == stamp):
        log(f"building {d}")
        replay(path, d, ["--poll-interval", "100h"])
        with open(marker, "w") as f:
            f.write(stamp)
    return d, n


def bench_state_stats(quick):
    d, n = pending_state(quick)
    # No daemon serves this dir, so the CLI opens it offline (and says so on stderr).
    t = time.monotonic()
    out = run([BIN, "state", "--data-dir", d, "--metrics-addr", f"127.0.0.1:{free_port()}", "stats"])
    elapsed = time.monotonic() - t
    return {"pending": n, "seconds": round(elapsed, 2), "output_lines": len(out.stdout.splitlines())}


def bench_scaling(quick):
    """The costs that must not grow with pending payments, at each size: replay of the
    payments' events into a fresh store (create + two pending updates each, none due), its peak
    RSS, and `state stats` offline (open + the recovery check's scan + the counts). The counts
    themselves are read from the tally; what still grows is the recovery check at open."""
    rows = {}
    for n in size("scaling", quick):
        path = gen("pending", n, 1.0)
        d = os.path.join(WORK, f"state-scaling-{n}")
        r = replay(path, d, ["--poll-interval", "100h"])
        t = time.monotonic()
        out = run([BIN, "state", "--data-dir", d, "--metrics-addr", f"127.0.0.1:{free_port()}", "stats", "--format", "json"])
        stats_s = time.monotonic() - t
        pending = json.loads(out.stdout)["pending"]
        if pending != n:
            raise RuntimeError(f"state stats counted {pending} pending of {n}")
        rows[f"{n}_pending"] = {
            "replay_events_per_s": round(r["events_per_s"]),
            "replay_peak_rss_mb": round(r["peak_rss_bytes"] / 2**20, 1),
            "checkpoints": r["checkpoints"],
            "state_stats_offline_s": round(stats_s, 2),
        }
    return rows


def check_seconds(log_path):
    """The recovery check's duration, from the daemon's log line (it runs beside the start)."""
    import re

    with open(log_path) as f:
        text = re.sub(r"\x1b\[[0-9;]*m", "", f.read())  # the log's colours
    m = re.search(r"passed its recovery check.*?check_ms=(\d+)", text)
    return round(int(m.group(1)) / 1000, 2) if m else None


def last_row_of_first_payment(path, events=3):
    """The row as the last of the first payment's `events` events shows it (create and two
    pending updates: its intent id is set by an update)."""
    row = None
    with open(path) as f:
        for line in f:
            v = json.loads(line)
            after = v.get("payload", v)["after"]
            if row is None or after["id"] == row["id"]:
                row, events = after, events - 1
                if events == 0:
                    break
    return row


def bench_restart(quick):
    d, n = pending_state(quick)
    daemon = Daemon(d)
    try:
        # The admin endpoint serves once state is open; ready also waits for the first group
        # join (seconds on the dev broker, whatever the state) and a partition.
        to_serving = daemon.wait_ready(until=lambda port: answers(port, "/healthz"))
        to_ready = daemon.wait_ready()
        # Asked of the running daemon (its admin endpoint): `state get` by idempotency key and
        # by intent id read the lookup index, `state stats` the tally; none scans state.
        row = last_row_of_first_payment(gen("pending", n, 1.0))
        asked = {}
        for name, args in (("state_get_by_key_s", ["get", row["idempotency_key"]]),
                           ("state_get_by_intent_s", ["get", row["stripe_payment_intent_id"]]),
                           ("state_stats_live_s", ["stats"])):
            t = time.monotonic()
            out = run([BIN, "state", "--data-dir", d, "--metrics-addr", f"127.0.0.1:{daemon.port}", *args, "--format", "json"])
            asked[name] = round(time.monotonic() - t, 3)
            if args[0] == "get" and str(row["id"]) not in out.stdout:
                raise RuntimeError(f"state {' '.join(args)} did not find payment {row['id']}: {out.stdout[:500]}")
        # Idle: nothing is due for ten minutes. CPU over 30 s covers two state-gauge scans.
        time.sleep(2)
        c0, t0 = cpu_seconds(daemon.proc.pid), time.monotonic()
        time.sleep(10 if quick else 30)
        idle = (cpu_seconds(daemon.proc.pid) - c0) / (time.monotonic() - t0)
        rss = int(open(f"/proc/{daemon.proc.pid}/status").read().split("VmRSS:")[1].split()[0]) * 1024
    finally:
        daemon.stop()
    return {"pending": n, "start_to_state_open_s": round(to_serving, 2), "start_to_ready_s": round(to_ready, 2),
            "recovery_check_s": check_seconds(daemon.log.name), **asked,
            "idle_cpu_cores": round(idle, 3), "rss_mb": round(rss / 2**20, 1)}


def bench_spread(quick):
    n, rps = size("spread", quick)
    path = gen("spread", n, 1.0)
    d = os.path.join(WORK, "state-spread")
    # Polls scheduled 100 ms after replay: all overdue by the time the daemon starts.
    replay(path, d, ["--poll-interval", "100ms"])
    time.sleep(1)
    window = n / rps
    daemon = Daemon(d, ["--poll-interval", "10m", "--stripe-rps", str(rps),
                        "--stripe-concurrency", "64", "--retry-backoff", "10m"])
    try:
        # Polls start before the daemon is ready (readiness waits for a partition): count from
        # the first scrape.
        while True:
            try:
                scrape(daemon.port)
                break
            except Exception:
                if daemon.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited; see {daemon.log.name}")
                time.sleep(0.01)
        counts = []
        end = time.monotonic() + window + 5
        while time.monotonic() < end:
            counts.append(total(scrape(daemon.port), "paystream_polls_total"))
            time.sleep(1)
    finally:
        daemon.stop()
    per_s = [b - a for a, b in zip(counts, counts[1:])]
    busy = [x for x in per_s if x > 0]
    # Whole seconds inside the window (the first and last are partial).
    inner = busy[1:-1] or busy
    mean = sum(inner) / max(len(inner), 1)
    return {"overdue": n, "stripe_rps": rps, "window_s": round(window, 1),
            "polls": int(counts[-1] - counts[0]) if counts else 0,
            "mean_per_s": round(mean, 1), "peak_per_s": max(inner, default=0),
            "peak_over_mean": round(max(inner, default=0) / mean, 2) if mean else None}


def bench_kafka_path(quick):
    from confluent_kafka import Producer

    rate, seconds = size("kafka", quick)
    lines = []
    with open(gen("1m", *size("1m", quick))) as f:
        for line in f:
            lines.append(line.rstrip("\n").encode())
            if len(lines) >= rate * seconds:
                break
    d = os.path.join(WORK, "state-kafka")
    shutil.rmtree(d, ignore_errors=True)
    # The dev broker appears to answer a fetch when its wait ends rather than when data arrives
    # (Kafka does the latter): with librdkafka's default 500 ms wait, p99 was 1.31 s, with 50 ms
    # 1.11 s. So the wait is shortened, not to measure the broker's habit as paystream's latency.
    daemon = Daemon(d, ["--kafka-option", "fetch.wait.max.ms=50"], brokers=FAST_BROKERS)
    sent = {}
    seen = []  # (time, durable next offset)
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                m = scrape(daemon.port)
                seen.append((time.monotonic(), m.get('paystream_stored_offset{partition="0"}', 0)))
            except Exception:
                pass
            time.sleep(0.01)

    try:
        daemon.wait_ready()
        t = threading.Thread(target=watch)
        t.start()
        p = Producer({"bootstrap.servers": FAST_BROKERS, "broker.address.family": "v4",
                      "linger.ms": 1, "acks": "all", "enable.idempotence": True})

        def delivered(err, msg, t0):
            if err is None:
                sent[msg.offset()] = t0

        start = time.monotonic()
        for i, value in enumerate(lines):
            due = start + i / rate
            while time.monotonic() < due:
                p.poll(0)
                time.sleep(0.0005)
            t0 = time.monotonic()
            p.produce(daemon.cdc, value, callback=lambda e, m, t0=t0: delivered(e, m, t0))
        p.flush(30)
        produce_s = time.monotonic() - start
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not seen or seen[-1][1] < len(lines)):
            time.sleep(0.1)
        stop.set()
        t.join()
        m = scrape(daemon.port)
        cp_count = m.get("paystream_checkpoint_duration_seconds_count", 0)
        cp_ms = round(1000 * m.get("paystream_checkpoint_duration_seconds_sum", 0) / cp_count) if cp_count else None
    finally:
        daemon.stop()
    lat = []
    j = 0
    for off in sorted(sent):
        while j < len(seen) and seen[j][1] < off + 1:
            j += 1
        if j < len(seen):
            lat.append(seen[j][0] - sent[off])
    lat.sort()
    pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else None
    return {"events": len(lines), "target_rate": rate, "produced_per_s": round(len(lines) / produce_s),
            "durable": len(lat), "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0),
            "checkpoint_interval_ms": 1000, "checkpoint_mean_ms": cp_ms, "metrics_poll_ms": 10, "broker": broker_kind()}


def bench_restore(quick):
    """State hand-off: one instance with --changelog builds state from the CDC topic and stops;
    a second one, on an empty data dir in the same group, restores it from the changelog. The
    dev (sqlite) broker: the memory one reports wrong watermarks, and restore reads up to them."""
    from confluent_kafka import Producer

    n = size("restore", quick)
    path = gen("restore", n, 1.0)
    scale_out = ["--changelog", "--poll-interval", "1h"]
    for d in ("state-restore-a", "state-restore-b"):
        shutil.rmtree(os.path.join(WORK, d), ignore_errors=True)
    a = Daemon(os.path.join(WORK, "state-restore-a"), scale_out)
    try:
        a.wait_ready()
        p = Producer({"bootstrap.servers": BROKERS, "broker.address.family": "v4", "linger.ms": 5})
        events = 0
        with open(path) as f:
            for line in f:
                while True:
                    try:
                        p.produce(a.cdc, line.rstrip("\n").encode())
                        break
                    except BufferError:
                        p.poll(0.05)
                events += 1
        p.flush(120)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if scrape(a.port).get('paystream_stored_offset{partition="0"}', 0) >= events:
                break
            time.sleep(0.5)
        logged = total(scrape(a.port), "paystream_changelog_records_total")
    finally:
        a.stop()
    b = Daemon(os.path.join(WORK, "state-restore-b"), scale_out, tag=a.tag)
    try:
        def restored(port):
            try:
                return total(scrape(port), 'paystream_partition_takeovers_total{how="restored"}') >= 1
            except OSError:
                return False

        b.wait_ready(until=restored)
        m = scrape(b.port)
        records = total(m, "paystream_changelog_restored_records_total")
        secs = m.get("paystream_changelog_restore_duration_seconds_sum", 0)
    finally:
        b.stop()
    return {"events": events, "changelog_records_written": int(logged), "restored_records": int(records),
            "restore_s": round(secs, 2), "restored_records_per_s": round(records / secs) if secs else None,
            "broker": "sqlite"}


def broker_kind():
    return "memory" if FAST_BROKERS != BROKERS else "sqlite"


def psql(sql):
    # On standard input: the feed benchmark's statements carry thousands of intent ids, more
    # than an argument may hold.
    return run(["psql", PG_URL, "-qAt", "-v", "ON_ERROR_STOP=1", "-f", "-"], input=sql,
               env={**os.environ, "PATH": "/usr/lib/postgresql/15/bin:" + os.environ["PATH"]}).stdout


def bench_updater(quick):
    from confluent_kafka import Producer

    n = size("updater", quick)
    tag = uuid.uuid4().hex[:8]
    ids = psql(f"INSERT INTO payments (idempotency_key, amount, currency, stripe_payment_intent_id) "
               f"SELECT 'bench-{tag}-' || g, 12.34, 'usd', 'pi_bench_{tag}_' || g "
               f"FROM generate_series(1, {n}) g RETURNING id").split()
    topic = f"bench-status-{tag}"
    create_topic(topic, FAST_BROKERS)
    p = Producer({"bootstrap.servers": FAST_BROKERS, "broker.address.family": "v4", "linger.ms": 5})
    for i, pid in enumerate(ids):
        status = "succeeded" if i % 10 else "failed"
        p.produce(topic, json.dumps({
            "event_id": str(uuid.uuid4()), "payment_id": pid, "idempotency_key": f"bench-{tag}-{i + 1}",
            "stripe_payment_intent_id": f"pi_bench_{tag}_{i + 1}", "status": status,
            "stripe_status": "succeeded" if status == "succeeded" else "canceled",
            "reason": None if status == "succeeded" else "canceled",
            "observed_at": "2026-11-22T00:00:00.000Z", "producer": "paystream"}).encode(), key=pid.encode())
        if i % 10000 == 0:
            p.poll(0)
    p.flush(60)
    port = free_port()
    logf = open(os.path.join(WORK, f"updater-{tag}.log"), "w")
    proc = subprocess.Popen([BIN, "updater", "--brokers", FAST_BROKERS, "--status-topic", topic,
                             "--group-id", f"bench-updater-{tag}", "--postgres-url", PG_URL,
                             "--metrics-addr", f"127.0.0.1:{port}",
                             "--kafka-option", "session.timeout.ms=6000"], stdout=logf, stderr=logf)
    samples = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                done = total(scrape(port), "paystream_updater_rows_total")
                samples.append((time.monotonic(), done))
                if done >= n:
                    break
            except Exception:
                pass
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(30)
        logf.close()
    first = next((t for t, d in samples if d > 0), None)
    last = samples[-1] if samples else (None, 0)
    updated = int(psql(f"SELECT count(*) FROM payments WHERE idempotency_key LIKE 'bench-{tag}-%' "
                       f"AND status <> 'pending'"))
    rate = (last[1] / (last[0] - first)) if first and last[0] > first else None
    return {"events": n, "rows_final": updated, "writes_per_s": round(rate) if rate else None,
            "seconds_first_to_last": round(last[0] - first, 2) if first else None, "broker": broker_kind()}


def emulator(path, body=None):
    """The Stripe emulator's own endpoints (bulk intents, stats)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(STRIPE + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def bench_feed(quick):
    """The events feed at scale (issue 10): N pending payments in embedded mode (real Postgres,
    real logical replication, the emulator); each interval Stripe resolves a share of them and
    as many new payments arrive, so the pending count holds. Reads the emulator's own count of
    this daemon's requests (its key), and the rows' write-back times from Postgres."""
    n, rps, interval, rounds, share = size("feed", quick)
    tag = uuid.uuid4().hex[:8]
    table, slot, key = f"bench_feed_{tag}", f"bench_feed_{tag}", f"sk_test_feed_{tag}"
    psql(f"CREATE TABLE {table} (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
         f"idempotency_key TEXT NOT NULL UNIQUE, amount NUMERIC(12,2) NOT NULL, currency TEXT NOT NULL, "
         f"status TEXT NOT NULL DEFAULT 'pending', stripe_payment_intent_id TEXT, "
         f"created_at TIMESTAMPTZ NOT NULL DEFAULT now(), updated_at TIMESTAMPTZ NOT NULL DEFAULT now())")

    def new_payments(count, prefix):
        ids = emulator("/_paystream/bulk_intents", {"n": count, "key_prefix": prefix})["ids"]
        for i in range(0, len(ids), 20_000):
            arr = "{" + ",".join(ids[i:i + 20_000]) + "}"
            psql(f"INSERT INTO {table} (idempotency_key, amount, currency, stripe_payment_intent_id) "
                 f"SELECT 'k-' || pi, 10.00, 'usd', pi FROM unnest('{arr}'::text[]) AS t(pi)")
        return ids

    t0 = time.monotonic()
    pool = new_payments(n, f"{tag}-0-")
    log(f"feed: {n} intents and rows in {time.monotonic() - t0:.0f}s")
    d = os.path.join(WORK, f"state-feed-{tag}")
    port = free_port()
    logf = open(os.path.join(WORK, f"feed-{tag}.log"), "w")
    proc = subprocess.Popen([BIN, "run", "--source", "postgres", "--sink", "postgres", "--postgres-url", PG_URL,
                             "--table", table, "--slot", slot, "--publication", slot, "--data-dir", d,
                             "--poll-interval", f"{interval}s", "--checkpoint-interval", "1s",
                             "--stripe-rps", str(rps), "--stripe-api-base", STRIPE, "--stripe-key", key,
                             "--events-feed", "--fallback-poll-interval", "6h",
                             "--metrics-addr", f"127.0.0.1:{port}"], stdout=logf, stderr=logf)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                m = scrape(port)
                if total(m, "paystream_snapshot_rows_total") >= n and m.get('paystream_feed_pages_total{result="ok"}', 0) >= 3:
                    break
            except Exception:
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited; see {logf.name}")
            time.sleep(0.5)
        before = emulator(f"/_paystream/stats?key={key}")
        import random
        random.seed(tag)
        batches = []
        for r in range(rounds):
            start = time.monotonic()
            k = int(n * share)
            random.shuffle(pool)
            done, pool = pool[:k], pool[k:]
            at = time.time()
            emulator("/_paystream/bulk_confirm", {"ids": done})
            batches.append((at, done))
            pool += new_payments(k, f"{tag}-{r + 1}-")
            time.sleep(max(0.0, interval - (time.monotonic() - start)))
        # The last round's resolutions: at most one more interval (two, with slack).
        want = rounds * int(n * share)
        deadline = time.monotonic() + 2 * interval + 30
        while time.monotonic() < deadline:
            if int(psql(f"SELECT count(*) FROM {table} WHERE status = 'succeeded'")) >= want:
                break
            time.sleep(0.5)
        after = emulator(f"/_paystream/stats?key={key}")
        m = scrape(port)
    finally:
        proc.terminate()
        proc.wait(60)
        logf.close()
    resolved = int(psql(f"SELECT count(*) FROM {table} WHERE status = 'succeeded'"))
    latencies = []
    for at, done in batches:
        arr = "{" + ",".join(done) + "}"
        rows = psql(f"SELECT extract(epoch FROM updated_at) FROM {table} "
                    f"WHERE status = 'succeeded' AND stripe_payment_intent_id = ANY('{arr}'::text[])").split()
        latencies += [float(x) - at for x in rows]
    latencies.sort()
    psql(f"SELECT pg_drop_replication_slot('{slot}') FROM pg_replication_slots WHERE slot_name = '{slot}'")
    psql(f"DROP PUBLICATION IF EXISTS {slot}; DROP TABLE {table}")
    shutil.rmtree(d, ignore_errors=True)

    def grew(path):
        return after["by_path"].get(path, 0) - before["by_path"].get(path, 0)

    calls = after["requests"] - before["requests"]
    return {"pending": n, "stripe_rps": rps, "interval_s": interval, "rounds": rounds,
            "resolved_in_stripe": want, "resolved": resolved, "calls": calls,
            "event_pages": grew("GET /v1/events"), "retrieves": grew("GET /v1/payment_intents"),
            "calls_per_resolved": round(calls / resolved, 3) if resolved else None,
            # One retrieve per pending payment per interval, what per-key polling needs.
            "per_key_polling_calls_per_resolved": round(n / (n * share), 1),
            "peak_calls_per_s": after["max_per_second"],
            "resolve_to_writeback_p50_s": round(latencies[len(latencies) // 2], 2) if latencies else None,
            "resolve_to_writeback_max_s": round(latencies[-1], 2) if latencies else None,
            "feed_resolved": m.get('paystream_feed_matches_total{verdict="resolved"}'),
            "poll_lag_s": m.get("paystream_poll_lag_seconds")}




def connect_up():
    run([os.path.join(ROOT, "scripts/connect-up")])


DBZ_CONNECTOR, DBZ_PUBLICATION = "paystream-bench", "paystream_bench"


def bench_connector():
    """One connector for the benchmark's tables (`bench_dbz_*` → `bench.public.<table>`), made
    like the tests' suite connector: the publication is ours, each table added before its rows."""
    connect_up()
    if not psql(f"SELECT 1 FROM pg_publication WHERE pubname = '{DBZ_PUBLICATION}'").strip():
        psql(f"CREATE PUBLICATION {DBZ_PUBLICATION}")
    doc = json.load(open(os.path.join(ROOT, "connectors/payments.json")))
    doc["config"].update({"table.include.list": r"public\.bench_dbz_.*", "topic.prefix": "bench",
                          "slot.name": DBZ_PUBLICATION, "publication.name": DBZ_PUBLICATION,
                          "publication.autocreate.mode": "disabled", "snapshot.mode": "no_data"})
    cfg = os.path.join(WORK, "bench-connector.json")
    with open(cfg, "w") as f:
        json.dump(doc, f)
    host, port = "127.0.0.1", PG_URL.split("port=")[1].split()[0]
    run([os.path.join(ROOT, "scripts/register-connector"), "--connect-url",
         "http://127.0.0.1:" + os.environ.get("PAYSTREAM_CONNECT_PORT", "28083"), "--config", cfg, "--timeout", "180"],
        env={**os.environ, "CONNECTOR_NAME": DBZ_CONNECTOR, "POSTGRES_HOST": host, "POSTGRES_PORT": port,
             "DEBEZIUM_USER": "postgres", "DEBEZIUM_PASSWORD": "unused-trust", "HEARTBEAT_INTERVAL_MS": "1000"})


def pct(values, q):
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000) if values else None


def stages(rows, cdc_ts, durable_at, observed, written):
    """p50/p99/max per stage, ms: commit → on the CDC topic (Connect's record timestamp),
    topic → durable in paystream's state (stored offset), Stripe's answer seen → row written
    (the audit trigger's clock_timestamp()), and commit → row written (which includes the wait
    for the first poll, one --poll-interval)."""
    out = {}
    for name, pairs in {
        "capture": [(rows[i], cdc_ts.get(i)) for i in rows],
        "durable": [(cdc_ts.get(i), durable_at.get(i)) for i in rows],
        "answer_to_row": [(observed.get(i), written.get(i)) for i in rows],
        "insert_to_row": [(rows[i], written.get(i)) for i in rows],
    }.items():
        d = [b - a for a, b in pairs if a is not None and b is not None]
        out[name] = {"n": len(d), "p50_ms": pct(d, 0.5), "p99_ms": pct(d, 0.99), "max_ms": pct(d, 1.0)}
    return out


def bench_debezium(quick):
    """Insert → status written back to the row, through real Debezium 3.6.3 on Kafka Connect
    3.9 (the dev broker), `paystream run`, the status topic and `paystream updater`: at the
    load the platform quotes (1,000 payments a minute), and with rows inserted as fast as one
    connection does. Every intent has succeeded in the emulator before its row is inserted, so
    the first poll (one --poll-interval after the event) resolves it."""
    from confluent_kafka import Consumer, TopicPartition

    (per_min, minutes), burst = size("debezium", quick)
    bench_connector()
    results = {}
    for label, n, rate in (("quoted_load", int(per_min * minutes), per_min / 60.0), ("max", burst, None)):
        tag = uuid.uuid4().hex[:8]
        table = f"bench_dbz_{tag}"
        ddl = open(os.path.join(ROOT, "schemas/payments.sql")).read().replace("public.payments", f"public.{table}")
        psql(ddl + f"CREATE TABLE {table}_changes (id bigint, at double precision);"
             f"CREATE FUNCTION {table}_audit() RETURNS trigger AS $$ BEGIN INSERT INTO {table}_changes "
             f"VALUES (NEW.id, extract(epoch FROM clock_timestamp())); RETURN NEW; END $$ LANGUAGE plpgsql;"
             f"CREATE TRIGGER audit AFTER UPDATE ON {table} FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) "
             f"EXECUTE FUNCTION {table}_audit();")
        psql(f"ALTER PUBLICATION {DBZ_PUBLICATION} ADD TABLE public.{table}")
        cdc, status = f"bench.public.{table}", f"bench-dbz-status-{tag}"
        create_topic(cdc, BROKERS)
        create_topic(status, BROKERS)
        intents = emulator("/_paystream/bulk_intents", {"n": n, "key_prefix": f"dbz-{tag}-"})["ids"]
        emulator("/_paystream/bulk_confirm", {"ids": intents})
        d = os.path.join(WORK, f"state-dbz-{tag}")
        port, up_port = free_port(), free_port()
        logf = open(os.path.join(WORK, f"dbz-{tag}.log"), "w")
        common = ["--brokers", BROKERS, "--kafka-option", "session.timeout.ms=6000"]
        daemon = subprocess.Popen([BIN, "run", *common, "--cdc-topic", cdc, "--status-topic", status,
                                   "--dlq-topic", f"bench-dbz-dlq-{tag}", "--group-id", f"bench-dbz-{tag}",
                                   "--data-dir", d, "--poll-interval", "1s", "--stripe-rps", "200",
                                   "--stripe-api-base", STRIPE, "--stripe-key", f"sk_test_dbz_{tag}",
                                   "--metrics-addr", f"127.0.0.1:{port}"], stdout=logf, stderr=logf)
        updater = subprocess.Popen([BIN, "updater", *common, "--status-topic", status, "--group-id",
                                    f"bench-dbz-up-{tag}", "--postgres-url", PG_URL, "--table", table,
                                    "--metrics-addr", f"127.0.0.1:{up_port}", "--batch-linger", "5ms"],
                                   stdout=logf, stderr=logf)
        durable_seen = []  # (time, durable next offset)
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                try:
                    durable_seen.append((time.time(), scrape(port).get('paystream_stored_offset{partition="0"}', 0)))
                except Exception:
                    pass
                time.sleep(0.01)

        try:
            while not (ready(port) and ready(up_port)):
                if daemon.poll() is not None or updater.poll() is not None:
                    raise RuntimeError(f"a process exited; see {logf.name}")
                time.sleep(0.1)
            w = threading.Thread(target=watch)
            w.start()
            committed = {}  # id → commit time
            start = time.time()
            step = 1 if rate else 100
            for i in range(0, n, step):
                if rate:
                    time.sleep(max(0.0, start + i / rate - time.time()))
                chunk = intents[i:i + step]
                vals = ",".join(f"('dbz-{tag}-{i + j}', 10.00, 'usd', '{pi}')" for j, pi in enumerate(chunk))
                ids = psql(f"INSERT INTO {table} (idempotency_key, amount, currency, stripe_payment_intent_id) "
                           f"VALUES {vals} RETURNING id").split()
                now = time.time()
                for pid in ids:
                    committed[int(pid)] = now
            inserted_s = time.time() - start
            deadline = time.time() + 120 + n / 20
            while time.time() < deadline:
                if int(psql(f"SELECT count(*) FROM {table}_changes")) >= n:
                    break
                time.sleep(0.2)
            stop.set()
            w.join()
        finally:
            for p in (daemon, updater):
                p.terminate()
                p.wait(60)
            logf.close()
        written = {int(a): float(b) for a, b in (l.split("|") for l in psql(f"SELECT id, min(at) FROM {table}_changes GROUP BY id").split())}
        # The CDC records: Connect's timestamps and offsets, by row id (the first record of each
        # row is its insert).
        c = Consumer({"bootstrap.servers": BROKERS, "group.id": f"bench-read-{tag}", "enable.auto.commit": False,
                      "broker.address.family": "v4"})
        c.assign([TopicPartition(cdc, 0, 0)])
        cdc_ts, offset_of, observed = {}, {}, {}
        deadline = time.time() + 60
        while len(cdc_ts) < n and time.time() < deadline:
            m = c.poll(0.5)
            if m is None or m.error() or m.value() is None:
                continue
            v = json.loads(m.value())
            p = v.get("payload", v)
            if p.get("op") == "c":
                rid = int(p["after"]["id"])
                cdc_ts[rid] = m.timestamp()[1] / 1000.0
                offset_of[rid] = m.offset()
        c.close()
        c = Consumer({"bootstrap.servers": BROKERS, "group.id": f"bench-read-s-{tag}", "enable.auto.commit": False,
                      "broker.address.family": "v4"})
        c.assign([TopicPartition(status, 0, 0)])
        deadline = time.time() + 60
        while len(observed) < len(written) and time.time() < deadline:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            ev = json.loads(m.value())
            at = datetime.datetime.fromisoformat(ev["observed_at"].replace("Z", "+00:00")).timestamp()
            observed.setdefault(int(ev["payment_id"]), at)
        c.close()
        durable_at = {}
        j = 0
        for rid, off in sorted(offset_of.items(), key=lambda kv: kv[1]):
            while j < len(durable_seen) and durable_seen[j][1] < off + 1:
                j += 1
            if j < len(durable_seen):
                durable_at[rid] = durable_seen[j][0]
        span = (max(written.values()) - start) if written else None
        results[label] = {"payments": n, "inserted_per_s": round(n / inserted_s, 1),
                          "rows_written": len(written), "written_per_s": round(len(written) / span, 1) if span else None,
                          **{k: v for k, v in stages(committed, cdc_ts, durable_at, observed, written).items()}}
    return results


def run_measured(args):
    """Runs `args` to its end through /usr/bin/time: (stdout, CPU seconds of the process and all
    its threads, peak RSS in MiB), as the kernel accounts them."""
    fmt = "PAYSTREAM_TIME %U %S %M"
    p = subprocess.run(["/usr/bin/time", "-f", fmt, *args], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{args[0]} exited {p.returncode}: {p.stderr[-2000:]}")
    line = [l for l in p.stderr.splitlines() if l.startswith("PAYSTREAM_TIME")][-1].split()
    return p.stdout, float(line[1]) + float(line[2]), int(line[3]) / 1024


def bench_flink(quick):
    """paystream replay next to the Flink job it replaces (benches/flink/PendingPayments.java,
    Flink 2.3 with EmbeddedRocksDB, parallelism 1), on the same file, interleaved: CPU seconds,
    wall seconds, peak RSS, events per CPU-second, and whether their results agree."""
    payments, rounds = size("flink", quick)
    # The shape users' Debezium writes with decimal.handling.mode=string: payload-only JSON,
    # a 2.x source block with `sequence`.
    path = gen("flink", payments, 0.02, ["--decimal", "string"])
    env = dict(l.split("=", 1) for l in run([os.path.join(ROOT, "scripts/install-flink")]).stdout.splitlines())
    java = ["java", *env["FLINK_JAVA_OPTS"].split(), "-Xmx1g", "-cp", env["FLINK_CP"], "PendingPayments"]
    lines = sum(1 for _ in open(path, "rb"))
    figures = {"events": lines}
    runs = {"flink": [], "paystream": []}
    for i in range(rounds):
        cp = os.path.join(WORK, "flink-checkpoints")
        shutil.rmtree(cp, ignore_errors=True)
        t = time.monotonic()
        out, cpu, rss = run_measured([*java, path, cp, "rocksdb"])
        wall = time.monotonic() - t
        f = json.loads(out.strip().splitlines()[-1])
        runs["flink"].append((cpu, wall, rss, f))
        d = os.path.join(WORK, "state-flink")
        shutil.rmtree(d, ignore_errors=True)
        t = time.monotonic()
        out, cpu, rss = run_measured([BIN, "replay", "--no-poll", "--input", path, "--data-dir", d])
        wall = time.monotonic() - t
        r = json.loads(out.strip().splitlines()[-1])
        runs["paystream"].append((cpu, wall, rss, r))
    for name, rs in runs.items():
        cpu = min(x[0] for x in rs)
        figures[f"{name}_cpu_s"] = round(cpu, 2)
        figures[f"{name}_wall_s"] = round(min(x[1] for x in rs), 2)
        figures[f"{name}_peak_rss_mb"] = round(max(x[2] for x in rs), 1)
        figures[f"{name}_events_per_cpu_s"] = round(lines / cpu)
    f, r = runs["flink"][-1][3], runs["paystream"][-1][3]
    figures["flink_resolved"], figures["flink_pending"] = f["resolved"], f["pending"]
    figures["paystream_resolved"], figures["paystream_pending"] = r["resolved"], r["pending"]
    figures["results_agree"] = (f["resolved"], f["pending"]) == (r["resolved"], r["pending"])
    figures["cpu_ratio_flink_over_paystream"] = round(figures["flink_cpu_s"] / figures["paystream_cpu_s"], 1)
    figures["wall_ratio"] = round(figures["flink_wall_s"] / figures["paystream_wall_s"], 1)
    figures["rss_ratio"] = round(figures["flink_peak_rss_mb"] / figures["paystream_peak_rss_mb"], 1)
    return figures


BENCHES = {
    "replay_1m": lambda q: bench_replay("1m", q),
    "replay_5m": lambda q: bench_replay("5m", q),
    "state_stats": bench_state_stats,
    "scaling": bench_scaling,
    "restart": bench_restart,
    "spread": bench_spread,
    "kafka_path": bench_kafka_path,
    "updater": bench_updater,
    "restore": bench_restore,
    "feed": bench_feed,
    "debezium": bench_debezium,
    "flink": bench_flink,
}


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) // 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mb": mem, "kernel": platform.release(),
            "commit": run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).stdout.strip()}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the benchmarks run")
    ap.add_argument("--only", default="", help="comma-separated: " + ",".join(BENCHES))
    ap.add_argument("--out", default=os.path.join(WORK, "results.json"))
    a = ap.parse_args()
    names = [n for n in a.only.split(",") if n] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
    os.makedirs(WORK, exist_ok=True)
    results = {"machine": machine(), "quick": a.quick, "date": time.strftime("%Y-%m-%d")}
    for name in names:
        log(f"{name} ...")
        t = time.monotonic()
        results[name] = BENCHES[name](a.quick)
        log(f"{name} done in {time.monotonic() - t:.0f}s: {results[name]}")
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"| benchmark | figure | value |\n|---|---|---|")
    for name in names:
        for k, v in results[name].items():
            print(f"| {name} | {k} | {v} |")
    print(f"\nmachine: {results['machine']}\nwritten: {a.out}")


if __name__ == "__main__":
    main()
