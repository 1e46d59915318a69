//! Observability of a running server: Prometheus metrics over HTTP
//! (`--metrics-listen`), and progress in the log.
//!
//! Why: a run lasts from minutes to days, unattended. `metrics.jsonl` says
//! what each round achieved once it is over, but not whether the run is
//! moving now: how many clients are connected, how far the open round is,
//! whether messages are being refused, how long the disk takes to make the
//! log durable. A Prometheus scraper can chart and alert on these, and the
//! log tells an operator at a terminal the same story in words.
//!
//! Why hand-written: one endpoint, a few dozen series and two routes. The
//! text exposition format (0.0.4) and the slice of HTTP/1.1 a scraper
//! speaks are a few hundred lines here; an HTTP server and a metrics crate
//! would be many thousands more to build and audit in a server that faces
//! the network.
//!
//! Why it can't disturb the run: the run loop owns an [`Observer`] and
//! updates a shared [`Registry`] under a mutex held for a few additions,
//! never across I/O. The HTTP task copies a snapshot under that lock, then
//! renders and writes with no lock held, so a slow or hostile scraper only
//! ever delays itself. Scrape connections are bounded in number
//! ([`MAX_SCRAPE_CONNECTIONS`]), size ([`MAX_REQUEST_BYTES`]) and time
//! ([`SCRAPE_TIMEOUT`]), and nothing a peer sends can make the handler
//! panic. The endpoint is plain HTTP without authentication, like any
//! Prometheus target: bind it to loopback or a management network.
//!
//! Progress goes to the log as plain lines, also on a terminal: a line
//! rewritten in place would interleave with the other log lines on the
//! same stderr, and log files stay readable.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tally_protocol::durable::Persist;
use tally_protocol::error::Error;
use tally_protocol::wire::{RejectCode, Task};
use tally_protocol::{ClientIndex, ConnectionHandle, Coordinator, Event, Phase};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

use crate::admission::Admission;

/// Largest request head (request line and headers) read from a scraper.
/// Prometheus sends about 300 bytes and curl less; 8 KiB is the smallest
/// limit common servers use, so any honest client fits, and a peer can't
/// make the server buffer more than this per connection.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// Scrape connections served at once; more are closed on accept. A
/// Prometheus server holds one at a time per target, so 8 leaves room for a
/// second scraper and a person with curl, and bounds what a flood of idle
/// connections can hold (8 × [`MAX_REQUEST_BYTES`]).
pub const MAX_SCRAPE_CONNECTIONS: usize = 8;

/// Time a scrape connection has to send its request and take the whole
/// response; then it is closed. Prometheus' default scrape timeout is 10 s,
/// and a response is a few kilobytes, so only a stalled or hostile peer
/// ever reaches it.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed `accept` (e.g. out of file descriptors) before
/// trying again, so that a persistent error doesn't spin a core.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Upper bounds (seconds) of the round-duration histogram's buckets. A
/// round of the embedded MNIST task takes seconds on a laptop, one on edge
/// CPUs minutes, and the default round timeout is 10 min (an extended
/// round takes longer), so the buckets span 1 s to 1 h.
pub const ROUND_SECONDS_BUCKETS: [f64; 10] = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

/// Upper bounds (seconds) of the durability histograms' buckets: an fsync
/// takes well under a millisecond on a local SSD with a write cache, a few
/// to tens of milliseconds on disks and network volumes, and a snapshot of
/// a large model takes longer. Every accepted report waits for one WAL
/// fsync before its Ack, so the tail matters.
pub const PERSIST_SECONDS_BUCKETS: [f64; 12] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Every `reason` label of `tally_messages_rejected_total` ([`reject_reason`]),
/// rendered from the start (at 0) so that a rate over them is defined before
/// the first refusal. A fixed set: the label's cardinality is bounded
/// whatever peers send.
pub const REJECT_REASONS: [&str; 18] = [
    "bad_signature",
    "duplicate",
    "incompatible_version",
    "late",
    "malformed",
    "misuse",
    "non_finite",
    "not_a_permutation",
    "not_sampled",
    "out_of_bounds",
    "oversize",
    "superseded",
    "too_many_violations",
    "unexpected",
    "unknown_client",
    "wrong_round",
    "wrong_run",
    "wrong_shape",
];

/// The `reason` label of a refused message: the snake_case name of the
/// code the peer is told (`misuse` for a local error, which has none).
pub fn reject_reason(error: &Error) -> &'static str {
    error.reject_code().map_or("misuse", code_name)
}

/// The snake_case name of a [`RejectCode`] ([`RejectCode::name`], shared
/// with the simulator's metrics).
pub fn code_name(code: RejectCode) -> &'static str {
    code.name()
}

