//! `tally-server`: the QUIC aggregation server.
//!
//! A thin tokio/quinn driver around [`tally_protocol::Coordinator`]: it accepts
//! QUIC connections (TLS 1.3), reads each unidirectional stream as one message
//! under the run's size limit, feeds bytes and `now` to the coordinator, and
//! writes what the coordinator emits, one message per stream, in order per
//! connection. Everything that decides anything lives in the coordinator.
//!
//! It never links burn: the server only averages vectors, so it stays small
//! and quick to build. Accuracy figures come from the clients' evaluations.

pub mod admission;
pub mod config;
// Entry points of the cargo-fuzz targets in `fuzz/` for the server's readers
// (tests and the fuzzer only: feature `fuzz`).
#[cfg(any(test, feature = "fuzz"))]
#[doc(hidden)]
pub mod fuzz_entry;
pub mod metrics;
pub mod observe;
pub mod state;
#[cfg(test)]
mod tests;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tally_protocol::wire::RejectCode;
use tally_protocol::{ConnectionHandle, Coordinator, CoordinatorConfig, Event};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::admission::{Admission, AdmissionLimits, Ticket};
use crate::config::{RunRecord, ServerConfig};
use crate::metrics::MetricsWriter;

/// Concurrent unidirectional streams a client may open. The protocol sends
/// one message at a time; a little slack lets a client pipeline an eval and an
/// update without letting it pin server memory with many open streams.
pub const MAX_CONCURRENT_UNI_STREAMS: u32 = 4;

/// Keep-alive interval: local training can leave a connection silent for
/// minutes, and NATs on edge networks drop idle UDP mappings after ~30 s.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// A connection with no traffic (not even keep-alives) for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the server keeps answering after the run ended, for clients
/// that were reconnecting at the end (it stops early once every enrolled
/// client has been told). Longer than a client's first reconnection backoffs.
pub const FINISH_LINGER: Duration = Duration::from_secs(20);

/// How long to wait at the end of a run for clients to read the last messages.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of client messages the server holds at once, read but not yet
/// handled, over all connections: each connection reads one stream at a time
/// and first reserves its current size limit from this budget, and the
/// reservation is released once the coordinator has handled the message.
/// So inbound memory is bounded whatever the number of clients, and the
/// budget is shared first come, first served (tokio's semaphore is fair): a
/// connection that floods holds at most one reservation and cannot starve
/// the others. 512 MiB is ~80 FRL LeNet reports (6.6 MB limit each) or
/// ~650 MNIST-MLP deltas at once.
pub const MAX_INBOUND_BYTES_IN_FLIGHT: usize = 512 * 1024 * 1024;

/// QUIC flow-control window of one connection (all its streams together):
/// what a client can make the server buffer below the application before
/// it reads. 2 MiB is above the bandwidth-delay product of a 100 Mbit/s,
/// 150 ms path, so it doesn't throttle honest uploads, and with the
/// connection limit it bounds the transport's buffers (max_connections × 2 MiB).
pub const CONNECTION_RECEIVE_WINDOW: u32 = 2 * 1024 * 1024;

/// Connection attempts quinn holds for the accept loop at once (its
/// default is 65,536, ~100 MB of first packets). The loop answers each with
/// a Retry, a refusal or an accept in microseconds, so a deep queue only
/// ever fills under a flood; past it quinn drops new Initials unanswered
/// (an honest client retransmits its Initial after a timeout).
pub const MAX_INCOMING: usize = 4096;

/// Bytes quinn buffers for all queued connection attempts beyond their
/// first packet (its default is 100 MiB): an honest client sends at most
/// a few datagrams before it is answered.
pub const INCOMING_BUFFER_TOTAL: u64 = 16 * 1024 * 1024;

