//! Test kit: builds and spawns real `pdsno` processes (and Mosquitto) on free loopback
//! ports, waits for readiness by reading what they print, and cleans up on drop.
//!
//! Tests never sleep for readiness and never use fixed ports.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Path of the `pdsno` program under test: `$PDSNO_BIN` if set (to test an installed
/// binary), else `pdsno-e2e`, which Cargo builds from this package (always the current code,
/// with the test build's features) next to the test executables' `deps/` folder.
///
/// # Panics
/// When the binary cannot be found.
pub fn pdsno_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PDSNO_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("pdsno-e2e");
    assert!(
        bin.exists(),
        "{} not built (run the tests through cargo)",
        bin.display()
    );
    bin
}

/// A free TCP port on 127.0.0.1 (bound and released; the OS will not hand it out again
/// immediately).
///
/// # Panics
/// When no port can be bound.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A free port below the kernel's ephemeral range (32768+ on Linux), for a server that must
/// start after a client already tries to reach it: a client retrying towards an ephemeral
/// port can end up connected to itself and hold the port.
///
/// # Panics
/// When no port can be found.
pub fn free_port_for_late_server() -> u16 {
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
    for i in 0..1000u64 {
        let port = 20_000
            + ((seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(i * 7919))
                % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}

/// The end of a wait loop's patience: `cargo test` has no per-test timeout, so a loop that
/// waits for something must give up, naming what it waited for, instead of hanging.
pub struct Deadline {
    at: Instant,
    what: String,
}

impl Deadline {
    /// `timeout` from now, for a wait described by `what`.
    pub fn after(timeout: Duration, what: impl Into<String>) -> Deadline {
        Deadline {
            at: Instant::now() + timeout,
            what: what.into(),
        }
    }

    /// True once the deadline has passed.
    pub fn passed(&self) -> bool {
        Instant::now() >= self.at
    }

    /// Call once per round of a wait loop.
    ///
    /// # Panics
    /// Once the deadline has passed, naming what was awaited.
    #[track_caller]
    pub fn check(&self) {
        assert!(!self.passed(), "timed out waiting for: {}", self.what);
    }
}

/// Lines a child printed, shared with the reader thread.
#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

/// A spawned process whose stdout lines are collected and whose stderr goes to a file.
pub struct Proc {
    child: Child,
    out: Arc<Lines>,
    stderr_file: tempfile::NamedTempFile,
    /// A name for messages.
    pub name: String,
}

impl Proc {
    /// Spawns `pdsno` with `args` and extra environment.
    ///
    /// # Panics
    /// When the process cannot be spawned.
    pub fn pdsno(name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        Proc::spawn(name, &pdsno_bin(), args, env)
    }

    /// Spawns any program.
    ///
    /// # Panics
    /// When the process cannot be spawned.
    pub fn spawn(name: &str, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let stderr_file = tempfile::NamedTempFile::new().expect("temp file");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr_file.reopen().expect("reopen")));
        cmd.env(
            "RUST_LOG",
            std::env::var("PDSNO_TEST_LOG").unwrap_or_else(|_| "info".into()),
        );
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let out = Arc::new(Lines::default());
        if let Some(stdout) = child.stdout.take() {
            let out = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let mut g = out
                        .lines
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    g.push(line);
                    out.changed.notify_all();
                }
            });
        }
        Proc {
            child,
            out,
            stderr_file,
            name: name.to_owned(),
        }
    }

    /// Waits until a printed line satisfies `pred`; returns it.
    ///
    /// # Panics
    /// On timeout or if the process exits first (with its stderr in the message).
    pub fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        let mut g = self
            .out
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(l) = g.iter().find(|l| pred(l)) {
                return l.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                drop(g);
                panic!(
                    "{}: expected line not printed within {timeout:?}\nstdout: {:?}\nstderr:\n{}",
                    self.name,
                    self.lines(),
                    self.stderr()
                );
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                drop(g);
                panic!(
                    "{} exited ({status}) before printing the expected line\nstdout: {:?}\nstderr:\n{}",
                    self.name,
                    self.lines(),
                    self.stderr()
                );
            }
            let (ng, _) = self
                .out
                .changed
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(100)))
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            g = ng;
        }
    }

    /// Every stdout line so far.
    pub fn lines(&self) -> Vec<String> {
        self.out
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_file.path()).unwrap_or_default()
    }

    /// True while the process runs.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `timeout` for exit; returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Parses `listening NAME SCHEME ADDR` lines printed by `pdsno broker`.