/// A histogram with fixed buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative), then the `+Inf` bucket.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    /// Empty, with these upper bounds (ascending).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0 }
    }

    /// Records one value.
    pub fn observe(&mut self, value: f64) {
        let i = self.bounds.iter().position(|b| value <= *b).unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum += value;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// What the metrics say at one moment: copied out of the [`Registry`]
/// under its lock, rendered without it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    rounds_configured: u32,
    round: u32,
    finished: bool,
    rounds_completed: u32,
    clients_joined: usize,
    connections: usize,
    connections_pending: usize,
    refused_max_connections: u64,
    refused_max_pending: u64,
    refused_per_source: u64,
    handshake_timeouts: u64,
    reports_accepted: u64,
    training_failures: u64,
    rejected: BTreeMap<&'static str, u64>,
    received_bytes: u64,
    sent_bytes: u64,
    round_seconds: Histogram,
    wal_append_seconds: Histogram,
    snapshot_write_seconds: Histogram,
}

impl Snapshot {
    fn new(rounds_configured: u32) -> Snapshot {
        Snapshot {
            rounds_configured,
            round: 0,
            finished: false,
            rounds_completed: 0,
            clients_joined: 0,
            connections: 0,
            connections_pending: 0,
            refused_max_connections: 0,
            refused_max_pending: 0,
            refused_per_source: 0,
            handshake_timeouts: 0,
            reports_accepted: 0,
            training_failures: 0,
            rejected: REJECT_REASONS.iter().map(|r| (*r, 0)).collect(),
            received_bytes: 0,
            sent_bytes: 0,
            round_seconds: Histogram::new(&ROUND_SECONDS_BUCKETS),
            wal_append_seconds: Histogram::new(&PERSIST_SECONDS_BUCKETS),
            snapshot_write_seconds: Histogram::new(&PERSIST_SECONDS_BUCKETS),
        }
    }

    /// The Prometheus text exposition (format 0.0.4): every metric with
    /// its `# HELP` and `# TYPE`, in a fixed order.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let mut w = Writer(&mut out);
        w.scalar(
            "tally_rounds_configured",
            "gauge",
            "Training rounds the run is configured for.",
            self.rounds_configured,
        );
        w.scalar(
            "tally_round",
            "gauge",
            "The round open now (0: none, waiting for clients or finished; above tally_rounds_configured: the final evaluation).",
            self.round,
        );
        w.scalar(
            "tally_rounds_completed_total",
            "counter",
            "Training rounds completed, including those before a restart.",
            self.rounds_completed,
        );
        w.scalar("tally_run_finished", "gauge", "1 once the run is over.", u8::from(self.finished));
        w.scalar("tally_clients_joined", "gauge", "Clients joined (authenticated) now.", self.clients_joined);
        w.scalar(
            "tally_connections",
            "gauge",
            "QUIC connections admitted now: handshaking, waiting to join, or joined.",
            self.connections,
        );
        w.scalar(
            "tally_connections_pending",
            "gauge",
            "QUIC connections admitted but not joined yet.",
            self.connections_pending,
        );
        w.labelled(
            "tally_connections_refused_total",
            "counter",
            "Connections refused at the handshake, by the admission limit reached.",
            "limit",
            &[
                ("max_connections", self.refused_max_connections),
                ("max_pending_connections", self.refused_max_pending),
                ("max_pending_per_source", self.refused_per_source),
            ],
        );
        w.scalar(
            "tally_handshake_timeouts_total",
            "counter",
            "Admitted connections closed for not finishing their handshake in time.",
            self.handshake_timeouts,
        );
        w.scalar("tally_reports_accepted_total", "counter", "Client reports accepted.", self.reports_accepted);
        w.scalar(
            "tally_training_failures_total",
            "counter",
            "Reports of clients whose local training failed (no update).",
            self.training_failures,
        );
        let rejected: Vec<(&str, u64)> = self.rejected.iter().map(|(k, v)| (*k, *v)).collect();
        w.labelled(
            "tally_messages_rejected_total",
            "counter",
            "Client messages refused, by the reason the client is told.",
            "reason",
            &rejected,
        );
        w.scalar(
            "tally_received_bytes_total",
            "counter",
            "Bytes of client messages received (whole messages, before any check).",
            self.received_bytes,
        );
        w.scalar("tally_sent_bytes_total", "counter", "Bytes of messages written to clients.", self.sent_bytes);
        w.histogram(
            "tally_round_duration_seconds",
            "Time from a round opening to its closing (rounds opened by this process).",
            &self.round_seconds,
        );
        w.histogram(
            "tally_wal_append_seconds",
            "Time to make one write-ahead-log record durable (write and fsync), paid before its Ack leaves.",
            &self.wal_append_seconds,
        );
        w.histogram(
            "tally_snapshot_write_seconds",
            "Time to write a snapshot durably (write, fsync, rename), paid when a round closes.",
            &self.snapshot_write_seconds,
        );
        out
    }
}

/// Writes metric families into a string (writing to a `String` can't fail,
/// so results are ignored).
struct Writer<'a>(&'a mut String);