/// How often the accept loop logs a summary of the unauthenticated load it
/// turned away (Retries sent, refusals by limit, handshake timeouts), so
/// that a flood is visible without one log line per packet.
pub const ADMISSION_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Capacity of the channel from connection tasks to the driver. Readers block
/// when it is full, which back-pressures clients through QUIC flow control.
const INBOUND_CAPACITY: usize = 1024;

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// TLS.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The coordinator refused the configuration.
    #[error("protocol configuration: {0}")]
    Protocol(#[from] tally_protocol::error::Misuse),
    /// Initial model file.
    #[error("initial model {path}: {message}")]
    InitialModel {
        /// File.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Durable state.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// Saved state the coordinator refused.
    #[error("resuming from {dir}: {source}")]
    Restore {
        /// State directory.
        dir: PathBuf,
        /// Why.
        source: tally_protocol::durable::DurableError,
    },
    /// The saved run was started with another configuration.
    #[error(
        "resuming from {dir}: the run was started with another configuration:\n  {}\n{hint}",
        changes.join("\n  ")
    )]
    ConfigChanged {
        /// State directory.
        dir: PathBuf,
        /// What changed, one `setting: saved X, now Y` each.
        changes: Vec<String>,
        /// What the operator can do.
        hint: &'static str,
    },
    /// The state directory holds a run that finished and was closed:
    /// starting on it would run nothing.
    #[error(
        "{state_dir} holds a run that already finished ({rounds} rounds; its outputs are in {out_dir}); \
         to start a new run, give another --state-dir (or --out-dir), or move this one away"
    )]
    AlreadyFinished {
        /// State directory.
        state_dir: PathBuf,
        /// Where its outputs are.
        out_dir: PathBuf,
        /// Rounds it completed.
        rounds: u32,
    },
    /// Metrics file.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    /// The OS could not give the secret seed of a private run's noise.
    #[error("OS randomness unavailable for the DP noise seed: {0}")]
    Entropy(String),
    /// The run finished and its clients were told, but its outputs could
    /// not be written.
    #[error(
        "the run finished, but its outputs could not be written: {message}; \
         the final model is safe in {state_dir}: start the server again on it to write them"
    )]
    Outputs {
        /// What failed.
        message: String,
        /// Where the run's state is.
        state_dir: PathBuf,
    },
    /// Socket or file I/O.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let context = context.into();
    move |source| ServerError::Io { context, source }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    /// Training rounds completed.
    pub rounds_completed: u32,
    /// The run finished (as opposed to being interrupted).
    pub finished: bool,
    /// Where the final model was written.
    pub model_path: PathBuf,
    /// Where the metrics were written.
    pub metrics_path: PathBuf,
    /// Accuracy of the final model as evaluated by clients, if reported.
    pub final_accuracy: Option<f64>,
}

enum Inbound {
    /// A connection finished its handshake, with its read limit and its
    /// admission ticket (marked joined by the driver).
    Connected(ConnectionHandle, quinn::Connection, Arc<AtomicUsize>, Arc<Ticket>),
    /// A message, prepared on its connection's task (decoded, a report's
    /// digest taken: [`tally_protocol::Preparer`]) so that the driver's
    /// single loop only verifies and aggregates, with its share of
    /// [`MAX_INBOUND_BYTES_IN_FLIGHT`] (released when dropped, after the
    /// coordinator has handled it).
    Message(ConnectionHandle, Box<tally_protocol::Prepared>, tokio::sync::OwnedSemaphorePermit),
    Oversize(ConnectionHandle, usize),
    Closed(ConnectionHandle),
}

enum Outbound {
    Send(Arc<[u8]>),
    Close(RejectCode),
}

/// A bound server, ready to [`Server::run`].
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    endpoint: quinn::Endpoint,
    coordinator: Coordinator,
    fingerprint: [u8; 32],
    state: state::StateDir,
    resumed: bool,
    observer: observe::Observer,
}

impl Server {
    /// Loads the certificate, builds the coordinator and binds the socket.
    /// Must be called inside a tokio runtime.
    pub fn bind(mut config: ServerConfig) -> Result<Server, ServerError> {
        let identity = tls::load_identity(&config.tls)?;
        let fingerprint = identity.fingerprint;
        let endpoint_config = tls::endpoint_config(&identity);
        let mut server_config = tls::quic_server_config(identity)?;
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_uni_streams(MAX_CONCURRENT_UNI_STREAMS.into())
            .max_concurrent_bidi_streams(0u32.into())
            .receive_window(CONNECTION_RECEIVE_WINDOW.into())
            .stream_receive_window(CONNECTION_RECEIVE_WINDOW.into())
            .keep_alive_interval(Some(KEEP_ALIVE))
            .max_idle_timeout(Some(IDLE_TIMEOUT.try_into().unwrap_or(quinn::VarInt::from_u32(30_000).into())));
        server_config.transport_config(Arc::new(transport));
        server_config.max_incoming(MAX_INCOMING).incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);