pub fn listening_addr(line: &str) -> SocketAddr {
    line.rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

/// A `pdsno broker` process.
pub struct BrokerProc {
    /// The process.
    pub proc: Proc,
    /// MQTT 3.1.1 listener.
    pub v4: SocketAddr,
    /// MQTT 5 listener, if asked for.
    pub v5: Option<SocketAddr>,
}

/// Operator account used by tests.
pub const OPS_USER: &str = "ops";
/// Its password.
pub const OPS_PASSWORD: &str = "ops-password-for-tests";

impl BrokerProc {
    /// Starts `pdsno broker` on free ports (v4 and v5) with the test operator account and
    /// `extra` flags; returns once it printed `ready`.
    pub fn start(extra: &[&str]) -> BrokerProc {
        BrokerProc::start_on("127.0.0.1:0", "127.0.0.1:0", extra)
    }

    /// As [`BrokerProc::start`] on given addresses (to restart on the same ports).
    pub fn start_on(v4: &str, v5: &str, extra: &[&str]) -> BrokerProc {
        let user = format!("{OPS_USER}:{OPS_PASSWORD}");
        let mut args = vec!["broker", "--listen", v4, "--listen-v5", v5, "--user", &user];
        args.extend_from_slice(extra);
        let mut proc = Proc::pdsno("pdsno broker", &args, &[]);
        proc.wait_line(Duration::from_secs(30), |l| l == "ready");
        let lines = proc.lines();
        let find = |p: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(p))
                .map(|l| listening_addr(l))
        };
        let v4 =
            find("listening v4 mqtt ").unwrap_or_else(|| panic!("no v4 listener in {lines:?}"));
        let v5 = find("listening v5 mqtt ");
        BrokerProc { proc, v4, v5 }
    }
}

/// A Mosquitto broker on a free port, anonymous access on.
pub struct Mosquitto {
    /// The process.
    pub proc: Proc,
    /// Its address.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts `mosquitto` on `port` (0: a free one) and waits until it accepts TCP.
    ///
    /// # Panics
    /// When Mosquitto is not installed (`.ci/run` installs it) or does not come up.
    pub fn start(port: u16) -> Mosquitto {
        let port = if port == 0 { free_port() } else { port };
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n"))
            .expect("write conf");
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("mosquitto is not installed (apt-get install mosquitto mosquitto-clients)");
        let proc = Proc::spawn(
            "mosquitto",
            &bin,
            &["-c", conf.to_str().unwrap_or_default()],
            &[],
        );
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        wait_tcp(addr, Duration::from_secs(10));
        Mosquitto {
            proc,
            addr,
            _dir: dir,
        }
    }
}

/// Waits until `addr` accepts a TCP connection.
///
/// # Panics
/// On timeout.
pub fn wait_tcp(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{addr} did not accept connections within {timeout:?}");
}

/// MQTT 3.1.1 CONNECT by hand (clean session, keepalive 30 s); returns the CONNACK return
/// code and the open stream (10 s read timeout).
///
/// # Panics
/// When the broker does not answer with a CONNACK.
pub fn mqtt_connect(
    addr: SocketAddr,
    client_id: &str,
    user: Option<&str>,
    password: Option<&[u8]>,
) -> (u8, TcpStream) {
    fn put(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&u16::try_from(b.len()).expect("short").to_be_bytes());
        out.extend_from_slice(b);
    }
    let mut body = Vec::new();
    put(&mut body, b"MQTT");
    body.push(4);
    let mut flags = 0x02;
    if user.is_some() {
        flags |= 0x80;
    }
    if password.is_some() {
        flags |= 0x40;
    }
    body.push(flags);
    body.extend_from_slice(&30u16.to_be_bytes());
    put(&mut body, client_id.as_bytes());
    if let Some(u) = user {
        put(&mut body, u.as_bytes());
    }
    if let Some(p) = password {
        put(&mut body, p);
    }
    assert!(body.len() < 128);
    let mut pkt = vec![0x10, u8::try_from(body.len()).expect("short")];
    pkt.extend_from_slice(&body);
    let mut s = TcpStream::connect(addr).expect("connect to the broker");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(&pkt).expect("send CONNECT");
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).expect("CONNACK");
    assert_eq!(ack[..2], [0x20, 0x02], "not a CONNACK: {ack:?}");
    (ack[3], s)
}