impl Writer<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn scalar(&mut self, name: &str, kind: &str, help: &str, value: impl fmt::Display) {
        self.head(name, kind, help);
        let _ = writeln!(self.0, "{name} {value}");
    }

    fn labelled(&mut self, name: &str, kind: &str, help: &str, label: &str, values: &[(&str, u64)]) {
        self.head(name, kind, help);
        for (v, n) in values {
            // Label values are this module's constants: no escaping needed.
            let _ = writeln!(self.0, "{name}{{{label}=\"{v}\"}} {n}");
        }
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.head(name, "histogram", help);
        let mut cumulative = 0u64;
        for (bound, n) in h.bounds.iter().zip(&h.counts) {
            cumulative += n;
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(self.0, "{name}_bucket{{le=\"+Inf\"}} {}", h.count());
        let _ = writeln!(self.0, "{name}_sum {}", h.sum);
        let _ = writeln!(self.0, "{name}_count {}", h.count());
    }
}

/// The metrics, shared by the run loop (which updates them) and the HTTP
/// task (which reads them).
#[derive(Debug)]
pub struct Registry {
    values: Mutex<Snapshot>,
    // Counted by the connections' writer tasks, apart from the lock.
    sent_bytes: AtomicU64,
    // Read live at each scrape: refusals happen in the accept loop, which
    // doesn't wake the run loop.
    admission: OnceLock<Arc<Admission>>,
}

impl Registry {
    /// Zeroed metrics of a run of `rounds` rounds.
    pub fn new(rounds: u32) -> Arc<Registry> {
        Arc::new(Registry {
            values: Mutex::new(Snapshot::new(rounds)),
            sent_bytes: AtomicU64::new(0),
            admission: OnceLock::new(),
        })
    }

    fn values(&self) -> MutexGuard<'_, Snapshot> {
        // Holders only do arithmetic and map updates, which don't panic, so
        // a poisoned lock still holds consistent values.
        self.values.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `n` bytes were written to a client.
    pub fn sent(&self, n: usize) {
        self.sent_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A copy of the metrics now.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = self.values().clone();
        s.sent_bytes = self.sent_bytes.load(Ordering::Relaxed);
        if let Some(a) = self.admission.get() {
            (s.connections, s.connections_pending) = a.load();
            let t = a.turned_away_total();
            s.refused_max_connections = t.refused_total;
            s.refused_max_pending = t.refused_pending;
            s.refused_per_source = t.refused_per_source;
            s.handshake_timeouts = t.handshake_timeouts;
        }
        s
    }
}

/// A duration in the units a person reads: `0.4 s`, `12.4 s`, `3 min 4 s`,
/// `2 h 5 min`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Human(pub Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs_f64();
        if secs < 59.95 {
            return write!(f, "{secs:.1} s");
        }
        let whole = self.0.as_secs() + u64::from(self.0.subsec_millis() >= 500);
        let (h, m, s) = (whole / 3600, whole / 60 % 60, whole % 60);
        if h == 0 { write!(f, "{m} min {s} s") } else { write!(f, "{h} h {m} min") }
    }
}

/// How far the open round is, for the progress line.
#[derive(Debug)]
struct RoundProgress {
    round: u32,
    task: Task,
    /// Clients asked (`None`: opened before a restart, not known here).
    sampled: Option<usize>,
    accepted: usize,
    failed: usize,
    /// When it opened (`None`: before a restart).
    opened: Option<Instant>,
}

/// A connection, for its log lines.
#[derive(Debug)]
struct Peer {
    remote: SocketAddr,
    since: Instant,
    client: Option<ClientIndex>,
}

/// The run loop's side: turns what happens into metrics and log lines.
#[derive(Debug)]
pub struct Observer {
    registry: Arc<Registry>,
    rounds: u32,
    progress: Option<RoundProgress>,
    /// Duration of the last round closed by this input, for its log line.
    last_took: Option<(u32, Duration)>,
    /// Connections that reached the run loop: bounded by the admission
    /// limits, each removed when its connection closes.
    peers: HashMap<ConnectionHandle, Peer>,
    listener: Option<std::net::TcpListener>,
    http: Option<tokio::task::JoinHandle<()>>,
}