        let initial = match &config.initial_model {
            Some(path) => {
                let bytes = std::fs::read(path).map_err(io_err(format!("reading {}", path.display())))?;
                let is_st = path.extension().is_some_and(|e| e == "safetensors");
                let parsed =
                    if is_st { config.arch.from_safetensors(&bytes) } else { config.arch.from_raw_f32(&bytes) };
                parsed.map_err(|e| ServerError::InitialModel { path: path.clone(), message: e.to_string() })?
            }
            None => config.arch.init_params(config.seed),
        };
        let (mut state, recovered) = state::StateDir::open(&config.state_dir)?;
        let resumed = recovered.is_some();
        if let Some(r) = &recovered {
            check_run_config(&mut config, &state, &r.snapshot)?;
        } else {
            // Saved before the first snapshot: a run on disk always has it.
            state.save_config(&RunRecord::of(&config).to_bytes())?;
        }
        let kind = config.kind_settings(config.seed)?;
        // A private kind's noise is keyed by a secret that only this process
        // knows (clients know the run seed and could subtract noise derived
        // from it). A resumed run's saved seed, in the aggregator's durable
        // state, wins over the one drawn here.
        let noise_seed = match kind {
            tally_protocol::KindSettings::DpFtrl(_) | tally_protocol::KindSettings::FrlDp(_) => {
                match config.danger_insecure_noise_seed {
                    Some(v) => {
                        warn!("TALLY_INSECURE_NOISE_SEED is set: the DP noise seed is guessable and protects nothing");
                        Some(tally_protocol::dp::NoiseSeed::insecure_from_u64(v))
                    }
                    None => {
                        let mut bytes = [0u8; 32];
                        getrandom::fill(&mut bytes).map_err(|e| ServerError::Entropy(e.to_string()))?;
                        Some(tally_protocol::dp::NoiseSeed::from_bytes(bytes))
                    }
                }
            }
            _ => None,
        };
        let coordinator_config = CoordinatorConfig {
            run_id: config.run_id,
            arch: config.arch.clone(),
            rounds: config.rounds,
            enrolled: config.enrolled.clone(),
            min_clients: config.min_clients,
            clients_per_round: config.clients_per_round,
            quorum: config.quorum,
            round_timeout: config.round_timeout,
            train: config.train.clone(),
            // Resolved with the run's seed: a resumed run's saved seed wins
            // over a new default, so FRL's network and SPSA's directions are
            // the ones the run started with.
            kind,
            rule: config.rule,
            max_violations: config.max_violations,
            max_update_abs: config.max_update_abs,
            schedule: None,
            final_evaluation: config.final_evaluation,
            noise_seed,
        };
        let mut coordinator = match recovered {
            Some(r) => {
                info!(
                    dir = %config.state_dir.display(),
                    completed_rounds = r.snapshot.completed_rounds,
                    log_records = r.records.len(),
                    "resuming the run from saved state"
                );
                Coordinator::restore(coordinator_config, r.snapshot, &r.records, std::time::Instant::now())
                    .map_err(|source| ServerError::Restore { dir: config.state_dir.clone(), source })?
            }
            None => {
                let mut c = Coordinator::new(coordinator_config, initial, config.seed)?;
                c.enable_persistence();
                c
            }
        };
        if coordinator.phase() == tally_protocol::Phase::Finished && state.is_closed() {
            return Err(ServerError::AlreadyFinished {
                state_dir: config.state_dir.clone(),
                out_dir: config.out_dir.clone(),
                rounds: coordinator.completed_rounds(),
            });
        }
        // Persist what the coordinator produced while starting (a new run's
        // first snapshot).
        while let Some(p) = coordinator.poll_persist() {
            state.persist(&p)?;
        }
        let observer = observe::Observer::bind(config.rounds, config.metrics_listen)
            .map_err(io_err(format!("binding the metrics endpoint {:?}", config.metrics_listen)))?;
        let socket = std::net::UdpSocket::bind(config.listen).map_err(io_err(format!("binding {}", config.listen)))?;
        let endpoint =
            quinn::Endpoint::new(endpoint_config, Some(server_config), socket, Arc::new(quinn::TokioRuntime))
                .map_err(io_err(format!("binding {}", config.listen)))?;
        Ok(Server { config, endpoint, coordinator, fingerprint, state, resumed, observer })
    }

    /// The bound address (the real port when configured with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        self.endpoint.local_addr().map_err(io_err("local address"))
    }

    /// The metrics endpoint's address (the real port when configured with
    /// port 0), if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.observer.metrics_addr()
    }

    /// SHA-256 fingerprint of the certificate, for clients to pin.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Runs until the run finishes or `shutdown` resolves; writes the model
    /// and metrics either way.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<RunOutcome, ServerError> {
        let Server { config, endpoint, mut coordinator, mut state, resumed, mut observer, .. } = self;
        std::fs::create_dir_all(&config.out_dir).map_err(io_err(format!("creating {}", config.out_dir.display())))?;
        let metrics_path = config.out_dir.join("metrics.jsonl");
        let model_path = config.out_dir.join("final_model.safetensors");
        let pending_path = state.pending_metrics_path();
        let mut metrics = if resumed {
            MetricsWriter::resume(&metrics_path, &pending_path)?
        } else {
            MetricsWriter::create(&metrics_path, &pending_path)?
        };
        let mut accepted_total = 0u32;
        // The first failure to write an output: reported when the run ends
        // (after the clients were told), never a reason to strand them.
        let mut outputs_failed: Option<String> = None;
        if coordinator.phase() == tally_protocol::Phase::Finished {
            // Not closed (`bind` refuses closed runs): the server stopped
            // before its outputs were written or its clients told.
            warn!(dir = %config.state_dir.display(), "the saved run finished but was not closed: writing its outputs and telling its clients");
            // Written again: the last attempt may have failed.
            if let Err(e) = write_final_outputs(&coordinator, &mut metrics, &model_path) {
                error!(error = %e, "writing the run's outputs");
                outputs_failed.get_or_insert(e);
            }
        }
        info!(run_id = %config.run_id, rounds = config.rounds, min_clients = config.min_clients, "waiting for clients");

        let (tx, mut rx) = mpsc::channel::<Inbound>(INBOUND_CAPACITY);
        let admission = Admission::new(AdmissionLimits {
            max_connections: config.max_connections,
            max_pending: config.max_pending_connections,
            max_pending_per_source: config.max_pending_per_source,
        });
        observer.start(&coordinator, admission.clone()).map_err(io_err("serving metrics"))?;
        let acceptor = tokio::spawn(accept_loop(
            endpoint.clone(),
            tx,
            admission.clone(),
            config.handshake_timeout,
            coordinator.preparer(),
        ));
        // Connections that have not joined yet, and when they must have.
        let mut pending_join: HashMap<ConnectionHandle, Instant> = HashMap::new();
        // Per-connection read limits: handshake-sized until the client has
        // joined, so an unauthenticated peer can't make us buffer a model-sized
        // stream; the run's limit after.
        let mut limits: HashMap<ConnectionHandle, Arc<AtomicUsize>> = HashMap::new();
        // Admission tickets: a connection leaves the pending budget when it joins.
        let mut tickets: HashMap<ConnectionHandle, Arc<Ticket>> = HashMap::new();
        let mut writers: HashMap<ConnectionHandle, mpsc::UnboundedSender<Outbound>> = HashMap::new();
        let mut writer_tasks = tokio::task::JoinSet::new();
        let start = Instant::now();
        let std_start = std::time::Instant::now();
        // The coordinator works in std Instants; map tokio's clock onto them.
        let now = |t: Instant| std_start + (t - start);
        let mut finished = coordinator.phase() == tally_protocol::Phase::Finished;
        // After the end, keep answering for a while: a client that was
        // reconnecting when the run ended still learns it is over.
        let mut told: std::collections::BTreeSet<tally_protocol::ClientIndex> = Default::default();
        let enrolled = config.enrolled.len();
        let mut linger_until: Option<Instant> = finished.then(|| Instant::now() + FINISH_LINGER);
        tokio::pin!(shutdown);

        while linger_until.is_none_or(|t| Instant::now() < t) && told.len() < enrolled {
            // Deadlines are at most MAX_ROUND_TIMEOUT ahead, so the sum can't
            // overflow; `checked_add` keeps it a non-panicking path anyway.
            let deadline = linger_until.or_else(|| {
                coordinator.poll_timeout().and_then(|d| start.checked_add(d.saturating_duration_since(std_start)))
            });
            let deadline = match (deadline, pending_join.values().min().copied()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                _ = &mut shutdown => {
                    warn!("shutdown requested; writing the current model");
                    break;
                }
                msg = rx.recv() => match msg {
                    None => break,
                    Some(Inbound::Connected(conn, connection, read_limit, ticket)) => {
                        observer.connected(conn, connection.remote_address());
                        limits.insert(conn, read_limit);
                        tickets.insert(conn, ticket);
                        pending_join.insert(conn, Instant::now() + config.join_timeout);
                        let (otx, orx) = mpsc::unbounded_channel();
                        writers.insert(conn, otx);
                        writer_tasks.spawn(writer(connection, orx, observer.registry()));
                        // A fresh, unpredictable challenge per connection.
                        let mut challenge = [0u8; 32];
                        if let Err(e) = getrandom::fill(&mut challenge) {
                            warn!(error = %e, "no OS randomness for a join challenge; refusing the connection");
                            writers.remove(&conn);
                            continue;
                        }
                        coordinator.handle_connect(now(Instant::now()), conn, challenge);
                    }
                    Some(Inbound::Message(conn, prepared, reservation)) => {
                        observer.received(prepared.len());
                        if let Err(e) = coordinator.handle_prepared(now(Instant::now()), conn, *prepared) {
                            debug!(conn = conn.0, error = %e, "message refused");
                        }
                        drop(reservation);
                        // Raise the limit before the Welcome goes out: the
                        // client's next stream follows it.
                        if coordinator.client_of(conn).is_some() {
                            pending_join.remove(&conn);
                            if let Some(l) = limits.get(&conn) {
                                l.store(coordinator.max_message_bytes_of(conn), Ordering::Relaxed);
                            }
                            if let Some(t) = tickets.get(&conn) {
                                t.joined();
                            }
                        }
                    }
                    Some(Inbound::Oversize(conn, len)) => {
                        coordinator.handle_oversize(now(Instant::now()), conn, len);
                    }
                    Some(Inbound::Closed(conn)) => {
                        observer.disconnected(conn);
                        writers.remove(&conn);
                        limits.remove(&conn);
                        tickets.remove(&conn);
                        pending_join.remove(&conn);
                        coordinator.handle_disconnect(now(Instant::now()), conn);
                    }
                },
                _ = sleep_until_opt(deadline) => {
                    let t = Instant::now();
                    // Connections that did not join in time hold a slot for
                    // nothing: close them.
                    let late: Vec<ConnectionHandle> =
                        pending_join.iter().filter(|(_, d)| **d <= t).map(|(c, _)| *c).collect();
                    for conn in late {
                        pending_join.remove(&conn);
                        debug!(conn = conn.0, "no join in time; closing");
                        if let Some(w) = writers.remove(&conn) {
                            let _ = w.send(Outbound::Close(RejectCode::Unexpected));
                        }
                        coordinator.handle_disconnect(now(t), conn);
                    }
                    if linger_until.is_none() {
                        coordinator.handle_timeout(now(t));
                    }
                }
            }
            let events: Vec<Event> = std::iter::from_fn(|| coordinator.poll_event()).collect();
            // Outputs before durability, and before anything is sent: a
            // closed round's metrics reach the disk before the snapshot that
            // closes it (after a crash, either the rows are there or the
            // round is redone and writes them), and the final model before
            // the first `Finished` leaves.
            for event in &events {
                let written = match event {
                    Event::RoundCompleted(summary) => metrics
                        .record(summary, std_start.elapsed().as_secs_f64())
                        .map_err(|e| format!("writing metrics: {e}")),
                    Event::Finished { .. } => write_final_outputs(&coordinator, &mut metrics, &model_path),
                    _ => Ok(()),
                };
                if let Err(e) = written {
                    error!(error = %e, "writing the run's outputs; the run goes on");
                    outputs_failed.get_or_insert(e);
                }
            }
            // Durable before sent: every record and snapshot produced by this
            // input reaches the disk before its Acks and round messages leave.
            while let Some(p) = coordinator.poll_persist() {
                let persist_started = std::time::Instant::now();
                state.persist(&p)?;
                observer.persisted(&p, persist_started.elapsed());
                if let Some(fault) = config.danger_fault {
                    use tally_protocol::durable::{Persist, Record};
                    let hit = match (&p, fault) {
                        (Persist::Append(Record::RoundOpened { round, .. }), config::FaultPoint::Opened(n)) => {
                            *round == n
                        }
                        (Persist::Append(Record::Accepted { .. }), config::FaultPoint::Accepted(n)) => {
                            accepted_total += 1;
                            accepted_total == n
                        }
                        (Persist::Append(Record::Accepted { body, .. }), config::FaultPoint::Report { round, nth }) => {
                            let of_round = tally_protocol::codec::decode_report(body).is_ok_and(|r| r.round == round);
                            accepted_total += u32::from(of_round);
                            of_round && accepted_total == nth
                        }
                        (Persist::Snapshot(s), config::FaultPoint::Closed(n)) => s.completed_rounds == n,
                        _ => false,
                    };
                    if hit {
                        eprintln!("TALLY_FAULT {fault:?}: aborting");
                        std::process::abort();
                    }
                }
            }
            // After durability: a scrape never shows a round closed whose
            // snapshot isn't written yet.
            observer.events(&events, &coordinator);
            while let Some(t) = coordinator.poll_transmit() {
                if let Some(w) = writers.get(&t.to) {
                    // A closed writer means the connection is gone; the
                    // reader reports that separately.
                    let _ = w.send(Outbound::Send(t.bytes));
                }
            }
            for event in &events {
                match event {
                    Event::ClientJoined { conn, client } => info!(conn = conn.0, client, "client joined"),
                    Event::RoundOpened { round, task, sampled } => {
                        info!(round, ?task, clients = sampled.len(), "round opened")
                    }
                    Event::ReportAccepted { round, client } => debug!(round, client, "report accepted"),
                    Event::TrainingFailed { round, client } => {
                        warn!(round, client, "client reports that its local training failed; no update from it")
                    }
                    Event::Rejected { conn, client, error } => {
                        warn!(conn = conn.0, ?client, %error, "message rejected")
                    }
                    Event::RoundExtended { round, accepted, quorum, waiting, added } => {
                        if !added.is_empty() {
                            info!(round, accepted, quorum, waiting, added = ?added, "round short of its quorum: asked more clients")
                        } else if *waiting > 0 {
                            warn!(
                                round,
                                accepted,
                                quorum,
                                waiting,
                                "round short of its quorum at its deadline; waiting for the clients still training"
                            )
                        } else {
                            warn!(
                                round,
                                accepted,
                                quorum,
                                "round short of its quorum and nobody left to ask; waiting for clients to join (they join the round at once)"
                            )
                        }
                    }
                    Event::RoundCompleted(summary) => {
                        info!(
                            round = summary.round,
                            accepted = summary.accepted,
                            failed = summary.failed,
                            rejected = summary.rejected,
                            train_loss = summary.stats.as_ref().map(|s| s.train_loss),
                            dp_epsilon_spent = summary.stats.as_ref().and_then(|s| s.privacy).map(|p| p.epsilon),
                            dp_rho_spent = summary.stats.as_ref().and_then(|s| s.privacy).map(|p| p.rho),
                            incoming_accuracy = summary.eval_of_incoming.map(|e| e.accuracy()),
                            "round completed{}",
                            observer.took(summary.round).map_or(String::new(), |t| format!(" in {t}"))
                        );
                    }
                    Event::CloseConnection { conn, reason } => {
                        if let Some(w) = writers.remove(conn) {
                            let _ = w.send(Outbound::Close(*reason));
                        }
                    }
                    Event::Finished { rounds, .. } => {
                        info!(rounds, "run finished");
                        finished = true;
                        linger_until = Some(Instant::now() + FINISH_LINGER);
                    }
                    Event::FinishSent { client } => {
                        told.insert(*client);
                    }
                }
            }
        }

        if !finished {
            // Interrupted: the current model, for inspection. The newest
            // metrics row stays pending: its evaluation comes when the run
            // resumes.
            if let Err(e) = write_model(&coordinator, &model_path) {
                error!(error = %e, "writing the current model");
                outputs_failed.get_or_insert(e);
            }
            if let Err(e) = metrics.write_csv() {
                warn!(error = %e, "writing metrics.csv");
            }
        }
        // Only a model the clients evaluated has an accuracy: the final one
        // when the run held its final evaluation round; otherwise the last
        // figure is of an earlier model, and is not reported as final.
        let final_accuracy = (finished && config.final_evaluation).then(|| metrics.last_accuracy()).flatten();
        let summary = run_summary(&config, &coordinator, finished, final_accuracy, std_start.elapsed().as_secs_f64());
        if let Err(e) = write_atomic(&config.out_dir.join("summary.json"), summary.as_bytes()) {
            warn!(error = %e, "writing summary.json");
        }

        // Let writers deliver what is queued (the Finished message), then close.
        drop(writers);
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, async { while writer_tasks.join_next().await.is_some() {} }).await;
        acceptor.abort();
        log_turned_away(&admission);
        endpoint.close(0u32.into(), b"run over");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        if let Some(message) = outputs_failed {
            return Err(ServerError::Outputs { message, state_dir: config.state_dir.clone() });
        }
        if finished {
            // Outputs written and clients told (or given FINISH_LINGER to
            // hear it): a later start on this directory is refused.
            let summary = format!("{{\"rounds\":{}}}\n", coordinator.completed_rounds());
            if let Err(e) = state.mark_closed(summary.as_bytes()) {
                warn!(error = %e, "could not mark the finished run closed; a restart on its state will linger again");
            }
        }
        Ok(RunOutcome {
            rounds_completed: coordinator.completed_rounds(),
            finished,
            model_path,
            metrics_path,
            final_accuracy,
        })
    }
}

