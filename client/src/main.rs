//! `tally-client` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tally_client::{ClientOptions, ServerTrust, keys, parse_arch};
use tally_kernels::data::formats::DataSpec;
use tally_kernels::data::{self, Split};

/// Tally federated-learning client.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new ed25519 key file and print its public key for enrolment.
    Keygen {
        /// Where to write the key (refuses to overwrite).
        #[arg(long, default_value = "client.key")]
        key: PathBuf,
    },
    /// Print the public key of a key file.
    Pubkey {
        /// The key file.
        #[arg(long, default_value = "client.key")]
        key: PathBuf,
    },
    /// Join a server and train until the run finishes.
    // Boxed: far larger than the other subcommands' arguments.
    Run(Box<RunArgs>),
    /// Evaluate a model file on a test set: dense parameters, an FRL
    /// model's scores, or an FRL dense export (docs/model-files.md).
    Evaluate {
        /// Model file: safetensors (a file Tally wrote says its
        /// architecture and run in its header) or raw f32 (needs --arch).
        #[arg(long)]
        model: PathBuf,
        /// Architecture: mlp:784-200-200-10, lenet5, or the JSON of the
        /// file's tally.arch. Required for files without Tally metadata;
        /// for the others it must be the file's.
        #[arg(long)]
        arch: Option<String>,
        /// `embedded`, a directory of MNIST-format IDX files, or a
        /// file-based dataset as an inline TOML table (docs/data.md).
        #[arg(long, default_value = "embedded")]
        data: String,
        /// Also write the dense export of an FRL model here: frozen weights
        /// × mask as plain conv/linear weights (docs/model-files.md).
        #[arg(long)]
        export_dense: Option<PathBuf>,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// List the GPU adapters this client could train on, best first (what
    /// `--device auto` and `--device gpu` would pick).
    Devices,
    /// Check this machine's GPU and driver against the CPU reference: the
    /// shared-randomness kernels bit for bit (golden vectors, 1,000 applies,
    /// 100M parameters) and training within tolerance. Exits 1 on a failure.
    #[cfg(feature = "gpu")]
    GpuCheck {
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Measure the GPU: fused shared-randomness kernels against a device
    /// copy, training steps on GPU and CPU, first-step time; writes a JSON
    /// report. Runs from the release binary alone (embedded data).
    #[cfg(feature = "gpu")]
    GpuBench {
        /// Where to write the JSON report.
        #[arg(long, default_value = "gpu-bench.json")]
        out: PathBuf,
        /// Largest fused-apply size to measure, in parameters.
        #[arg(long, default_value_t = 100_000_000)]
        max_params: usize,
        /// Timed training steps per configuration.
        #[arg(long, default_value_t = 50)]
        steps: u32,
        #[command(flatten)]
        device: DeviceArgs,
    },
}

/// Where local work runs.
#[derive(clap::Args, Debug, Clone)]
struct DeviceArgs {
    /// `auto` (a hardware GPU if there is one, else the CPU), `cpu`, or
    /// `gpu` (any GPU adapter, software ones such as lavapipe included;
    /// an error if there is none).
    #[arg(long, default_value = "auto")]
    device: tally_kernels::DeviceChoice,
}

impl DeviceArgs {
    fn open(&self) -> anyhow::Result<tally_kernels::Compute> {
        let compute = tally_kernels::Compute::open(self.device)?;
        if let Some(note) = &compute.note {
            eprintln!("{note}");
        }
        eprintln!("device {}", compute.description);
        Ok(compute)
    }
}

/// `tally-client run`. Every setting can also come from the environment
/// (the variable named in its help) or from `--config FILE`; a flag wins
/// over the environment, which wins over the file, which wins over the
/// default.
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// TOML file with any of the settings below (keys as the flags, with
    /// `_` for `-`, and `eval = false` for `--no-eval`).
    #[arg(long, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    /// Server address: `HOST:PORT` with a host name (`server.example:4433`,
    /// `localhost:4433`) or an IP address (`10.0.0.5:4433`, `[::1]:4433`).
    /// Required (here or in the file).
    #[arg(long, env = "TALLY_SERVER")]
    server: Option<String>,
    /// Pin the server certificate by SHA-256 fingerprint (printed by `tally-server --self-signed`).
    #[arg(long, env = "TALLY_FINGERPRINT")]
    fingerprint: Option<String>,
    /// Trust server certificates issued by the CAs in this PEM file.
    #[arg(long, env = "TALLY_CA")]
    ca: Option<PathBuf>,
    /// Server name to check against the certificate (CA mode). Default: the
    /// host name of `--server`, or `localhost` when it is an IP address.
    #[arg(long, env = "TALLY_SERVER_NAME")]
    server_name: Option<String>,
    /// Key file; created (and its public key printed) if missing. Default `client.key`.
    #[arg(long, env = "TALLY_KEY")]
    key: Option<PathBuf>,
    /// `embedded` (a 10k/2k MNIST subset compiled in, the default) or a
    /// directory of MNIST-format IDX files (raw or .gz), e.g. data/mnist, or
    /// a CSV, NumPy, safetensors or image-folder dataset as an inline TOML
    /// table: `{ format = "csv", train = "train.csv", test = "test.csv" }`
    /// (docs/data.md). A client with its own file needs no shard.
    #[arg(long, env = "TALLY_DATA", value_parser = parse_data)]
    data: Option<DataSpec>,
    /// This client's IID shard of the training set, as INDEX/COUNT (e.g. 0/3).
    #[arg(long, env = "TALLY_SHARD")]
    shard: Option<String>,
    /// Seed of the IID sharding; every client of a run must use the same. Default 0.
    #[arg(long, env = "TALLY_SHARD_SEED")]
    shard_seed: Option<u64>,
    /// JSON file with one list of training-set indices per client.
    #[arg(long, env = "TALLY_PARTITION")]
    partition: Option<PathBuf>,
    /// Which list of `--partition` is ours.
    #[arg(long, env = "TALLY_PARTITION_INDEX")]
    partition_index: Option<usize>,
    /// Don't evaluate on the test set (the server then gets no accuracy from us).
    #[arg(long)]
    no_eval: bool,
    /// Consecutive failed connection attempts before giving up. Default 8.
    #[arg(long, env = "TALLY_MAX_RETRIES")]
    max_retries: Option<u32>,
    /// Write the final model here (safetensors).
    #[arg(long, env = "TALLY_SAVE_MODEL")]
    save_model: Option<PathBuf>,
    /// Seconds one connection attempt may take before backing off. Default 10.
    #[arg(long, env = "TALLY_CONNECT_TIMEOUT_SECS")]
    connect_timeout_secs: Option<u64>,
    /// `auto` (a hardware GPU if there is one, else the CPU; the default),
    /// `cpu`, or `gpu` (any GPU adapter, software ones such as lavapipe
    /// included; an error if there is none).
    #[arg(long, env = "TALLY_DEVICE")]
    device: Option<tally_kernels::DeviceChoice>,
}

