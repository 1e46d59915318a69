//! `tally-server` command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tally_server::Server;
use tally_server::config::{RawConfig, RawTls};

/// Tally federated-learning aggregation server (QUIC, TLS 1.3).
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Write a self-signed certificate and key (PEM) for `--cert`/`--key`,
    /// and print the fingerprint clients pin. Unlike `--self-signed`, the
    /// fingerprint survives server restarts.
    GenCert {
        /// Certificate file to write.
        #[arg(long, default_value = "server-cert.pem")]
        cert: PathBuf,
        /// Private key file to write (mode 0600).
        #[arg(long, default_value = "server-key.pem")]
        key: PathBuf,
        /// DNS names for the certificate.
        #[arg(long, default_value = "localhost")]
        name: Vec<String>,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// TOML configuration file; flags below override its values.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// UDP listen address (port 0 picks a free port).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// TCP address of the Prometheus endpoint (GET /metrics, /healthz);
    /// none by default. Plain HTTP: bind it to loopback or a management network.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Training rounds.
    #[arg(long)]
    rounds: Option<u32>,
    /// Clients that must join before round 1.
    #[arg(long)]
    min_clients: Option<usize>,
    /// Clients sampled per round.
    #[arg(long)]
    clients_per_round: Option<usize>,
    /// Accepted updates that close a round.
    #[arg(long)]
    quorum: Option<usize>,
    /// Seconds a round waits for reports.
    #[arg(long)]
    round_timeout_secs: Option<u64>,
    /// File of enrolled client public keys (hex, one per line).
    #[arg(long)]
    enrolled_keys: Option<PathBuf>,
    /// Output directory for metrics.jsonl and final_model.safetensors.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Concurrent connections accepted (more are refused at the handshake).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Connections handshaking or not yet joined (apart from joined sessions).
    #[arg(long)]
    max_pending_connections: Option<usize>,
    /// Pending connections from one source (IPv4 address or IPv6 /64).
    #[arg(long)]
    max_pending_per_source: Option<usize>,
    /// Seconds a connection has to finish its QUIC/TLS handshake.
    #[arg(long)]
    handshake_timeout_secs: Option<u64>,
    /// Seconds a new connection has to join before it is closed.
    #[arg(long)]
    join_timeout_secs: Option<u64>,
    /// Durable state directory (default <out-dir>/state); restarting on it resumes the run.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Seed of the initial model and client sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Initial parameters (safetensors or raw f32).
    #[arg(long)]
    initial_model: Option<PathBuf>,
    /// Run one-byte SPSA with its defaults (shorthand for `algorithm = {
    /// kind = "spsa" }` when the config names no algorithm).
    #[arg(long)]
    spsa: bool,
    /// Aggregation rule: mean (default) or median.
    #[arg(long, value_parser = parse_rule)]
    rule: Option<tally_protocol::RuleSpec>,
    /// Resume a saved run although its configuration (rounds, quorum,
    /// model, training, algorithm, rule, …) differs from the one it started
    /// with, and record the new one. Without it such a restart is refused
    /// with the list of changes. The seed and run id can never change.
    #[arg(long)]
    danger_accept_config_change: bool,
    /// Dev mode: generate a self-signed certificate and print its fingerprint.
    #[arg(long)]
    self_signed: bool,
    /// PEM certificate chain.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// PEM private key.
    #[arg(long)]
    key: Option<PathBuf>,
}

/// Exit codes (README, "Exit codes"), for scripts and service managers.
mod exit_code {
    /// Any failure not listed below (configuration, TLS, I/O, outputs).
    pub const FAILURE: i32 = 1;
    /// The state directory holds a run that finished: nothing to run.
    pub const ALREADY_FINISHED: i32 = 3;
}