/// `summary.json` beside the metrics: what the run was (its configuration
/// as saved in the state directory), how far it got, its final model's
/// hash, and the metrics schema its files follow.
fn run_summary(
    config: &ServerConfig,
    coordinator: &Coordinator,
    finished: bool,
    final_accuracy: Option<f64>,
    wall_secs: f64,
) -> String {
    let summary = serde_json::json!({
        "metrics_schema": tally_protocol::metrics::SCHEMA_VERSION,
        "tool": "tally-server",
        "version": env!("CARGO_PKG_VERSION"),
        "finished": finished,
        "rounds_completed": coordinator.completed_rounds(),
        "final_model_hash": hex::encode(tally_protocol::identity::params_hash(coordinator.model())),
        "final_accuracy": final_accuracy,
        // This process's time: a resumed run counts from its restart.
        "wall_secs": wall_secs,
        "config": serde_json::to_value(config::RunRecord::of(config)).unwrap_or_default(),
        "files": { "metrics": "metrics.jsonl", "metrics_csv": "metrics.csv", "model": "final_model.safetensors" },
    });
    format!("{summary:#}\n")
}

/// Checks a resumed run's configuration against the one it started with
/// (`run.json`): unconfigured seed and run id take the saved ones; any other
/// change is refused with what changed, unless the operator accepts it
/// (`--danger-accept-config-change`, then the new configuration is saved);
/// the seed and the run id can't change at all.
fn check_run_config(
    config: &mut ServerConfig,
    state: &state::StateDir,
    snapshot: &tally_protocol::durable::Snapshot,
) -> Result<(), ServerError> {
    let dir = state.dir().to_path_buf();
    let Some(bytes) = state.saved_config()? else {
        // A run saved by a build that did not record its configuration.
        if !config.danger_accept_config_change {
            return Err(ServerError::ConfigChanged {
                dir,
                changes: vec!["the saved run has no record of its configuration (run.json)".into()],
                hint: "restart with the configuration it was started with and --danger-accept-config-change to record it",
            });
        }
        config.run_id = snapshot.run_id;
        config.seed = snapshot.rng_seed;
        warn!(dir = %dir.display(), "recording the current configuration for a saved run that had none");
        state.save_config(&RunRecord::of(config).to_bytes())?;
        return Ok(());
    };
    let saved = RunRecord::from_bytes(&bytes).map_err(|reason| state::StateError::Corrupted {
        path: dir.join("run.json"),
        reason: format!("not a run record: {reason}"),
    })?;
    // The saved run's identity wins over defaults drawn at random.
    if !config.seed_configured {
        config.seed = saved.seed;
    }
    if !config.run_id_configured {
        config.run_id =
            saved.run_id().map_err(|reason| state::StateError::Corrupted { path: dir.join("run.json"), reason })?;
    }
    let changes = RunRecord::of(config).changes_from(&saved);
    if changes.is_empty() {
        return Ok(());
    }
    let listed = changes.iter().map(ToString::to_string).collect();
    if changes.iter().any(config::Change::is_identity) {
        return Err(ServerError::ConfigChanged {
            dir,
            changes: listed,
            hint: "the seed and the run id can't change during a run; drop them or give the saved values",
        });
    }
    if !config.danger_accept_config_change {
        return Err(ServerError::ConfigChanged {
            dir,
            changes: listed,
            hint: "restart with the saved values, or accept the change for the rest of the run with \
                   --danger-accept-config-change (the result is then no longer that of one configuration)",
        });
    }
    warn!(dir = %dir.display(), changes = ?listed, "resuming with a changed configuration, as asked");
    state.save_config(&RunRecord::of(config).to_bytes())?;
    Ok(())
}