/// [`RunArgs`] with the configuration file and the defaults applied.
#[derive(Debug)]
struct RunSettings {
    server: String,
    fingerprint: Option<String>,
    ca: Option<PathBuf>,
    server_name: Option<String>,
    key: PathBuf,
    data: DataSpec,
    shard: Option<String>,
    shard_seed: u64,
    partition: Option<PathBuf>,
    partition_index: Option<usize>,
    eval: bool,
    max_retries: u32,
    save_model: Option<PathBuf>,
    connect_timeout_secs: u64,
    device: tally_kernels::DeviceChoice,
}

impl RunArgs {
    fn resolve(self) -> anyhow::Result<RunSettings> {
        let file = match &self.config {
            Some(path) => tally_client::config::ClientConfig::from_file(path)?,
            None => Default::default(),
        };
        let server = self
            .server
            .or(file.server)
            .context("give the server address: --server HOST:PORT, TALLY_SERVER, or `server = ...` in --config")?;
        let settings = RunSettings {
            server,
            fingerprint: self.fingerprint.or(file.fingerprint),
            ca: self.ca.or(file.ca),
            server_name: self.server_name.or(file.server_name),
            key: self.key.or(file.key).unwrap_or_else(|| PathBuf::from("client.key")),
            data: self.data.or(file.data).unwrap_or_else(|| "embedded".into()),
            shard: self.shard.or(file.shard),
            shard_seed: self.shard_seed.or(file.shard_seed).unwrap_or(0),
            partition: self.partition.or(file.partition),
            partition_index: self.partition_index.or(file.partition_index),
            eval: !self.no_eval && file.eval.unwrap_or(true),
            max_retries: self.max_retries.or(file.max_retries).unwrap_or(8),
            save_model: self.save_model.or(file.save_model),
            connect_timeout_secs: self.connect_timeout_secs.or(file.connect_timeout_secs).unwrap_or(10),
            device: self.device.or(file.device).unwrap_or_default(),
        };
        if settings.shard.is_some() && settings.partition.is_some() {
            bail!("give a shard or a partition, not both");
        }
        if settings.partition.is_some() && settings.partition_index.is_none() {
            bail!("a partition needs its index (--partition-index, or `partition_index` in --config)");
        }
        Ok(settings)
    }
}

