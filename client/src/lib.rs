//! `tally-client`: a federated-learning client for edge devices.
//!
//! A thin tokio/quinn driver around [`tally_protocol::Participant`]: it
//! connects to the server over QUIC (TLS 1.3, server certificate pinned or
//! checked against a CA file), reads one message per unidirectional stream,
//! runs the requested local training or evaluation with `tally-kernels` on a
//! blocking thread, and sends the signed report. When the connection drops it
//! reconnects with exponential backoff; the server re-sends an unfinished task.
//!
//! It never depends on server code, and it never decides protocol questions:
//! those live in the participant state machine.
//!
//! What the server sends can't make it exit: when local training diverges
//! on the model it was sent (a model ruined by a poisoned round), it answers
//! with the protocol's "training failed" report
//! ([`Participant::submit_failure`]) and takes the next round; a report that
//! arrives after its round closed is refused as `Late`, which is not fatal.
//! It exits with an error only for what the protocol calls fatal
//! ([`RejectCode::is_fatal`]), for a server that breaks the protocol (a
//! typed [`ClientError::Protocol`]), and for local faults (data, backend).

pub mod config;
pub mod keys;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tally_kernels::{Dataset, Device};
use tally_protocol::error::Misbehaviour;
use tally_protocol::model::ModelArch;
use tally_protocol::wire::{ClientUpdate, EvalReport, RejectCode, RunConfig, Task};
use tally_protocol::{Identity, Participant, ParticipantEvent};
use tracing::{debug, info, warn};

pub use tls::ServerTrust;

/// Concurrent unidirectional streams the server may open to us; it sends one
/// message at a time.
pub const MAX_CONCURRENT_UNI_STREAMS: u32 = 4;

/// Keep-alive interval: keeps NAT mappings and the connection alive while we
/// train for minutes without sending.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Evaluation batch size: only memory depends on it.
const EVAL_BATCH: usize = 1000;

/// Refusals kept in [`ClientOutcome::rejections`]. Each is one server
/// message; a hostile server could send them without end, so later ones are
/// logged but not kept.
pub const MAX_RECORDED_REJECTIONS: usize = 1024;

/// Errors that end the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TLS configuration.
    #[error(transparent)]
    Trust(#[from] tls::TrustError),
    /// Local socket.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The server refused us for good.
    #[error("server refused us: {code:?}: {detail}")]
    Refused {
        /// Why.
        code: RejectCode,
        /// Server's explanation.
        detail: String,
    },
    /// The server broke the protocol.
    #[error("protocol error from server: {0}")]
    Protocol(#[from] tally_protocol::Error),
    /// Local training failed.
    #[error("local training: {0}")]
    Kernel(#[from] tally_kernels::KernelError),
    /// The server's certificate is not the pinned one: retrying can't help.
    #[error(
        "the server presented a certificate with fingerprint {}, expected {} (--fingerprint)",
        hex::encode(presented),
        hex::encode(expected)
    )]
    FingerprintMismatch {
        /// The pinned fingerprint.
        expected: [u8; 32],
        /// The server's.
        presented: [u8; 32],
    },
    /// Stopped by the operator (Ctrl-C or SIGTERM, [`run_until`]): we left
    /// the run, and the server goes on without us.
    #[error("stopped by a signal; left the run (the server goes on without this client)")]
    Stopped,
    /// Reconnection attempts exhausted.
    #[error("gave up after {attempts} connection attempts; last error: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Last failure.
        last: String,
    },
}

/// How to run a client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Server address.
    pub server: SocketAddr,
    /// Name expected in the server certificate (CA mode).
    pub server_name: String,
    /// What to trust.
    pub trust: ServerTrust,
    /// Our identity.
    pub identity: Identity,
    /// Local training data.
    pub train: Dataset,
    /// Local evaluation data, if any.
    pub eval: Option<Dataset>,
    /// Where local work runs (CPU or GPU, [`tally_kernels::Compute::open`]);
    /// on a GPU, replicated rounds are applied there too.
    pub compute: tally_kernels::Compute,
    /// Consecutive failed connection attempts before giving up.
    pub max_retries: u32,
    /// First reconnection delay; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Largest reconnection delay.
    pub max_backoff: Duration,
    /// Where to write the final model (safetensors), if anywhere.
    pub save_model: Option<PathBuf>,
    /// How long one connection attempt (QUIC + TLS handshake) may take
    /// before it counts as failed and we back off.
    pub connect_timeout: Duration,
}