impl Observer {
    /// The observer of a run of `rounds` rounds; with `metrics_listen`,
    /// binds the metrics endpoint's socket now (so that a bad address fails
    /// at start-up, and its port is known before the run), to be served
    /// from [`Observer::start`].
    pub fn bind(rounds: u32, metrics_listen: Option<SocketAddr>) -> std::io::Result<Observer> {
        let listener = match metrics_listen {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        Ok(Observer {
            registry: Registry::new(rounds),
            rounds,
            progress: None,
            last_took: None,
            peers: HashMap::new(),
            listener,
            http: None,
        })
    }

    /// The metrics endpoint's address, if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The shared metrics (for the writer tasks).
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Starts serving the endpoint, if bound (inside the runtime), with
    /// connection counts from `admission`.
    pub fn start(&mut self, coordinator: &Coordinator, admission: Arc<Admission>) -> std::io::Result<()> {
        // Set once per run: a second start keeps the first.
        let _ = self.registry.admission.set(admission);
        self.sync(coordinator);
        if let Some(listener) = self.listener.take() {
            let addr = listener.local_addr()?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            info!(%addr, "serving metrics (GET /metrics, /healthz)");
            self.http = Some(tokio::spawn(serve(listener, self.registry.clone())));
        }
        Ok(())
    }

    /// The run's gauges as the coordinator has them now.
    fn sync(&self, coordinator: &Coordinator) {
        let mut v = self.registry.values();
        (v.round, v.finished) = match coordinator.phase() {
            Phase::AwaitingJoins => (0, false),
            Phase::AwaitingReports { round, .. } => (round, false),
            Phase::Finished => (0, true),
        };
        v.rounds_completed = coordinator.completed_rounds();
        v.clients_joined = coordinator.joined_clients();
    }

    /// A connection finished its handshake. Logged at debug only: anyone
    /// can make one, and one info line per attempt would let an
    /// unauthenticated peer flood the log (the admission summary counts
    /// them instead); a client is logged at info when it joins.
    pub fn connected(&mut self, conn: ConnectionHandle, remote: SocketAddr) {
        debug!(conn = conn.0, %remote, "connected");
        self.peers.insert(conn, Peer { remote, since: Instant::now(), client: None });
    }

    /// A connection is gone.
    pub fn disconnected(&mut self, conn: ConnectionHandle) {
        match self.peers.remove(&conn) {
            Some(Peer { remote, since, client: Some(client) }) => {
                info!(conn = conn.0, %remote, client, "disconnected after {}", Human(since.elapsed()))
            }
            Some(Peer { remote, since, client: None }) => {
                debug!(conn = conn.0, %remote, "disconnected before joining, after {}", Human(since.elapsed()))
            }
            None => debug!(conn = conn.0, "disconnected"),
        }
    }

    /// A client message of `n` bytes was read.
    pub fn received(&self, n: usize) {
        self.registry.values().received_bytes += n as u64;
    }

    /// `p` was made durable in `took`.
    pub fn persisted(&self, p: &Persist, took: Duration) {
        let mut v = self.registry.values();
        match p {
            Persist::Append(_) => v.wal_append_seconds.observe(took.as_secs_f64()),
            Persist::Snapshot(_) => v.snapshot_write_seconds.observe(took.as_secs_f64()),
        }
    }

    /// How long round `round` took, if it closed in the last input and
    /// opened in this process.
    pub fn took(&self, round: u32) -> Option<Human> {
        self.last_took.filter(|(r, _)| *r == round).map(|(_, d)| Human(d))
    }

    /// The events of one input, then the coordinator's state after it.
    pub fn events(&mut self, events: &[Event], coordinator: &Coordinator) {
        self.last_took = None;
        for event in events {
            self.event(event, coordinator);
        }
        self.sync(coordinator);
    }

    fn event(&mut self, event: &Event, coordinator: &Coordinator) {
        match event {
            Event::ClientJoined { conn, client } => {
                if let Some(p) = self.peers.get_mut(conn) {
                    p.client = Some(*client);
                }
            }
            Event::RoundOpened { round, task, sampled } => {
                self.progress = Some(RoundProgress {
                    round: *round,
                    task: *task,
                    sampled: Some(sampled.len()),
                    accepted: 0,
                    failed: 0,
                    opened: Some(Instant::now()),
                });
            }
            Event::RoundExtended { added, .. } => {
                if let Some(p) = &mut self.progress {
                    p.sampled = p.sampled.map(|n| n + added.len());
                }
            }
            Event::ReportAccepted { round, .. } | Event::TrainingFailed { round, .. } => {
                {
                    let mut v = self.registry.values();
                    match event {
                        Event::ReportAccepted { .. } => v.reports_accepted += 1,
                        _ => v.training_failures += 1,
                    }
                }
                let rounds = self.rounds;
                let p = self.progress_of(*round, coordinator);
                match event {
                    Event::ReportAccepted { .. } => p.accepted += 1,
                    _ => p.failed += 1,
                }
                info!("{}", ProgressLine(p, rounds));
            }
            Event::Rejected { error, .. } => {
                *self.registry.values().rejected.entry(reject_reason(error)).or_insert(0) += 1;
            }
            Event::RoundCompleted(summary) => {
                let opened = self.progress.take().filter(|p| p.round == summary.round).and_then(|p| p.opened);
                if let Some(opened) = opened {
                    let took = opened.elapsed();
                    self.registry.values().round_seconds.observe(took.as_secs_f64());
                    self.last_took = Some((summary.round, took));
                }
            }
            Event::CloseConnection { .. } | Event::Finished { .. } | Event::FinishSent { .. } => {}
        }
    }

    /// The progress of round `round`: the one this process saw open, or one
    /// opened before a restart (its sample and start unknown here).
    fn progress_of(&mut self, round: u32, coordinator: &Coordinator) -> &mut RoundProgress {
        let task = match coordinator.phase() {
            Phase::AwaitingReports { task, .. } => task,
            _ => Task::Train,
        };
        let fresh = RoundProgress { round, task, sampled: None, accepted: 0, failed: 0, opened: None };
        if self.progress.as_ref().is_none_or(|p| p.round != round) {
            self.progress = None;
        }
        self.progress.get_or_insert(fresh)
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        // The endpoint lives as long as the run.
        if let Some(h) = &self.http {
            h.abort();
        }
    }
}

/// `round 3/5: 2/3 reports, 1 failed, 12.4 s`.
struct ProgressLine<'a>(&'a RoundProgress, u32);