fn load_data(spec: &DataSpec) -> anyhow::Result<Split> {
    match spec {
        DataSpec::Named(name) if name == "embedded" => Ok(data::embedded_mnist()),
        DataSpec::Named(dir) => Ok(data::load_mnist_dir(std::path::Path::new(dir))?),
        DataSpec::Files(files) => {
            let loaded = data::formats::load(files)?;
            eprintln!(
                "data {files}: {} training and {} test samples of {}, {} classes",
                loaded.split.train.len(),
                loaded.split.test.len(),
                loaded.describe_shape(),
                loaded.class_names.len()
            );
            Ok(loaded.split)
        }
    }
}

/// `--data`: a name or an inline TOML table.
fn parse_data(arg: &str) -> Result<DataSpec, String> {
    DataSpec::parse_arg(arg).map_err(|e| e.to_string())
}

/// Exit codes (README, "Exit codes"): scripts and service managers tell a
/// fault that retrying cannot fix from one that it may.
mod exit_code {
    /// Anything else (bad data file, training failure, I/O).
    pub const FAILURE: i32 = 1;
    // 2: bad command line (clap's own).
    /// The server refused us for good: not enrolled, another run, a
    /// finished run, a fatal rejection.
    pub const REFUSED: i32 = 3;
    /// The server's certificate is not the pinned one, or not trusted.
    pub const CERTIFICATE: i32 = 4;
    /// No server answered within `--max-retries` attempts.
    pub const UNREACHABLE: i32 = 5;
    /// The server broke the protocol.
    pub const PROTOCOL: i32 = 6;
    /// `--device gpu` and no usable GPU adapter.
    pub const NO_GPU: i32 = 7;
    /// Stopped by Ctrl-C or SIGTERM: the client left the run, which goes on
    /// without it (the systemd unit counts this as a clean stop).
    pub const STOPPED: i32 = 8;
}

/// The exit code for an error (see [`exit_code`]).
fn exit_code_of(e: &anyhow::Error) -> i32 {
    use tally_client::ClientError;
    use tally_kernels::KernelError;
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<ClientError>() {
            return match c {
                ClientError::Refused { .. } => exit_code::REFUSED,
                ClientError::FingerprintMismatch { .. } | ClientError::Trust(_) => exit_code::CERTIFICATE,
                ClientError::GaveUp { .. } => exit_code::UNREACHABLE,
                ClientError::Protocol(_) => exit_code::PROTOCOL,
                ClientError::Kernel(KernelError::NoGpu(_)) => exit_code::NO_GPU,
                ClientError::Kernel(_) | ClientError::Io(_) => exit_code::FAILURE,
                ClientError::Stopped => exit_code::STOPPED,
            };
        }
        if let Some(KernelError::NoGpu(_)) = cause.downcast_ref::<KernelError>() {
            return exit_code::NO_GPU;
        }
    }
    exit_code::FAILURE
}

fn main() {
    if let Err(e) = real_main() {
        // One line with the whole cause chain, then the documented code.
        eprintln!("Error: {e:#}");
        std::process::exit(exit_code_of(&e));
    }
}

