//! Process harness: find the workspace binaries, start them, read their
//! machine-readable stdout lines, and make sure nothing outlives a test.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Generous bound for any single process step on a loaded 2-core CI machine.
/// A bound, not a correctness delay: tests wait on events, not on time.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(180);

/// Path of a workspace binary, built (or brought up to date) first.
///
/// Integration tests of this crate can't depend on other packages' binaries
/// (cargo's artifact dependencies are unstable), and `cargo test` does not
/// build them. So the first call in each test process runs `cargo build` for
/// the three binaries with this test binary's profile: a no-op when they are
/// fresh, and never a stale binary when the sources changed.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    // target/<profile>/deps/e2e-<hash>  →  target/<profile>/<name>
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile> directory").to_path_buf();
    let built = BUILT.get_or_init(|| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "--bins", "-p", "tally-server", "-p", "tally-client", "-p", "tally-sim"]);
        if dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("cargo build of the binaries failed: {s}")),
            Err(e) => Err(format!("running cargo: {e}")),
        }
    });
    if let Err(e) = built {
        panic!("{e}");
    }
    let path = dir.join(name);
    assert!(path.exists(), "{} not found after building it", path.display());
    path
}

/// A child process that is killed when dropped, with its stdout lines
/// forwarded to a channel and its stderr captured to a file.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    pub stderr_path: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> Proc {
        let stderr_path = dir.join(format!("{name}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .env("RUST_LOG", "info,quinn=warn")
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { name: name.to_string(), child: Some(child), lines, stderr_path }
    }

    /// The OS process id, while the child is running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest.
    pub fn expect_line(&self, prefix: &str) -> String {
        loop {
            match self.lines.recv_timeout(STEP_TIMEOUT) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_string();
                    }
                }
                Err(e) => panic!("{}: no line starting with {prefix:?} ({e}); stderr:\n{}", self.name, self.stderr()),
            }
        }
    }

    /// All stdout lines printed so far (non-blocking).
    pub fn drain_lines(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits for exit (bounded); returns the status.
    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("process waited twice");
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let status = child.wait();
            let _ = tx.send(());
            (child, status)
        });
        if rx.recv_timeout(STEP_TIMEOUT).is_err() {
            panic!("{} did not exit within {:?}; stderr:\n{}", self.name, STEP_TIMEOUT, self.stderr());
        }
        let (_, status) = waiter.join().expect("waiter thread");
        status.expect("wait status")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Creates a key with `tally-client keygen`; returns its public key.
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(format!("{name}.key"));
    let out = Command::new(bin("tally-client")).args(["keygen", "--key"]).arg(&key).output().expect("keygen");
    assert!(out.status.success(), "keygen failed: {}", String::from_utf8_lossy(&out.stderr));
    (key, String::from_utf8(out.stdout).expect("utf8").trim().to_string())
}

/// A running server and what clients need to reach it.
pub struct ServerHandle {
    pub proc: Proc,
    pub addr: String,
    pub fingerprint: String,
    pub out_dir: PathBuf,
}

/// Starts `tally-server --self-signed` on a free loopback port.
pub fn start_server(dir: &Path, enrolled: &[String], extra: &[&str]) -> ServerHandle {
    start_server_at(dir, enrolled, "127.0.0.1:0", extra)
}

pub fn start_server_at(dir: &Path, enrolled: &[String], listen: &str, extra: &[&str]) -> ServerHandle {
    let keys = dir.join("enrolled.txt");
    std::fs::write(&keys, enrolled.join("\n") + "\n").expect("enrolled file");
    let out_dir = dir.join("server-out");
    let mut cmd = Command::new(bin("tally-server"));
    cmd.args(["--self-signed", "--listen", listen, "--enrolled-keys"])
        .arg(&keys)
        .arg("--out-dir")
        .arg(&out_dir)
        .args(extra);
    let proc = Proc::spawn("server", &mut cmd, dir);
    let addr = proc.expect_line("listening on ");
    let fingerprint = proc.expect_line("fingerprint ");
    ServerHandle { proc, addr, fingerprint, out_dir }
}

/// Starts an honest `tally-client run` on the embedded data.
pub fn start_client(dir: &Path, name: &str, key: &Path, server: &ServerHandle, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("tally-client"));
    cmd.args(["run", "--server", &server.addr, "--fingerprint", &server.fingerprint, "--key"]).arg(key).args(extra);
    // The CPU unless a test asks otherwise: results must not depend on
    // whether the machine running the suite has a GPU.
    if !extra.contains(&"--device") {
        cmd.args(["--device", "cpu"]);
    }
    Proc::spawn(name, &mut cmd, dir)
}

/// Reads the server's metrics file.
pub fn metrics(out_dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out_dir.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines().map(|l| serde_json::from_str(l).expect("metrics line is JSON")).collect()
}

/// Waits for every process and fails the test, with its stderr, for the
/// first that did not exit successfully.
pub fn wait_all_succeed(procs: &mut [Proc]) {
    for p in procs {
        assert!(p.wait().success(), "{} failed:\n{}", p.name, p.stderr());
    }
}

/// The hex hash of the final model a server wrote to `out_dir` (read as
/// `arch`): the `model_hash` of its metrics and of its clients' summaries.
pub fn saved_model_hash(out_dir: &Path, arch: &tally_protocol::model::ModelArch) -> String {
    let bytes = std::fs::read(out_dir.join("final_model.safetensors")).expect("final model written");
    let params = arch.from_safetensors(&bytes).expect("final model reads as its architecture");
    hex::encode(tally_protocol::identity::params_hash(&params))
}

/// Every client printed its summary line naming the final model `hash`.
pub fn assert_clients_finished_with(clients: &[Proc], hash: &str) {
    for c in clients {
        let done = c.drain_lines().into_iter().find(|l| l.starts_with("finished")).expect("client summary line");
        assert!(done.contains(&format!("model_hash={hash}")), "{}: {done}", c.name);
    }
}