/// Writes the model as `final_model.safetensors` (atomically), with the
/// run in its header (`tally_protocol::model_file`); an FRL run's also as
/// `final_model_dense.safetensors`, its masked network as plain weights.
fn write_model(coordinator: &Coordinator, path: &std::path::Path) -> Result<(), String> {
    use tally_protocol::model_file::{ModelMeta, dense_path, write_frl_dense_file, write_model_file};
    let meta = ModelMeta::of_run(&coordinator.run_config(), coordinator.completed_rounds());
    let model = coordinator.model();
    let bytes = write_model_file(&meta, model).map_err(|e| format!("{}: {e}", path.display()))?;
    write_atomic(path, &bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
    if meta.has_dense_export() {
        let dense = dense_path(path);
        let bytes = write_frl_dense_file(&meta, model).map_err(|e| format!("{}: {e}", dense.display()))?;
        write_atomic(&dense, &bytes).map_err(|e| format!("writing {}: {e}", dense.display()))?;
    }
    Ok(())
}

/// A finished run's outputs: its last metrics row, then the final model.
fn write_final_outputs(
    coordinator: &Coordinator,
    metrics: &mut MetricsWriter,
    model_path: &std::path::Path,
) -> Result<(), String> {
    let rows = metrics.finish().map_err(|e| format!("writing metrics: {e}"));
    let model = write_model(coordinator, model_path);
    rows.and(model)
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Logs what admission turned away since the last summary, if anything.
fn log_turned_away(admission: &Admission) {
    let t = admission.take_turned_away();
    if t.is_empty() {
        return;
    }
    let (connections, pending) = admission.load();
    warn!(
        retries = t.retried,
        refused_max_connections = t.refused_total,
        refused_max_pending = t.refused_pending,
        refused_per_source = t.refused_per_source,
        handshake_timeouts = t.handshake_timeouts,
        connections,
        pending,
        "unauthenticated load since the last summary"
    );
}

/// Admits connections by the policy of [`admission`]: a Retry for every
/// unvalidated source address, then the connection budgets, then a
/// handshake deadline; each admitted connection gets a reader task.
async fn accept_loop(
    endpoint: quinn::Endpoint,
    tx: mpsc::Sender<Inbound>,
    admission: Arc<Admission>,
    handshake_timeout: Duration,
    preparer: tally_protocol::Preparer,
) {
    let mut next_id = 0u64;
    let budget = Arc::new(tokio::sync::Semaphore::new(MAX_INBOUND_BYTES_IN_FLIGHT));
    let mut summary = tokio::time::interval(ADMISSION_LOG_INTERVAL);
    summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
            _ = summary.tick() => {
                log_turned_away(&admission);
                continue;
            }
        };
        if !incoming.remote_address_validated() {
            // No state for a source that hasn't shown it receives at its
            // address: a Retry token to echo, nothing allocated.
            admission.note_retry();
            if let Err(e) = incoming.retry() {
                // quinn: an unvalidated attempt may always be retried. Were
                // that to change, refuse rather than admit it unvalidated.
                e.into_incoming().refuse();
            }
            continue;
        }
        let ticket = match admission.try_admit(incoming.remote_address().ip()) {
            Ok(t) => t,
            Err(refusal) => {
                debug!(remote = %incoming.remote_address(), ?refusal, "admission limit reached; refusing");
                incoming.refuse();
                continue;
            }
        };
        let id = ConnectionHandle(next_id);
        next_id += 1;
        let tx = tx.clone();
        let budget = budget.clone();
        let admission = admission.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let connecting = match incoming.accept() {
                Ok(c) => c,
                Err(e) => {
                    debug!(%remote, error = %e, "connection not accepted");
                    return;
                }
            };
            // Dropping an unfinished `Connecting` closes the connection.
            let connection = match tokio::time::timeout(handshake_timeout, connecting).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    debug!(%remote, error = %e, "handshake failed");
                    return;
                }
                Err(_) => {
                    admission.note_handshake_timeout();
                    debug!(%remote, "no handshake within the deadline; closing");
                    return;
                }
            };
            debug!(conn = id.0, %remote, "connected");
            let limit = Arc::new(AtomicUsize::new(tally_protocol::wire::MAX_HANDSHAKE_BYTES));
            if tx.send(Inbound::Connected(id, connection.clone(), limit.clone(), ticket.clone())).await.is_err() {
                return;
            }
            reader(id, connection, tx, limit, budget, preparer).await;
            // This task's share of the ticket (an early return drops it
            // too): the slot is free once the driver has let go as well.
            drop(ticket);
        });
    }
}