fn real_main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,quinn=warn,wgpu_hal=warn,wgpu_core=warn,naga=warn,cubecl=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: log files and tests read plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Keygen { key } => {
            let mut secret = [0u8; 32];
            getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("OS randomness unavailable: {e}"))?;
            let id = keys::create(&key, secret)?;
            println!("{}", id.public_key());
        }
        Command::Pubkey { key } => println!("{}", keys::load(&key)?.public_key()),
        Command::Evaluate { model, arch, data, export_dense, device } => {
            let given = arch.as_deref().map(parse_arch).transpose().map_err(anyhow::Error::msg)?;
            let file = tally_kernels::params_file::load_model_file(&model, given.as_ref())?;
            describe_model(&model, &file);
            if let Some(out) = &export_dense {
                let meta = match (&file.meta, file.content) {
                    (Some(meta), tally_protocol::model_file::Content::Parameters) => meta,
                    _ => bail!("--export-dense: {} is not an FRL model's scores with its metadata", model.display()),
                };
                tally_kernels::params_file::save_frl_dense(out, meta, &file.values)?;
                eprintln!("wrote the dense export {}", out.display());
            }
            let split = load_data(&DataSpec::parse_arg(&data)?)?;
            let compute = device.open()?;
            let r = tally_kernels::params_file::evaluate_model_file(&model, &file, &split.test, &compute.device, 1000)?;
            println!("accuracy={:.4} loss={:.4} examples={}", r.accuracy(), r.mean_loss(), r.total);
        }
        Command::Run(args) => run(*args)?,
        Command::Devices => {
            #[cfg(feature = "gpu")]
            for a in tally_kernels::gpu::adapters() {
                println!("{a}{}", if a.software { " [software: only with --device gpu]" } else { "" });
            }
            #[cfg(not(feature = "gpu"))]
            println!("this build has no GPU support");
        }
        #[cfg(feature = "gpu")]
        Command::GpuCheck { device } => {
            let compute = device.open()?;
            let Some(gpu) = compute.gpu() else { bail!("no GPU to check (try --device gpu)") };
            let mut failed = 0;
            for (name, check) in tally_kernels::gpu::check::ALL {
                let t = std::time::Instant::now();
                match check(gpu) {
                    Ok(detail) if detail.is_empty() => println!("ok    {name} ({:.2} s)", t.elapsed().as_secs_f64()),
                    Ok(detail) => println!("ok    {name} ({:.2} s): {detail}", t.elapsed().as_secs_f64()),
                    Err(msg) => {
                        failed += 1;
                        println!("FAIL  {name}: {msg}");
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} GPU check(s) failed on {}", gpu.adapter());
            }
            println!("all GPU checks passed on {}", gpu.adapter());
        }
        #[cfg(feature = "gpu")]
        Command::GpuBench { out, max_params, steps, device } => {
            let opts = tally_kernels::gpu::bench::BenchOptions { max_params, steps, choice: device.device };
            let report = tally_kernels::gpu::bench::run(&opts)?;
            let json = serde_json::to_string_pretty(&report)?;
            std::fs::write(&out, &json).with_context(|| format!("writing {}", out.display()))?;
            println!("{json}");
        }
    }
    Ok(())
}