fn main() {
    if let Err(e) = real_main() {
        // One line with the whole cause chain, then the documented code.
        eprintln!("Error: {e:#}");
        let code = match e.downcast_ref::<tally_server::ServerError>() {
            Some(tally_server::ServerError::AlreadyFinished { .. }) => exit_code::ALREADY_FINISHED,
            _ => exit_code::FAILURE,
        };
        std::process::exit(code);
    }
}

fn real_main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,quinn=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: log files and tests read plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Some(Command::GenCert { cert, key, name }) = cli.command {
        let fp = tally_server::tls::write_self_signed(&cert, &key, name)?;
        println!("fingerprint {}", hex::encode(fp));
        return Ok(());
    }
    let cli = cli.run;
    let mut raw = match &cli.config {
        Some(p) => RawConfig::from_file(p)?,
        None => RawConfig::default(),
    };
    macro_rules! over {
        ($($f:ident),*) => { $( if cli.$f.is_some() { raw.$f = cli.$f.clone(); } )* };
    }
    over!(
        listen,
        metrics_listen,
        rounds,
        min_clients,
        clients_per_round,
        quorum,
        round_timeout_secs,
        enrolled_keys,
        out_dir,
        state_dir,
        max_connections,
        max_pending_connections,
        max_pending_per_source,
        handshake_timeout_secs,
        join_timeout_secs,
        seed,
        initial_model
    );
    if cli.self_signed || cli.cert.is_some() || cli.key.is_some() {
        raw.tls =
            Some(RawTls { cert: cli.cert.clone(), key: cli.key.clone(), self_signed: cli.self_signed.then_some(true) });
    }
    if cli.spsa && raw.algorithm.is_none() {
        raw.algorithm = Some(tally_protocol::AlgorithmSpec::Spsa(Default::default()));
    }
    if cli.rule.is_some() {
        raw.rule = cli.rule;
    }
    let mut os_seed = [0u8; 24];
    getrandom::fill(&mut os_seed).map_err(|e| anyhow::anyhow!("OS randomness unavailable: {e}"))?;
    let mut config = raw.validate(os_seed)?;
    config.danger_accept_config_change = cli.danger_accept_config_change;
    // Crash tests only: abort at a named point, as `kill -9` would.
    if let Ok(fault) = std::env::var("TALLY_FAULT") {
        config.danger_fault = Some(fault.parse().map_err(anyhow::Error::msg)?);
    }
    // Crash tests only: a guessable DP noise seed, so runs can be compared.
    if let Ok(seed) = std::env::var("TALLY_INSECURE_NOISE_SEED") {
        config.danger_insecure_noise_seed =
            Some(seed.parse().map_err(|e| anyhow::anyhow!("TALLY_INSECURE_NOISE_SEED: {e}"))?);
    }

    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let server = Server::bind(config)?;
        // Machine-readable lines on stdout (tests and scripts parse them).
        println!("listening on {}", server.local_addr()?);
        println!("fingerprint {}", hex::encode(server.fingerprint()));
        if let Some(addr) = server.metrics_addr() {
            println!("metrics on {addr}");
        }
        // Ctrl-C and SIGTERM (what service managers and `kill` send) both
        // stop the run the same way: state, metrics and the model written.
        let shutdown = async {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{SignalKind, signal};
                match signal(SignalKind::terminate()) {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = tokio::signal::ctrl_c() => {}
                            _ = term.recv() => {}
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server cleanly");
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            }
            #[cfg(not(unix))]
            let _ = tokio::signal::ctrl_c().await;
        };
        let outcome = server.run(shutdown).await?;
        println!(
            "finished={} rounds={} final_accuracy={} model={} metrics={}",
            outcome.finished,
            outcome.rounds_completed,
            outcome.final_accuracy.map_or("unknown".to_string(), |a| format!("{a:.4}")),
            outcome.model_path.display(),
            outcome.metrics_path.display()
        );
        anyhow::Ok(())
    })
}

/// `--rule`: a rule name as in the config file.
fn parse_rule(s: &str) -> Result<tally_protocol::RuleSpec, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("unknown rule {s:?} (mean, median)"))
}