/// Reads one message per unidirectional stream, in stream order.
async fn reader(
    id: ConnectionHandle,
    connection: quinn::Connection,
    tx: mpsc::Sender<Inbound>,
    limit: Arc<AtomicUsize>,
    budget: Arc<tokio::sync::Semaphore>,
    preparer: tally_protocol::Preparer,
) {
    loop {
        let mut recv = match connection.accept_uni().await {
            Ok(r) => r,
            Err(e) => {
                debug!(conn = id.0, error = %e, "connection closed");
                let _ = tx.send(Inbound::Closed(id)).await;
                return;
            }
        };
        let limit = limit.load(Ordering::Relaxed);
        // Reserve the worst case before reading: the stream's size is only
        // known once it is read. Limits are below the budget (the largest
        // message is 64 MiB), and the semaphore is never closed.
        let want = u32::try_from(limit.min(MAX_INBOUND_BYTES_IN_FLIGHT)).unwrap_or(u32::MAX);
        let Ok(reservation) = budget.clone().acquire_many_owned(want).await else {
            return;
        };
        let inbound = match recv.read_to_end(limit).await {
            // Decoding and digesting here runs on this connection's task,
            // in parallel with other connections, off the driver's loop.
            Ok(bytes) => Inbound::Message(id, Box::new(preparer.prepare(&bytes)), reservation),
            Err(quinn::ReadToEndError::TooLong) => {
                // Tell the peer to stop sending; we won't buffer the rest.
                let _ = recv.stop(1u32.into());
                Inbound::Oversize(id, limit + 1)
            }
            Err(quinn::ReadToEndError::Read(e)) => {
                debug!(conn = id.0, error = %e, "stream aborted");
                continue;
            }
        };
        if tx.send(inbound).await.is_err() {
            return;
        }
    }
}

/// Writes one message per stream, in queue order; closes on request or when
/// the driver drops the queue (after the last stream is read).
async fn writer(
    connection: quinn::Connection,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    registry: Arc<observe::Registry>,
) {
    let mut last: Option<quinn::SendStream> = None;
    let mut reason = (0u32, "run over");
    while let Some(out) = rx.recv().await {
        match out {
            Outbound::Send(bytes) => {
                let Ok(mut stream) = connection.open_uni().await else {
                    return;
                };
                if stream.write_all(&bytes).await.is_err() || stream.finish().is_err() {
                    return;
                }
                registry.sent(bytes.len());
                last = Some(stream);
            }
            Outbound::Close(code) => {
                reason = (code as u32 + 1, "closed by server");
                break;
            }
        }
    }
    if let Some(stream) = last {
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, stream.stopped()).await;
    }
    connection.close(reason.0.into(), reason.1.as_bytes());
}

/// Writes a file atomically and durably: temp file, fsync, rename, fsync of
/// the directory (clients are told the run is over once it returns).
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}