/// Runs a command to completion, returning (exit code, stdout, stderr).
///
/// # Panics
/// When the program cannot be started.
pub fn run(program: &str, args: &[&str], timeout: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running controller process and what it reported.
pub struct NodeProc {
    /// The process.
    pub proc: Proc,
    /// Its id.
    pub id: String,
    /// gRPC address.
    pub grpc: SocketAddr,
    /// REST address.
    pub rest: SocketAddr,
    /// Embedded broker (MQTT 3.1.1), for the global controller.
    pub mqtt: Option<SocketAddr>,
    /// Data directory.
    pub data_dir: PathBuf,
}

impl NodeProc {
    /// `http://` URL of the gRPC endpoint.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}

/// `key=value` from a report line.
pub fn field(line: &str, key: &str) -> Option<String> {
    pdsno_node::report::field(line, key).map(str::to_owned)
}

/// A lab: a temporary directory holding data directories and the global controller's
/// bootstrap secret (each regional controller creates its own).
pub struct Lab {
    /// The directory.
    pub dir: tempfile::TempDir,
    /// The bootstrap secret file.
    pub secret_file: PathBuf,
    /// The bootstrap secret.
    pub secret: String,
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

impl Lab {
    /// A fresh lab.
    pub fn new() -> Lab {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = "lab-bootstrap-secret-0123456789".to_owned();
        let secret_file = dir.path().join("bootstrap.secret");
        write_private(&secret_file, &format!("{secret}\n"));
        Lab {
            dir,
            secret_file,
            secret,
        }
    }

    /// A bootstrap token minted with the lab secret (the global controller's: regional
    /// tokens).
    pub fn token(&self, temp_id: &str, region: &str, kind: &str) -> String {
        pdsno_shared::bootstrap::bootstrap_token(self.secret.as_bytes(), temp_id, region, kind)
    }

    /// A bootstrap token that `parent` accepts: minted with a regional controller's own
    /// secret (in its data directory), or with the lab secret for the global controller.
    pub fn token_for(&self, parent: &NodeProc, temp_id: &str, region: &str, kind: &str) -> String {
        let own = parent.data_dir.join("bootstrap.secret");
        match std::fs::read_to_string(&own) {
            Ok(s) => pdsno_shared::bootstrap::bootstrap_token(
                s.trim_end().as_bytes(),
                temp_id,
                region,
                kind,
            ),
            Err(_) => self.token(temp_id, region, kind),
        }
    }

    /// The data directory of node `name`.
    pub fn data(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Spawns `pdsno <tier>` with the lab's data directory for `name`, free ports and the
    /// bootstrap secret; does not wait.
    pub fn spawn(&self, tier: &str, name: &str, extra: &[&str]) -> Proc {
        self.spawn_env(tier, name, extra, &[])
    }

    /// As [`Lab::spawn`], with extra environment variables.
    pub fn spawn_env(&self, tier: &str, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
        let data = self.data(name);
        let secret = self.secret_file.display().to_string();
        let data_s = data.display().to_string();
        let mut args = vec![tier, "--data-dir", &data_s];
        // Only the global controller holds the lab secret; a regional controller makes its own.
        if tier == "global" {
            args.extend_from_slice(&["--bootstrap-secret-file", &secret]);
        }
        // Free ports unless the caller pins one.
        let mut defaults = vec![
            ("--listen-grpc", "127.0.0.1:0"),
            ("--listen-rest", "127.0.0.1:0"),
        ];
        if tier == "global" {
            defaults.push(("--listen-mqtt", "127.0.0.1:0"));
        }
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.extend_from_slice(&[flag, value]);
            }
        }
        args.extend_from_slice(extra);
        Proc::pdsno(name, &args, env)
    }

    /// The arguments of `pdsno <tier>` for the first start of child `name` under
    /// `parent_url` in `region`: the lab's data directory for `name`, free ports, its temp
    /// id. The token (and anything else) is the caller's to add.
    pub fn first_start_args(
        &self,
        tier: &str,
        name: &str,
        parent_url: &str,
        region: &str,
    ) -> Vec<String> {
        [
            tier,
            "--data-dir",
            &self.data(name).display().to_string(),
            "--listen-grpc",
            "127.0.0.1:0",
            "--listen-rest",
            "127.0.0.1:0",
            "--parent",
            parent_url,
            "--region",
            region,
            "--temp-id",
            name,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// Waits for `ready` and returns the node.
    pub fn ready(&self, mut proc: Proc, name: &str) -> NodeProc {
        use pdsno_node::report::Report;
        let line = proc.wait_line(Duration::from_secs(60), |l| {
            matches!(Report::parse(l), Some(Report::Ready { .. }))
        });
        let mqtt = proc
            .lines()
            .iter()
            .find(|l| l.starts_with("mqtt v4 "))
            .map(|l| listening_addr(l));
        let addr = |k: &str| {
            field(&line, k)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {k} in {line:?}"))
        };
        NodeProc {
            id: field(&line, "id").unwrap_or_default(),
            grpc: addr("grpc"),
            rest: addr("rest"),
            mqtt,
            data_dir: self.data(name),
            proc,
        }
    }

    /// Starts the global controller (regions zone-A, zone-B unless `extra` says otherwise).
    pub fn global(&self, extra: &[&str]) -> NodeProc {
        let mut args = if extra.contains(&"--regions") {
            vec![]
        } else {
            vec!["--regions", "zone-A,zone-B"]
        };
        args.extend_from_slice(extra);
        let p = self.spawn("global", "global", &args);
        self.ready(p, "global")
    }

    /// Starts a child of `parent` whose temp id is `name`, with a valid token.
    pub fn child(
        &self,
        tier: &str,
        name: &str,
        parent: &NodeProc,
        region: &str,
        extra: &[&str],
    ) -> NodeProc {
        let token = self.token_for(parent, name, region, tier);
        let url = parent.grpc_url();
        let mut args = vec![
            "--parent",
            &url,
            "--region",
            region,
            "--temp-id",
            name,
            "--bootstrap-token",
            &token,
        ];
        args.extend_from_slice(extra);
        let p = self.spawn(tier, name, &args);
        self.ready(p, name)
    }
}

/// Writes `text` to `path` readable by the owner only (mode 0600), as pdsno wants its
/// secret files.
///
/// # Panics
/// When the file cannot be written.
pub fn write_private(path: &Path, text: &str) {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A Python interpreter with `grpcio`, `grpcio-reflection` and `protobuf`: `$PDSNO_PYTHON`
/// if set, else a virtual environment under `target/` created on first use (from PyPI).
///
/// # Panics
/// When no such interpreter can be provided.
pub fn python_with_grpc() -> PathBuf {
    if let Some(p) = std::env::var_os("PDSNO_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = workspace_root().join("target").join("pyvenv-grpc");
    let py = venv.join("bin").join("python");
    let works = |py: &Path| {
        Command::new(py)
            .args(["-c", "import grpc, grpc_reflection, google.protobuf"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works(&py) {
        return py;
    }
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 -m venv");
    assert!(
        status.success(),
        "cannot create a Python virtual environment at {}",
        venv.display()
    );
    let status = Command::new(venv.join("bin").join("pip"))
        .args([
            "install",
            "-q",
            "--disable-pip-version-check",
            "grpcio",
            "grpcio-reflection",
            "protobuf",
        ])
        .status()
        .expect("pip install");
    assert!(
        status.success(),
        "pip install grpcio grpcio-reflection protobuf failed"
    );
    assert!(works(&py), "the virtual environment cannot import grpc");
    py
}

/// Runs a Python script from `tests/python/` with `args`; returns its stdout lines parsed as
/// JSON objects.
///
/// # Panics
/// When the script fails or prints something that is not JSON.
pub fn python_json_lines(
    python: &Path,
    script: &str,
    args: &[&str],
) -> Vec<pdsno_shared::json::Value> {
    let path = workspace_root().join("tests").join("python").join(script);
    let out = Command::new(python)
        .arg(&path)
        .args(args)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            pdsno_shared::json::parse(l.as_bytes())
                .unwrap_or_else(|e| panic!("{script} printed non-JSON {l:?}: {e}"))
        })
        .collect()
}

/// A lab CA made with `pdsno certs init`, issuing certificates with `pdsno certs issue`.
pub struct Pki {
    /// Where the CA and the certificates it issued are.
    pub dir: PathBuf,
}

impl Pki {
    /// A new CA in the lab directory `name`.
    ///
    /// # Panics
    /// When `pdsno certs init` fails.
    pub fn new(lab: &Lab, name: &str) -> Pki {
        let dir = lab.dir.path().join(name);
        let d = dir.display().to_string();
        let bin = pdsno_bin().display().to_string();
        let (code, out, err) = run(
            &bin,
            &["certs", "init", "--dir", &d],
            Duration::from_secs(60),
        );
        assert_eq!(code, Some(0), "certs init: {out}{err}");
        assert!(dir.join("ca.pem").exists() && dir.join("ca.key").exists());
        Pki { dir }
    }

    /// `pdsno certs issue --id id extra...`: the certificate's and key's paths.
    ///
    /// # Panics
    /// When `pdsno certs issue` fails.
    pub fn issue(&self, id: &str, extra: &[&str]) -> (String, String) {
        let d = self.dir.display().to_string();
        let mut args = vec!["certs", "issue", "--dir", &d, "--id", id];
        args.extend_from_slice(extra);
        let bin = pdsno_bin().display().to_string();
        let (code, out, err) = run(&bin, &args, Duration::from_secs(60));
        assert_eq!(code, Some(0), "certs issue {id}: {out}{err}");
        let file = |ext: &str| self.dir.join(format!("{id}.{ext}")).display().to_string();
        (file("pem"), file("key"))
    }

    /// The CA certificate's path.
    pub fn ca(&self) -> String {
        self.ca_path().display().to_string()
    }

    /// The CA certificate's path.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The node flags for a new certificate of `id` under this CA, then `extra`.
    pub fn flags(&self, id: &str, extra: &[&str]) -> Vec<String> {
        let (cert, key) = self.issue(id, &[]);
        let mut v = vec![
            "--tls-cert".to_owned(),
            cert,
            "--tls-key".into(),
            key,
            "--tls-ca".into(),
            self.ca(),
        ];
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    }
}