/// What a finished client saw.
#[derive(Debug, Clone, Default)]
pub struct ClientOutcome {
    /// Rounds the run completed.
    pub rounds: u32,
    /// Hash of the final model announced by the server.
    pub model_hash: [u8; 32],
    /// Our evaluation of the last model we received.
    pub last_eval: Option<EvalReport>,
    /// Rounds we trained in.
    pub rounds_trained: u32,
    /// Rounds whose local training failed (diverged) and that we answered
    /// with a failure report instead of an update.
    pub rounds_failed: u32,
    /// Refusals the server sent us (the first [`MAX_RECORDED_REJECTIONS`]).
    pub rejections: Vec<(RejectCode, String)>,
}

enum SessionEnd {
    Fatal(ClientError),
    Retry(String),
}

/// Connects a QUIC endpoint to `server` and returns the connection.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, String> {
    let connecting = endpoint.connect(server, server_name).map_err(|e| e.to_string())?;
    connecting.await.map_err(|e| e.to_string())
}

/// A client endpoint on an ephemeral port of the server's address family.
pub fn endpoint(server: SocketAddr, trust: &ServerTrust) -> Result<quinn::Endpoint, ClientError> {
    endpoint_observed(server, trust, &tls::PinnedMismatch::default())
}

/// [`endpoint`] whose pinned-certificate check records a mismatch in `seen`.
fn endpoint_observed(
    server: SocketAddr,
    trust: &ServerTrust,
    seen: &tls::PinnedMismatch,
) -> Result<quinn::Endpoint, ClientError> {
    let bind: SocketAddr = if server.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut ep = quinn::Endpoint::client(bind)?;
    ep.set_default_client_config(tls::quic_client_config_observed(trust, seen)?);
    Ok(ep)
}

/// Sends one message on a new unidirectional stream.
pub async fn send_message(conn: &quinn::Connection, bytes: &[u8]) -> Result<(), String> {
    let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
    s.write_all(bytes).await.map_err(|e| e.to_string())?;
    s.finish().map_err(|e| e.to_string())?;
    Ok(())
}

/// Why [`recv_message`] returned no message.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The stream was longer than the limit: the peer broke the protocol
    /// (reconnecting would only get the same message again).
    #[error("a message longer than the limit of {limit} bytes")]
    Oversize {
        /// The limit.
        limit: usize,
    },
    /// The connection or the stream failed.
    #[error("{0}")]
    Lost(String),
}

/// Reads the next message (one unidirectional stream) under `limit` bytes.
pub async fn recv_message(conn: &quinn::Connection, limit: usize) -> Result<Vec<u8>, RecvError> {
    let mut r = conn.accept_uni().await.map_err(|e| RecvError::Lost(e.to_string()))?;
    r.read_to_end(limit).await.map_err(|e| match e {
        quinn::ReadToEndError::TooLong => RecvError::Oversize { limit },
        other => RecvError::Lost(other.to_string()),
    })
}

/// Runs the client until the server finishes the run.
pub async fn run(opts: ClientOptions) -> Result<ClientOutcome, ClientError> {
    run_until(opts, std::future::pending()).await
}