/// One line on stderr saying what the file holds, as its metadata says.
fn describe_model(path: &std::path::Path, file: &tally_protocol::model_file::ModelFile) {
    let arch = serde_json::to_string(&file.arch).unwrap_or_default();
    match &file.meta {
        None => eprintln!("{}: {arch} (no metadata)", path.display()),
        Some(m) => eprintln!(
            "{}: {arch}, {}, algorithm {}, rounds {}, run {}",
            path.display(),
            file.content.as_str(),
            m.algorithm.as_deref().unwrap_or("unknown"),
            m.rounds.map_or("unknown".into(), |r| r.to_string()),
            m.run_id.map_or("unknown".into(), |r| r.to_string()),
        ),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let args = args.resolve()?;
    let trust = match (&args.fingerprint, &args.ca) {
        (Some(fp), None) => ServerTrust::fingerprint(fp)?,
        (None, Some(ca)) => ServerTrust::CaFile(ca.clone()),
        (Some(_), Some(_)) => bail!("give --fingerprint or --ca, not both"),
        (None, None) => bail!("give --fingerprint (pinned self-signed server) or --ca (CA-issued certificate)"),
    };
    let (identity, created) = keys::load_or_create(&args.key)?;
    if created {
        eprintln!("created {}; enrol this public key at the server:", args.key.display());
    }
    println!("public key {}", identity.public_key());
    let split = load_data(&args.data).with_context(|| format!("loading data {}", args.data))?;
    // A file-based set without a test part: nothing to evaluate on.
    let eval = args.eval && !split.test.is_empty();
    let train = match (&args.shard, &args.partition) {
        (Some(shard), _) => {
            let (i, n) = shard
                .split_once('/')
                .and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
                .filter(|(i, n)| i < n)
                .with_context(|| format!("--shard {shard}: expected INDEX/COUNT with INDEX < COUNT"))?;
            let parts = data::partition::iid(split.train.len(), n, args.shard_seed);
            split.train.subset(&parts[i])?
        }
        (None, Some(file)) => {
            let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            let parts = data::partition::from_json(&bytes, split.train.len())?;
            let k = args.partition_index.unwrap_or(0);
            let part = parts.get(k).with_context(|| format!("partition has {} clients, no index {k}", parts.len()))?;
            split.train.subset(part)?
        }
        (None, None) => split.train.clone(),
    };
    eprintln!("training on {} examples; evaluating on {}", train.len(), if eval { split.test.len() } else { 0 });
    let (server, server_name) = resolve_server(&args.server)?;
    let compute = DeviceArgs { device: args.device }.open()?;
    let device_name = compute.description.clone();
    let applier = compute.applier();
    let opts = ClientOptions {
        server,
        server_name: args.server_name.unwrap_or(server_name),
        trust,
        identity,
        train,
        eval: eval.then_some(split.test),
        compute,
        max_retries: args.max_retries,
        initial_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_secs(30),
        save_model: args.save_model,
        connect_timeout: Duration::from_secs(args.connect_timeout_secs.max(1)),
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    let outcome = runtime.block_on(tally_client::run_until(opts, shutdown_signal()));
    // A training step abandoned by a stop may still be running on a
    // blocking thread: don't wait for it.
    runtime.shutdown_background();
    let outcome = outcome?;
    println!(
        "finished rounds={} trained_in={} failed_in={} last_accuracy={} model_hash={} device={:?} replica_applier={:?} applier_fallbacks={}",
        outcome.rounds,
        outcome.rounds_trained,
        outcome.rounds_failed,
        outcome.last_eval.map_or("unknown".into(), |e| format!("{:.4}", e.accuracy())),
        hex::encode(outcome.model_hash),
        device_name,
        applier.name(),
        applier.fallbacks()
    );
    Ok(())
}

/// Ctrl-C or SIGTERM (what service managers and `kill` send).
async fn shutdown_signal() {
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
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the client cleanly");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// `HOST:PORT` → the first address the host resolves to (the system
/// resolver, once at start) and the name to check in CA mode (the host, or
/// `localhost` for an IP address).
fn resolve_server(spec: &str) -> anyhow::Result<(SocketAddr, String)> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        return Ok((addr, "localhost".to_owned()));
    }
    let Some((host, _)) = spec.rsplit_once(':').filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) else {
        bail!("--server {spec}: expected HOST:PORT (e.g. server.example:4433 or 10.0.0.5:4433)");
    };
    let addr = spec
        .to_socket_addrs()
        .with_context(|| format!("--server {spec}: cannot resolve {host}"))?
        .next()
        .with_context(|| format!("--server {spec}: {host} has no address"))?;
    Ok((addr, host.to_owned()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::resolve_server;

    #[test]
    // Host names resolve through /etc/hosts here (`localhost`): no network.
    fn server_takes_ip_addresses_and_host_names() {
        let (a, name) = resolve_server("10.0.0.5:4433").unwrap();
        assert_eq!((a.to_string().as_str(), name.as_str()), ("10.0.0.5:4433", "localhost"));
        let (a, _) = resolve_server("[::1]:9").unwrap();
        assert_eq!(a.to_string(), "[::1]:9");
        let (a, name) = resolve_server("localhost:4433").unwrap();
        assert!(a.ip().is_loopback() && a.port() == 4433, "{a}");
        assert_eq!(name, "localhost");
        for bad in ["localhost", "localhost:", ":4433", "localhost:99999"] {
            let e = resolve_server(bad).unwrap_err().to_string();
            assert!(e.contains("expected HOST:PORT"), "{bad}: {e}");
        }
    }
}