impl fmt::Display for ProgressLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ProgressLine(p, rounds) = self;
        match p.task {
            Task::Train => write!(f, "round {}/{rounds}: ", p.round)?,
            Task::Evaluate => write!(f, "final evaluation: ")?,
        }
        write!(f, "{}", p.accepted)?;
        if let Some(n) = p.sampled {
            write!(f, "/{n}")?;
        }
        write!(f, " reports")?;
        if p.failed > 0 {
            write!(f, ", {} failed", p.failed)?;
        }
        if let Some(t) = p.opened {
            write!(f, ", {}", Human(t.elapsed()))?;
        }
        Ok(())
    }
}

/// Serves scrapes until aborted.
async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPE_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "metrics endpoint: too many connections; closing");
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(SCRAPE_TIMEOUT, handle(stream, &registry)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics endpoint: connection failed"),
                Err(_) => debug!(%peer, "metrics endpoint: connection too slow; closing"),
            }
            drop(slot);
        });
    }
}

/// Answers one request on `stream`, then closes it.
pub async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, registry: &Registry) -> std::io::Result<()> {
    let response = match read_head(&mut stream).await? {
        Head::Complete(head) => respond(&head, registry),
        Head::TooLarge => Response::error(431, "Request Header Fields Too Large"),
        // Closed before a whole request: nothing to answer, or garbage.
        Head::Closed { empty: true } => return Ok(()),
        Head::Closed { empty: false } => Response::error(400, "Bad Request"),
    };
    stream.write_all(&response.0).await?;
    stream.shutdown().await?;
    // Read what the peer still sends (a body we don't serve, a pipelined
    // request) until it closes: closing a socket with unread bytes resets
    // the connection, which can destroy the response before the peer reads
    // it. Bounded like the head, and by the caller's deadline.
    let mut chunk = [0u8; 1024];
    let mut drained = 0usize;
    while drained <= MAX_REQUEST_BYTES {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    Ok(())
}

/// What a peer sent before the blank line ending a request head.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// The request line and headers, without the blank line.
    Complete(Vec<u8>),
    /// More than [`MAX_REQUEST_BYTES`] without a blank line.
    TooLarge,
    /// The peer stopped sending first (`empty`: without sending anything).
    Closed { empty: bool },
}

/// Reads up to the end of the request head; the body (a GET has none) is
/// never read.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Closed { empty: buf.is_empty() });
        }
        // Search only where a terminator can end: after the old bytes' tail.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf[from..]) {
            if from + end > MAX_REQUEST_BYTES {
                return Ok(Head::TooLarge);
            }
            buf.truncate(from + end);
            return Ok(Head::Complete(buf));
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return Ok(Head::TooLarge);
        }
    }
}

/// Where the head ends in `buf` (before `\r\n\r\n`, or the bare `\n\n`
/// that lenient clients send), if it does.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A whole HTTP response, ready to write.
#[derive(Debug)]
struct Response(Vec<u8>);

impl Response {
    fn new(status: u16, reason: &str, content_type: &str, extra: &str, body: &str, with_body: bool) -> Response {
        let mut bytes = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}\
             Cache-Control: no-store\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        if with_body {
            bytes.extend_from_slice(body.as_bytes());
        }
        Response(bytes)
    }

    fn error(status: u16, reason: &str) -> Response {
        Response::new(status, reason, "text/plain; charset=utf-8", "", &format!("{reason}\n"), true)
    }
}