/// [`run`], or until `shutdown` completes: then the client leaves at once,
/// closing its connection so the server stops waiting for it now rather
/// than at its idle timeout, and returns [`ClientError::Stopped`]. A local
/// training step in progress is abandoned (its thread is not waited for).
pub async fn run_until(
    opts: ClientOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<ClientOutcome, ClientError> {
    let pin = tls::PinnedMismatch::default();
    let endpoint = endpoint_observed(opts.server, &opts.trust, &pin)?;
    tokio::select! {
        result = run_sessions(&endpoint, &opts, &pin) => result,
        () = shutdown => {
            info!("stopping: leaving the run");
            endpoint.close(0u32.into(), b"leaving");
            // Long enough for the close to reach the server, bounded.
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
            Err(ClientError::Stopped)
        }
    }
}

async fn run_sessions(
    endpoint: &quinn::Endpoint,
    opts: &ClientOptions,
    pin: &tls::PinnedMismatch,
) -> Result<ClientOutcome, ClientError> {
    let mut failures = 0u32;
    let mut backoff = opts.initial_backoff;
    let mut outcome = ClientOutcome::default();
    loop {
        let mut joined = false;
        match session(endpoint, opts, &mut outcome, &mut joined).await {
            Ok(()) => {
                endpoint.close(0u32.into(), b"done");
                let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
                return Ok(outcome);
            }
            Err(SessionEnd::Fatal(e)) => return Err(e),
            Err(SessionEnd::Retry(why)) => {
                if let (ServerTrust::Fingerprint(expected), Some(presented)) = (&opts.trust, pin.presented()) {
                    return Err(ClientError::FingerprintMismatch { expected: *expected, presented });
                }
                if joined {
                    failures = 0;
                    backoff = opts.initial_backoff;
                }
                failures = failures.saturating_add(1);
                if failures > opts.max_retries {
                    return Err(ClientError::GaveUp { attempts: failures, last: why });
                }
                warn!(attempt = failures, delay_ms = backoff.as_millis() as u64, reason = %why, "reconnecting");
                tokio::time::sleep(backoff).await;
                backoff = next_backoff(backoff, opts.max_backoff);
            }
        }
    }
}

/// The delay after `current`: doubled, at most `max`. Saturating, because
/// `Duration * 2` panics on overflow and the options may hold any duration.
pub fn next_backoff(current: Duration, max: Duration) -> Duration {
    current.saturating_mul(2).min(max)
}

async fn session(
    endpoint: &quinn::Endpoint,
    opts: &ClientOptions,
    outcome: &mut ClientOutcome,
    joined: &mut bool,
) -> Result<(), SessionEnd> {
    let conn = tokio::time::timeout(opts.connect_timeout, connect(endpoint, opts.server, &opts.server_name))
        .await
        .map_err(|_| SessionEnd::Retry(format!("no handshake within {:?}", opts.connect_timeout)))?
        .map_err(SessionEnd::Retry)?;
    info!(server = %opts.server, "connected");
    let mut p = Participant::new(opts.identity.clone(), None).with_applier(opts.compute.applier());
    let mut last_model: Option<Vec<f32>> = None;
    loop {
        let bytes = match recv_message(&conn, p.max_message_bytes()).await {
            Ok(b) => b,
            // A server that sends more than the run's limit is hostile or
            // broken: a typed protocol error, not a reconnection loop.
            Err(RecvError::Oversize { limit }) => {
                conn.close(0u32.into(), b"oversize");
                let len = limit.saturating_add(1);
                let err = tally_protocol::Error::Malformed(tally_protocol::error::Malformed::Oversize { len, limit });
                return Err(SessionEnd::Fatal(err.into()));
            }
            Err(RecvError::Lost(e)) => return Err(SessionEnd::Retry(format!("connection lost: {e}"))),
        };
        match p.handle_message(Instant::now(), &bytes) {
            Ok(()) => {}
            // Our replica fell out of step (a lost log, or a bit flip): a new
            // session starts from the server's checkpoint.
            Err(
                e @ tally_protocol::Error::Misbehaving(
                    Misbehaviour::ReplicaMismatch { .. } | Misbehaviour::OutOfOrderLog { .. },
                ),
            ) => {
                warn!(error = %e, "replica out of sync; reconnecting for a fresh checkpoint");
                conn.close(0u32.into(), b"resync");
                return Err(SessionEnd::Retry(e.to_string()));
            }
            Err(e) => {
                conn.close(0u32.into(), b"protocol error");
                return Err(SessionEnd::Fatal(e.into()));
            }
        }
        while let Some(event) = p.poll_event() {
            match event {
                ParticipantEvent::Joined { client_id, config } => {
                    *joined = true;
                    info!(client_id, run_id = %config.run_id, rounds = config.rounds, "joined");
                }
                ParticipantEvent::TaskRequested { round, task, seed, model } => {
                    let Some(config) = p.run_config().cloned() else {
                        return Err(SessionEnd::Fatal(ClientError::Protocol(
                            tally_protocol::error::Misuse::NoPendingTask.into(),
                        )));
                    };
                    let client_id = p.client_id().unwrap_or(0);
                    let started = Instant::now();
                    let job = {
                        let (train, eval, device) =
                            (opts.train.clone(), opts.eval.clone(), opts.compute.device.clone());
                        let model = model.clone();
                        move || do_task(&config, client_id, round, seed, task, &model, &train, eval.as_ref(), &device)
                    };
                    let TaskDone { eval, training } = tokio::task::spawn_blocking(job)
                        .await
                        .map_err(|e| SessionEnd::Fatal(ClientError::Io(std::io::Error::other(e.to_string()))))?
                        .map_err(|e| SessionEnd::Fatal(e.into()))?;
                    let secs = started.elapsed().as_secs_f32();
                    outcome.last_eval = eval.or(outcome.last_eval);
                    last_model = Some(model);
                    let submitted = match training {
                        Training::Skipped => {
                            info!(round, ?task, secs, accuracy = eval.map(|e| e.accuracy()), "task done");
                            p.submit(Instant::now(), eval, None)
                        }
                        Training::Done(update) => {
                            let train_loss = update.train_loss;
                            info!(round, ?task, secs, accuracy = eval.map(|e| e.accuracy()), train_loss, "task done");
                            outcome.rounds_trained = outcome.rounds_trained.saturating_add(1);
                            p.submit(Instant::now(), eval, Some(update))
                        }
                        Training::Diverged(error) => {
                            // The model we were sent can't be trained (a
                            // poisoned round, or a learning rate too high for
                            // our data): say so, and take the next round.
                            warn!(round, secs, %error, "local training failed; reporting it and carrying on");
                            outcome.rounds_failed = outcome.rounds_failed.saturating_add(1);
                            p.submit_failure(Instant::now(), eval)
                        }
                    };
                    submitted.map_err(|e| SessionEnd::Fatal(e.into()))?;
                }
                ParticipantEvent::Accepted { round } => debug!(round, "report accepted"),
                ParticipantEvent::Synced { round } => debug!(round, "replica in sync"),
                ParticipantEvent::Rejected { code, round, detail } => {
                    warn!(?code, ?round, %detail, "server rejected a message");
                    if outcome.rejections.len() < MAX_RECORDED_REJECTIONS {
                        outcome.rejections.push((code, detail.clone()));
                    }
                    // Which codes end the session is the protocol's decision.
                    if code.is_fatal() {
                        return Err(SessionEnd::Fatal(ClientError::Refused { code, detail }));
                    }
                }
                ParticipantEvent::Finished { rounds, model_hash } => {
                    outcome.rounds = rounds;
                    outcome.model_hash = model_hash;
                    info!(rounds, model_hash = %hex::encode(model_hash), "run finished");
                    save_final(opts, p.run_config(), last_model.as_deref(), rounds, model_hash);
                    conn.close(0u32.into(), b"bye");
                    return Ok(());
                }
            }
        }
        while let Some(frame) = p.poll_transmit() {
            send_message(&conn, &frame).await.map_err(|e| SessionEnd::Retry(format!("send failed: {e}")))?;
        }
    }
}

fn save_final(opts: &ClientOptions, run: Option<&RunConfig>, model: Option<&[f32]>, rounds: u32, hash: [u8; 32]) {
    let (Some(path), Some(run), Some(model)) = (&opts.save_model, run, model) else {
        return;
    };
    if tally_protocol::identity::params_hash(model) != hash {
        warn!("the last model we received is not the final one; not saving it");
        return;
    }
    // The file says what it holds (tally_protocol::model_file); an FRL
    // model also gets its dense export next to it.
    let meta = tally_protocol::model_file::ModelMeta::of_run(run, rounds);
    match tally_kernels::params_file::save_model(path, &meta, model) {
        Ok(()) => info!(path = %path.display(), "final model saved"),
        Err(e) => warn!(error = %e, "could not save the final model"),
    }
    if meta.has_dense_export() {
        let dense = tally_protocol::model_file::dense_path(path);
        match tally_kernels::params_file::save_frl_dense(&dense, &meta, model) {
            Ok(()) => info!(path = %dense.display(), "dense export of the final model saved"),
            Err(e) => warn!(error = %e, "could not save the dense export of the final model"),
        }
    }
}

/// What [`do_task`] did.
#[derive(Debug)]
pub struct TaskDone {
    /// Our evaluation of the received model, if we have evaluation data.
    pub eval: Option<EvalReport>,
    /// The training part.
    pub training: Training,
}

/// The training part of a task.
#[derive(Debug)]
pub enum Training {
    /// An evaluation task: nothing to train.
    Skipped,
    /// The update to send.
    Done(ClientUpdate),
    /// The loss became NaN or infinite ([`tally_kernels::KernelError::Diverged`]):
    /// the model we were sent can't be trained. Not a reason to exit.
    Diverged(tally_kernels::KernelError),
}

/// Evaluates `model` on `eval` (if any) and, for a training task, does the
/// round's local work ([`tally_kernels::update::local_update`]). Training that
/// diverges is a result ([`Training::Diverged`]), not an error; other errors
/// are local faults (data, backend).
#[allow(clippy::too_many_arguments, reason = "the task's inputs, one to one")]
pub fn do_task(
    run: &RunConfig,
    client_id: u32,
    round: u32,
    round_seed: u64,
    task: Task,
    model: &[f32],
    train: &Dataset,
    eval: Option<&Dataset>,
    device: &Device,
) -> Result<TaskDone, tally_kernels::KernelError> {
    let eval = match eval {
        Some(data) => Some(tally_kernels::update::evaluate_run(run, model, data, device, EVAL_BATCH)?),
        None => None,
    };
    let training = match task {
        Task::Evaluate => Training::Skipped,
        Task::Train => {
            match tally_kernels::update::local_update(run, client_id, round, round_seed, model, train, device) {
                Ok(update) => Training::Done(update),
                Err(e @ tally_kernels::KernelError::Diverged { .. }) => Training::Diverged(e),
                Err(e) => return Err(e),
            }
        }
    };
    Ok(TaskDone { eval, training })
}

/// Parses a model description: `mlp:784-200-200-10` or `lenet5` / `lenet5:10`.
pub fn parse_arch(s: &str) -> Result<ModelArch, String> {
    // The JSON form a model file's `tally.arch` holds (any architecture,
    // supermask networks included).
    if s.trim_start().starts_with('{') {
        let arch: ModelArch = serde_json::from_str(s).map_err(|e| format!("{s}: {e}"))?;
        arch.validate().map_err(|e| e.to_string())?;
        return Ok(arch);
    }
    let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
    let arch = match kind {
        "mlp" => {
            let dims: Vec<u32> =
                rest.split('-').map(|d| d.parse::<u32>().map_err(|e| format!("{s}: {e}"))).collect::<Result<_, _>>()?;
            let Some((&input, rest)) = dims.split_first() else {
                return Err(format!("{s}: an MLP needs at least input and output sizes"));
            };
            let Some((&classes, hidden)) = rest.split_last() else {
                return Err(format!("{s}: an MLP needs at least input and output sizes"));
            };
            ModelArch::Mlp { input, hidden: hidden.to_vec(), classes }
        }
        "lenet5" => ModelArch::LeNet5 {
            classes: if rest.is_empty() { 10 } else { rest.parse().map_err(|e| format!("{s}: {e}"))? },
        },
        _ => return Err(format!("unknown model {s:?}: use mlp:784-200-200-10, lenet5, or the JSON of tally.arch")),
    };
    arch.validate().map_err(|e| e.to_string())?;
    Ok(arch)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_archs() {
        assert_eq!(parse_arch("mlp:784-200-200-10").unwrap(), ModelArch::mnist_mlp());
        assert_eq!(parse_arch("lenet5").unwrap(), ModelArch::LeNet5 { classes: 10 });
        assert!(parse_arch("mlp:784").is_err());
        assert!(parse_arch("resnet").is_err());
        assert!(ServerTrust::fingerprint("ab").is_err());
        assert!(ServerTrust::fingerprint(&"ab".repeat(32)).is_ok());
        assert_eq!(parse_arch("mlp:4-3-2").unwrap(), ModelArch::Mlp { input: 4, hidden: vec![3], classes: 2 });
        assert!(parse_arch("mlp:").is_err());
        assert!(parse_arch("mlp:4--2").is_err());
        // The JSON of a model file's tally.arch, supermask networks included.
        let frl = r#"{"kind":"supermask","net":"lenet","classes":10}"#;
        assert_eq!(parse_arch(frl).unwrap(), ModelArch::Supermask(tally_protocol::supermask::FrlArch::MNIST_LENET));
        assert!(parse_arch(r#"{"kind":"mlp","input":0,"hidden":[],"classes":2}"#).is_err());
        assert!(parse_arch("{").is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_without_overflow() {
        let s = Duration::from_secs;
        assert_eq!(next_backoff(s(1), s(30)), s(2));
        assert_eq!(next_backoff(s(20), s(30)), s(30));
        // `Duration * 2` panics here; a library caller may pass any duration.
        assert_eq!(next_backoff(Duration::MAX, Duration::MAX), Duration::MAX);
    }
}