/// The content type of the text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The response to a complete request head.
fn respond(head: &[u8], registry: &Registry) -> Response {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Response::error(400, "Bad Request");
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::error(400, "Bad Request");
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") || !target.starts_with('/') {
        return Response::error(400, "Bad Request");
    }
    let with_body = match method {
        "GET" => true,
        "HEAD" => false,
        _ => {
            return Response::new(
                405,
                "Method Not Allowed",
                "text/plain; charset=utf-8",
                "Allow: GET, HEAD\r\n",
                "Method Not Allowed\n",
                true,
            );
        }
    };
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/metrics" => Response::new(200, "OK", METRICS_CONTENT_TYPE, "", &registry.snapshot().render(), with_body),
        "/healthz" => Response::new(200, "OK", "text/plain; charset=utf-8", "", "ok\n", with_body),
        _ => Response::error(404, "Not Found"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use tally_protocol::error::{Malformed, Misbehaviour, Misuse};
    use tally_protocol::model::ModelArch;
    use tally_protocol::wire::{RunId, TrainSpec};
    use tally_protocol::{CoordinatorConfig, Identity, RoundSummary};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::admission::AdmissionLimits;

    /// A sample: series name, labels, value.
    type Sample = (String, Vec<(String, String)>, f64);

    /// One family of an exposition: its type and samples.
    #[derive(Debug, Default)]
    struct Family {
        kind: String,
        samples: Vec<Sample>,
    }

    fn is_name(s: &str) -> bool {
        let mut c = s.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
    }

    /// Parses the text format strictly: HELP then TYPE before every
    /// family's samples, each family in one block, `name{labels} value`
    /// samples, histograms cumulative and ending with `+Inf` = `_count`.
    fn parse(text: &str) -> BTreeMap<String, Family> {
        assert!(text.ends_with('\n'), "the exposition ends with a newline");
        let mut families: BTreeMap<String, Family> = BTreeMap::new();
        let mut current: Option<String> = None;
        let mut help: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, doc) = rest.split_once(' ').unwrap();
                assert!(is_name(name) && !doc.is_empty(), "{line}");
                assert!(!families.contains_key(name), "{name} twice");
                help = Some(name.to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(help.as_deref(), Some(name), "TYPE of {name} right after its HELP");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                families.insert(name.to_string(), Family { kind: kind.into(), samples: vec![] });
                current = Some(name.to_string());
            } else {
                assert!(!line.starts_with('#') && !line.is_empty(), "unexpected line {line:?}");
                let family = current.clone().expect("a sample after a TYPE");
                let (series, value) = line.rsplit_once(' ').unwrap();
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line:?}"));
                let (name, labels) = match series.split_once('{') {
                    Some((n, l)) => {
                        let l = l.strip_suffix('}').expect("labels close");
                        let labels = l
                            .split(',')
                            .map(|kv| {
                                let (k, v) = kv.split_once('=').unwrap();
                                assert!(is_name(k), "{line}");
                                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).expect("quoted");
                                (k.to_string(), v.to_string())
                            })
                            .collect();
                        (n, labels)
                    }
                    None => (series, vec![]),
                };
                let f = families.get_mut(&family).unwrap();
                let expected: Vec<String> = match f.kind.as_str() {
                    "histogram" => ["_bucket", "_sum", "_count"].iter().map(|s| format!("{family}{s}")).collect(),
                    _ => vec![family.clone()],
                };
                assert!(expected.iter().any(|e| e == name), "{name} outside its family {family}");
                if f.kind == "counter" {
                    assert!(name.ends_with("_total"), "counter {name}");
                }
                f.samples.push((name.to_string(), labels, value));
            }
        }
        for (name, f) in &families {
            assert!(!f.samples.is_empty(), "{name} has no samples");
            if f.kind != "histogram" {
                continue;
            }
            let buckets: Vec<(&str, f64)> =
                f.samples.iter().filter(|s| s.0.ends_with("_bucket")).map(|s| (s.1[0].1.as_str(), s.2)).collect();
            assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{name}: buckets cumulative");
            let bounds: Vec<f64> = buckets.iter().map(|b| b.0.parse::<f64>().unwrap()).collect();
            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{name}: bounds ascending");
            let count = f.samples.iter().find(|s| s.0.ends_with("_count")).unwrap().2;
            assert_eq!(buckets.last().unwrap(), &("+Inf", count), "{name}: +Inf bucket is the count");
        }
        families
    }

    fn value(families: &BTreeMap<String, Family>, name: &str, label: Option<(&str, &str)>) -> f64 {
        families
            .values()
            .flat_map(|f| &f.samples)
            .find(|s| s.0 == name && label.is_none_or(|(k, v)| s.1.iter().any(|l| l.0 == k && l.1 == v)))
            .unwrap_or_else(|| panic!("{name} {label:?} missing"))
            .2
    }

    fn coordinator() -> Coordinator {
        let cfg = CoordinatorConfig {
            run_id: RunId([1; 16]),
            arch: ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 },
            rounds: 5,
            enrolled: (1..=3u8).map(|i| Identity::from_secret([i; 32]).public_key()).collect(),
            min_clients: 3,
            clients_per_round: 3,
            quorum: 3,
            round_timeout: Duration::from_secs(10),
            train: TrainSpec::sgd(0.1, 2, 1),
            kind: tally_protocol::KindSettings::FedAvg,
            rule: tally_protocol::RuleSpec::Mean,
            max_violations: 5,
            max_update_abs: 1000.0,
            schedule: None,
            final_evaluation: true,
            noise_seed: None,
        };
        let init = cfg.arch.init_params(1);
        Coordinator::new(cfg, init, 7).unwrap()
    }

    fn summary(round: u32) -> RoundSummary {
        RoundSummary {
            round,
            task: Task::Train,
            sampled: 3,
            accepted: 2,
            failed: 1,
            rejected: 1,
            stats: None,
            eval_of_incoming: None,
            model_hash: [0; 32],
            bytes_received: 100,
            bytes_sent: 0,
        }
    }

    #[test]
    fn the_exposition_is_strict_complete_and_deterministic() {
        let coordinator = coordinator();
        let mut obs = Observer::bind(5, None).unwrap();
        let admission =
            Admission::new(AdmissionLimits { max_connections: 1, max_pending: 1, max_pending_per_source: 1 });
        let _ticket = admission.try_admit("10.0.0.1".parse().unwrap()).unwrap();
        assert!(admission.try_admit("10.0.0.2".parse().unwrap()).is_err());
        let _ = obs.registry.admission.set(admission);
        let conn = ConnectionHandle(4);
        obs.connected(conn, "10.0.0.1:5000".parse().unwrap());
        obs.events(
            &[
                Event::ClientJoined { conn, client: 0 },
                Event::RoundOpened { round: 1, task: Task::Train, sampled: vec![0, 1, 2] },
                Event::ReportAccepted { round: 1, client: 0 },
                Event::ReportAccepted { round: 1, client: 1 },
                Event::TrainingFailed { round: 1, client: 2 },
                Event::Rejected { conn, client: Some(0), error: Error::Late { got: 0, open: Some(1) } },
                Event::Rejected { conn, client: None, error: Malformed::Oversize { len: 10, limit: 5 }.into() },
                Event::Rejected { conn, client: None, error: Misbehaviour::Duplicate(1).into() },
                Event::Rejected { conn, client: None, error: Misbehaviour::Duplicate(1).into() },
                Event::Rejected { conn, client: None, error: Misuse::UnknownConnection.into() },
                Event::RoundCompleted(summary(1)),
            ],
            &coordinator,
        );
        assert!(obs.took(1).is_some() && obs.took(2).is_none());
        obs.received(1000);
        obs.registry.sent(300);
        obs.persisted(&Persist::Snapshot(coordinator.snapshot()), Duration::from_millis(3));
        obs.disconnected(conn);
        let text = obs.registry.snapshot().render();
        assert_eq!(text, obs.registry.snapshot().render(), "rendering is deterministic");
        let m = parse(&text);
        assert_eq!(value(&m, "tally_rounds_configured", None), 5.0);
        assert_eq!(value(&m, "tally_reports_accepted_total", None), 2.0);
        assert_eq!(value(&m, "tally_training_failures_total", None), 1.0);
        let rejected = |r| value(&m, "tally_messages_rejected_total", Some(("reason", r)));
        assert_eq!((rejected("late"), rejected("oversize"), rejected("duplicate")), (1.0, 1.0, 2.0));
        assert_eq!((rejected("misuse"), rejected("wrong_shape")), (1.0, 0.0));
        // Every reason is there from the start, and nothing else.
        assert_eq!(m["tally_messages_rejected_total"].samples.len(), REJECT_REASONS.len());
        assert_eq!(value(&m, "tally_received_bytes_total", None), 1000.0);
        assert_eq!(value(&m, "tally_sent_bytes_total", None), 300.0);
        assert_eq!(value(&m, "tally_round_duration_seconds_count", None), 1.0);
        assert_eq!(value(&m, "tally_snapshot_write_seconds_count", None), 1.0);
        assert_eq!(value(&m, "tally_snapshot_write_seconds_bucket", Some(("le", "0.0025"))), 0.0);
        assert_eq!(value(&m, "tally_snapshot_write_seconds_bucket", Some(("le", "0.005"))), 1.0);
        assert_eq!(value(&m, "tally_wal_append_seconds_count", None), 0.0);
        assert_eq!((value(&m, "tally_connections", None), value(&m, "tally_connections_pending", None)), (1.0, 1.0));
        let refused = |l| value(&m, "tally_connections_refused_total", Some(("limit", l)));
        assert_eq!((refused("max_connections"), refused("max_pending_connections")), (1.0, 0.0));
        // Waiting for joins: no round open.
        assert_eq!((value(&m, "tally_round", None), value(&m, "tally_run_finished", None)), (0.0, 0.0));
        assert_eq!(m.len(), 17, "{:?}", m.keys());
    }

    #[test]
    fn histogram_buckets_include_their_upper_bound() {
        let mut h = Histogram::new(&ROUND_SECONDS_BUCKETS);
        for v in [0.5, 1.0, 1.5, 3600.0, 7200.0] {
            h.observe(v);
        }
        assert_eq!(h.counts[0], 2);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[ROUND_SECONDS_BUCKETS.len() - 1], 1);
        assert_eq!(h.counts[ROUND_SECONDS_BUCKETS.len()], 1);
        assert_eq!(h.count(), 5);
        assert_eq!(h.sum, 0.5 + 1.0 + 1.5 + 3600.0 + 7200.0);
    }

    #[test]
    fn durations_read_in_human_units() {
        let h = |ms: u64| Human(Duration::from_millis(ms)).to_string();
        assert_eq!(h(0), "0.0 s");
        assert_eq!(h(1_240), "1.2 s");
        assert_eq!(h(12_449), "12.4 s");
        assert_eq!(h(59_940), "59.9 s");
        assert_eq!(h(59_960), "1 min 0 s");
        assert_eq!(h(184_000), "3 min 4 s");
        assert_eq!(h(3_599_600), "1 h 0 min");
        assert_eq!(h(7_500_000), "2 h 5 min");
    }

    #[test]
    fn the_progress_line_says_how_far_the_round_is() {
        let p = RoundProgress { round: 3, task: Task::Train, sampled: Some(3), accepted: 2, failed: 1, opened: None };
        assert_eq!(ProgressLine(&p, 5).to_string(), "round 3/5: 2/3 reports, 1 failed");
        let p = RoundProgress { task: Task::Evaluate, sampled: None, failed: 0, opened: Some(Instant::now()), ..p };
        assert_eq!(ProgressLine(&p, 5).to_string(), "final evaluation: 2 reports, 0.0 s");
    }

    /// Sends `request` (then closes the sending half), returns the response.
    async fn exchange(request: &[u8]) -> String {
        let registry = Registry::new(5);
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move { handle(server, &registry).await });
        // The handler may answer (and close) before reading everything.
        let _ = client.write_all(request).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        task.await.unwrap().unwrap();
        String::from_utf8(out).unwrap()
    }

    fn status(response: &str) -> &str {
        response.split(' ').nth(1).unwrap_or("")
    }

    fn body(response: &str) -> &str {
        response.split_once("\r\n\r\n").unwrap().1
    }

    #[tokio::test]
    async fn the_endpoint_answers_scrapes_and_health_checks() {
        let r = exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n").await;
        assert_eq!(status(&r), "200");
        assert!(r.contains(&format!("\r\nContent-Type: {METRICS_CONTENT_TYPE}\r\n")), "{r}");
        assert!(r.contains("\r\nConnection: close\r\n"), "{r}");
        let len: usize = r.split("Content-Length: ").nth(1).unwrap().split("\r\n").next().unwrap().parse().unwrap();
        assert_eq!(len, body(&r).len());
        parse(body(&r));
        // A query string is ignored; HTTP/1.0 and bare newlines are fine.
        let r = exchange(b"GET /metrics?x=1 HTTP/1.0\n\n").await;
        assert_eq!(status(&r), "200");
        let r = exchange(b"GET /healthz HTTP/1.1\r\n\r\n").await;
        assert_eq!((status(&r), body(&r)), ("200", "ok\n"));
        let r = exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!((status(&r), body(&r)), ("200", ""));
    }

    #[tokio::test]
    async fn the_endpoint_refuses_what_it_does_not_serve() {
        for (request, code) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], "404"),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", "404"),
            (b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", "405"),
            (b"GET /metrics HTTP/2.0\r\n\r\n", "400"),
            (b"GET /metrics\r\n\r\n", "400"),
            (b"GET  /metrics HTTP/1.1\r\n\r\n", "400"),
            (b"GET metrics HTTP/1.1\r\n\r\n", "400"),
            (b"\xff\xfe\x00garbage\r\n\r\n", "400"),
            (b"\r\n\r\n", "400"),
            // Closed before the end of the head.
            (b"GET /metrics HTTP/1.1\r\n", "400"),
        ] {
            let r = exchange(request).await;
            assert_eq!(status(&r), code, "{request:?}: {r}");
            assert!(r.ends_with('\n') && r.contains("Connection: close"), "{r}");
        }
        // Nothing sent: nothing answered.
        assert_eq!(exchange(b"").await, "");
    }

    #[tokio::test]
    async fn an_oversize_request_is_refused_without_reading_it_all() {
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_REQUEST_BYTES * 4, b'a');
        let r = exchange(&huge).await;
        assert_eq!(status(&r), "431", "{r}");
        // A terminator just past the limit is still too much.
        let mut late = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        late.resize(MAX_REQUEST_BYTES + 1, b'a');
        late.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status(&exchange(&late).await), "431");
        // Just under it is fine, also when split across reads.
        let mut fits = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        fits.resize(MAX_REQUEST_BYTES, b'a');
        fits.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status(&exchange(&fits).await), "200");
    }

    /// A scraper that connects and stalls holds its own connection only:
    /// another scrape is answered meanwhile.
    #[tokio::test]
    async fn a_stalled_scraper_does_not_hold_up_another() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Registry::new(2)));
        let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
        stalled.write_all(b"GET /metr").await.unwrap();
        let mut scrape = tokio::net::TcpStream::connect(addr).await.unwrap();
        scrape.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        scrape.read_to_string(&mut out).await.unwrap();
        assert_eq!((status(&out), body(&out)), ("200", "ok\n"));
        // Past the connection limit, connections are closed at once.
        let mut held = Vec::new();
        for _ in 0..MAX_SCRAPE_CONNECTIONS {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut over = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        let n = over.read_to_end(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0);
        drop((stalled, held));
        server.abort();
    }

    #[test]
    fn reject_reasons_are_the_listed_names() {
        for e in [
            Error::Late { got: 1, open: None },
            Misuse::NoPendingTask.into(),
            Misbehaviour::BadSignature.into(),
            Misbehaviour::NotEnrolled("x".into()).into(),
            Malformed::Truncated.into(),
        ] {
            assert!(REJECT_REASONS.contains(&reject_reason(&e)), "{e}");
        }
        let all = {
            use RejectCode::*;
            [
                Malformed,
                Oversize,
                IncompatibleVersion,
                UnknownClient,
                BadSignature,
                WrongRun,
                WrongRound,
                Duplicate,
                NotSampled,
                WrongShape,
                NonFinite,
                Unexpected,
                Superseded,
                TooManyViolations,
                NotAPermutation,
                Late,
                OutOfBounds,
            ]
        };
        for code in all {
            assert!(REJECT_REASONS.contains(&code_name(code)), "{code:?}");
        }
        assert!(REJECT_REASONS.windows(2).all(|w| w[0] < w[1]), "sorted, as rendered");
    }
}
