//! Operator tooling against hardened deployments, as real processes:
//! - every operator command reaches a node that serves mutual TLS with plaintext refused
//!   (from the data directory's recorded TLS files, from flags, from `PDSNO_TLS_*`), and
//!   without a client certificate fails with an error naming the flag to give;
//! - secrets have file and environment forms that stay out of `/proc/PID/cmdline`, and a
//!   secret given on the command line is warned about;
//! - `pdsno passwd` hashes are accepted by the embedded broker;
//! - `pdsno token --out` writes a private file and prints nothing; the bootstrap secret file
//!   is created private under any umask and refused when others may read it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pdsno_tests::{Lab, NodeProc, pdsno_bin};

const LONG: Duration = Duration::from_secs(60);

/// Runs `pdsno args` with extra environment and `stdin`; (exit code, stdout, stderr).
fn pdsno(args: &[&str], env: &[(&str, &str)], stdin: &str) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(pdsno_bin());
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for k in [
        "PDSNO_TLS_CA",
        "PDSNO_TLS_CERT",
        "PDSNO_TLS_KEY",
        "PDSNO_DATA_DIR",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn pdsno");
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin.as_bytes()).expect("stdin");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while matches!(child.try_wait(), Ok(None)) {
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pdsno args` must succeed; its stdout.
fn ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let (code, out, err) = pdsno(args, env, "");
    assert_eq!(code, Some(0), "pdsno {args:?} failed:\n{out}\n{err}");
    out
}

/// `pdsno args` must fail; its stderr.
fn fails(args: &[&str]) -> String {
    let (code, out, err) = pdsno(args, &[], "");
    assert_ne!(code, Some(0), "pdsno {args:?} should fail:\n{out}\n{err}");
    assert!(
        !out.contains("\"controller_id\""),
        "no answer without TLS: {out}"
    );
    err
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

fn chmod(p: &Path, m: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
}

/// A lab CA and certificates issued by `pdsno certs`.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(lab: &Lab) -> Pki {
        let dir = lab.dir.path().join("pki");
        ok(&["certs", "init", "--dir", &s(&dir)], &[]);
        Pki { dir }
    }

    /// (certificate, key) for `id`.
    fn issue(&self, id: &str) -> (String, String) {
        ok(&["certs", "issue", "--dir", &s(&self.dir), "--id", id], &[]);
        (
            s(&self.dir.join(format!("{id}.pem"))),
            s(&self.dir.join(format!("{id}.key"))),
        )
    }

    fn ca(&self) -> String {
        s(&self.dir.join("ca.pem"))
    }

    /// A node's flags: its certificate, the CA, mutual TLS, no plaintext.
    fn strict(&self, id: &str) -> Vec<String> {
        let (cert, key) = self.issue(id);
        [
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &self.ca(),
            "--require-client-cert",
            "--require-tls",
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A token for a regional controller, written by `pdsno token --out` (mode 0600).
fn token_file(lab: &Lab, temp_id: &str, region: &str) -> PathBuf {
    chmod(&lab.secret_file, 0o600);
    let out = lab.dir.path().join(format!("{temp_id}.token"));
    let stdout = ok(
        &[
            "token",
            "--bootstrap-secret-file",
            &s(&lab.secret_file),
            "--temp-id",
            temp_id,
            "--region",
            region,
            "--type",
            "regional",
            "--out",
            &s(&out),
        ],
        &[],
    );
    assert!(stdout.is_empty(), "--out prints nothing: {stdout:?}");
    out
}

fn read_token(p: &Path) -> String {
    std::fs::read_to_string(p)
        .expect("token file")
        .trim()
        .to_owned()
}

/// A regional controller of `gc` over mutual TLS, its token from a file.
fn rc_tls(lab: &Lab, pki: &Pki, gc: &NodeProc, name: &str, region: &str) -> NodeProc {
    let token = token_file(lab, name, region);
    let url = format!("https://127.0.0.1:{}", gc.grpc.port());
    let tls = pki.strict(name);
    let tok = s(&token);
    let mut args = vec![
        "--parent",
        &url,
        "--region",
        region,
        "--temp-id",
        name,
        "--bootstrap-token-file",
        &tok,
    ];
    args.extend(strs(&tls));
    let p = lab.spawn("regional", name, &args);
    lab.ready(p, name)
}

/// Finding: the operator CLI spoke plaintext gRPC only, so under `--require-tls` nothing
/// could be inspected, published or revoked. Every command that talks to a node's admin
/// service now reaches it over mutual TLS (the files from the node's data directory, from
/// flags or from `PDSNO_TLS_*`); without a client certificate, or with an `http://` URL,
/// it fails with an error naming the flag to give.
#[test]
fn every_operator_command_works_over_mutual_tls() {
    let lab = Lab::new();
    let pki = Pki::new(&lab);
    let gc_tls = pki.strict("global");
    let gc = lab.global(&strs(&gc_tls));
    let rc = rc_tls(&lab, &pki, &gc, "rc-ops", "zone-A");
    let gc_dir = s(&gc.data_dir);
    let rc_dir = s(&rc.data_dir);
    let gc_https = format!("https://127.0.0.1:{}", gc.grpc.port());
    let gc_http = format!("http://127.0.0.1:{}", gc.grpc.port());
    let gc_key = s(&gc.data_dir.join("admin.key"));
    let (op_cert, op_key) = pki.issue("operator");
    let ca = pki.ca();

    // The data directory records the TLS paths (never the contents).
    let node_json = std::fs::read_to_string(gc.data_dir.join("node.json")).expect("node.json");
    assert!(node_json.contains("\"tls\""), "{node_json}");
    assert!(
        node_json.contains("global.pem") && node_json.contains("ca.pem"),
        "{node_json}"
    );
    assert!(!node_json.contains("PRIVATE KEY"), "{node_json}");
    assert!(node_json.contains("https://"), "{node_json}");

    let policy = lab.dir.path().join("policy.json");
    std::fs::write(&policy, r#"{"max_devices": 42}"#).expect("policy");
    let policy = s(&policy);

    // Each command, first without TLS material against the same node: refused before
    // anything is done, naming the flag.
    let explicit = ["--connect", &gc_https, "--admin-key-file", &gc_key];
    let commands: Vec<Vec<&str>> = vec![
        vec!["status"],
        vec!["policy", "show"],
        vec!["policy", "set", &policy],
        vec!["controller", "revoke", &rc.id],
        vec!["keys", "rotate", "--peer", &rc.id, "--no-wait"],
    ];
    for c in &commands {
        let mut no_tls = c.clone();
        no_tls.extend(explicit);
        let err = fails(&no_tls);
        assert!(
            err.contains("--tls-ca") && err.contains("--tls-cert"),
            "{c:?} without TLS names the flags: {err}"
        );
        // The CA alone does not make a client certificate.
        let mut ca_only = no_tls.clone();
        ca_only.extend(["--tls-ca", &ca]);
        let err = fails(&ca_only);
        assert!(
            err.contains("--tls-cert") && !err.contains("give --tls-ca"),
            "{c:?} with only --tls-ca names --tls-cert: {err}"
        );
        // Plaintext to a TLS-only node.
        let mut plain = c.clone();
        plain.extend(["--connect", &gc_http, "--admin-key-file", &gc_key]);
        let err = fails(&plain);
        assert!(
            err.contains("https://") && err.contains("--tls-ca"),
            "{c:?} over http:// says to use https:// and --tls-ca: {err}"
        );
    }
    // The node is untouched: the child is still there, policy not published.
    let st = ok(&["status", "--json", "--data-dir", &gc_dir], &[]);
    assert!(st.contains(&rc.id) && !st.contains("\"revoked\""), "{st}");
    let out = ok(&["policy", "show", "--data-dir", &gc_dir], &[]);
    assert!(!out.contains("max_devices"), "nothing published: {out}");

    // status: from the data directory (the node's own files), from flags, from env.
    let out = ok(&["status", "--data-dir", &gc_dir], &[]);
    assert!(out.starts_with("global_cntl_1"), "{out}");
    assert!(out.contains(&rc.id), "{out}");
    let with_flags = [
        "--connect",
        &gc_https,
        "--admin-key-file",
        &gc_key,
        "--tls-ca",
        &ca,
        "--tls-cert",
        &op_cert,
        "--tls-key",
        &op_key,
    ];
    let mut a = vec!["status", "--json"];
    a.extend(with_flags);
    let out = ok(&a, &[]);
    assert!(
        out.contains("\"controller_id\": \"global_cntl_1\""),
        "{out}"
    );
    let out = ok(
        &[
            "status",
            "--connect",
            &gc_https,
            "--admin-key-file",
            &gc_key,
        ],
        &[
            ("PDSNO_TLS_CA", &ca),
            ("PDSNO_TLS_CERT", &op_cert),
            ("PDSNO_TLS_KEY", &op_key),
        ],
    );
    assert!(out.contains(&rc.id), "{out}");

    // policy set / show with the operator's certificate.
    let mut a = vec!["policy", "set", &policy];
    a.extend(with_flags);
    let out = ok(&a, &[]);
    assert!(
        out.starts_with("policy version ") && out.contains(" published"),
        "{out}"
    );
    let out = ok(&["policy", "show", "--data-dir", &gc_dir], &[]);
    assert!(out.contains("\"max_devices\": 42"), "{out}");
    let mut a = vec!["policy", "show"];
    a.extend(with_flags);
    assert!(ok(&a, &[]).contains("\"max_devices\": 42"));

    // keys rotate on the RC (its parent link and admin service both under mutual TLS).
    let out = ok(
        &[
            "keys",
            "rotate",
            "--peer",
            "global_cntl_1",
            "--data-dir",
            &rc_dir,
        ],
        &[],
    );
    assert!(out.contains("rotated: now signing with"), "{out}");
    // keys list and the audit log read the data directory itself.
    let out = ok(&["keys", "list", "--data-dir", &rc_dir], &[]);
    assert!(out.contains("global_cntl_1"), "{out}");
    let out = ok(&["audit", "verify", "--data-dir", &gc_dir], &[]);
    assert!(out.starts_with("OK events="), "{out}");
    let out = ok(&["audit", "tail", "--data-dir", &gc_dir, "-n", "50"], &[]);
    assert!(!out.is_empty());

    // status of the RC from its data directory.
    let out = ok(&["status", "--data-dir", &rc_dir], &[]);
    assert!(out.starts_with(&rc.id), "{out}");

    // controller revoke with the operator's certificate: the RC is gone from the tree.
    let mut a = vec!["controller", "revoke", &rc.id];
    a.extend(with_flags);
    let out = ok(&a, &[]);
    assert!(out.contains(&format!("revoked {}", rc.id)), "{out}");
    let st = ok(&["status", "--json", "--data-dir", &gc_dir], &[]);
    assert!(st.contains("\"status\": \"revoked\""), "{st}");
}

/// Finding: `--bootstrap-token` on the command line is readable by every local user in
/// `/proc/PID/cmdline`. It still works (labs) but warns; the file and environment forms
/// admit the controller without a warning and keep the token out of the command line.
#[test]
fn bootstrap_token_from_file_or_env_stays_out_of_cmdline() {
    let lab = Lab::new();
    chmod(&lab.secret_file, 0o600);
    let gc = lab.global(&["--regions", "zone-A,zone-B,zone-C"]);
    let url = gc.grpc_url();
    let warning = "warning: --bootstrap-token on the command line";

    // Command line: admitted, with a warning on stderr (and in the log).
    let token = read_token(&token_file(&lab, "rc-argv", "zone-A"));
    let p = lab.spawn(
        "regional",
        "rc-argv",
        &[
            "--parent",
            &url,
            "--region",
            "zone-A",
            "--temp-id",
            "rc-argv",
            "--bootstrap-token",
            &token,
        ],
    );
    let rc = lab.ready(p, "rc-argv");
    let err = rc.proc.stderr();
    assert!(err.contains(warning), "{err}");
    assert!(err.contains("--bootstrap-token-file"), "{err}");
    assert!(err.contains("WARN"), "logged at WARN too: {err}");
    assert!(
        !err.contains(&token),
        "the warning does not repeat the token"
    );

    // File: admitted, no warning, the token is not in /proc/PID/cmdline.
    let file = token_file(&lab, "rc-file", "zone-B");
    let token = read_token(&file);
    let p = lab.spawn(
        "regional",
        "rc-file",
        &[
            "--parent",
            &url,
            "--region",
            "zone-B",
            "--temp-id",
            "rc-file",
            "--bootstrap-token-file",
            &s(&file),
        ],
    );
    let rc = lab.ready(p, "rc-file");
    assert!(!rc.id.is_empty());
    let err = rc.proc.stderr();
    assert!(!err.contains("warning:"), "{err}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", rc.proc.pid())).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(cmdline.contains("--bootstrap-token-file"), "{cmdline}");
    assert!(!cmdline.contains(&token), "token in cmdline: {cmdline}");

    // Environment: admitted, no warning, nothing in the command line either.
    let token = read_token(&token_file(&lab, "rc-env", "zone-C"));
    let p = lab.spawn_env(
        "regional",
        "rc-env",
        &[
            "--parent",
            &url,
            "--region",
            "zone-C",
            "--temp-id",
            "rc-env",
        ],
        &[("PDSNO_BOOTSTRAP_TOKEN", &token)],
    );
    let rc = lab.ready(p, "rc-env");
    let err = rc.proc.stderr();
    assert!(!err.contains("warning:"), "{err}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", rc.proc.pid())).expect("cmdline");
    assert!(!String::from_utf8_lossy(&cmdline).contains(&token));
}

/// True when an MQTT client authenticated as `user`/`password` may publish on the broker.
fn mqtt_login(port: u16, user: &str, password: &str) -> bool {
    let (code, _, _) = pdsno_tests::run(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-u",
            user,
            "-P",
            password,
            "-t",
            "ops/check",
            "-m",
            "x",
            "-q",
            "1",
            "-V",
            "mqttv311",
        ],
        Duration::from_secs(30),
    );
    code == Some(0)
}

/// Finding: operator passwords could only be given as `--user NAME:PASSWORD`, visible in
/// `/proc/PID/cmdline`. `pdsno passwd` prints an Argon2id hash (password from stdin or
/// `--password-file`) that the embedded broker accepts from `[[mqtt_users]]`; `--user-file`
/// holds accounts without a warning; `--user` still works but warns.
#[test]
fn passwd_hashes_and_user_files_are_accepted_by_the_broker() {
    let lab = Lab::new();
    // The password from stdin, and from a file.
    let (code, hash, err) = pdsno(&["passwd"], &[], "hashed-password-1\n");
    assert_eq!(code, Some(0), "{err}");
    let hash = hash.trim().to_owned();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains("hashed-password-1"));
    let pw_file = lab.dir.path().join("pw");
    std::fs::write(&pw_file, "reader-password-2\n").expect("pw file");
    let toml_entry = ok(
        &[
            "passwd",
            "--password-file",
            &s(&pw_file),
            "--toml",
            "mon",
            "--read-only",
        ],
        &[],
    );
    assert!(toml_entry.contains("[[mqtt_users]]"), "{toml_entry}");
    // An empty password is refused.
    let (code, _, err) = pdsno(&["passwd"], &[], "\n");
    assert_ne!(code, Some(0));
    assert!(err.contains("empty"), "{err}");

    let config = lab.dir.path().join("global.toml");
    std::fs::write(
        &config,
        format!("[[mqtt_users]]\nname = \"ops\"\npassword_hash = \"{hash}\"\n\n{toml_entry}"),
    )
    .expect("config");
    let users = lab.dir.path().join("users");
    std::fs::write(&users, "# operators\nfile-op:file-password-3\n").expect("users");
    chmod(&users, 0o644);
    // A user file others may read is refused with the fix.
    let mut p = lab.spawn(
        "global",
        "global-refused",
        &["--regions", "zone-A", "--user-file", &s(&users)],
    );
    let t0 = Instant::now();
    while p.is_alive() && t0.elapsed() < LONG {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!p.is_alive());
    assert!(p.stderr().contains("chmod 600"), "{}", p.stderr());
    chmod(&users, 0o600);

    let gc = lab.global(&["--config", &s(&config), "--user-file", &s(&users)]);
    let err = gc.proc.stderr();
    assert!(!err.contains("warning:"), "{err}");
    let port = gc.mqtt.expect("embedded broker").port();
    assert!(
        mqtt_login(port, "ops", "hashed-password-1"),
        "passwd hash accepted"
    );
    assert!(
        !mqtt_login(port, "ops", "wrong-password"),
        "wrong password refused"
    );
    assert!(
        mqtt_login(port, "file-op", "file-password-3"),
        "--user-file account"
    );
    // The read-only account authenticates but may not publish.
    let (code, _, _) = pdsno_tests::run(
        "mosquitto_sub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-u",
            "mon",
            "-P",
            "reader-password-2",
            "-t",
            "pdsno/#",
            "-E",
            "-V",
            "mqttv311",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "the read-only account subscribes");
    assert!(!mqtt_login(port, "mon", "reader-password-2"), "read-only");
    drop(gc);

    // --user on the command line: still accepted, with a warning.
    let gc = lab.global(&["--user", "argv-op:argv-password-4"]);
    let err = gc.proc.stderr();
    assert!(
        err.contains("warning: --user on the command line") && err.contains("--user-file"),
        "{err}"
    );
    assert!(!err.contains("argv-password-4"));
    assert!(mqtt_login(
        gc.mqtt.expect("broker").port(),
        "argv-op",
        "argv-password-4"
    ));
}

/// Finding: `pdsno token --out FILE` printed the token instead of writing it, and the
/// bootstrap secret file's mode was not enforced. Now `--out` writes mode 0600 (tightening
/// an existing file) and prints nothing on stdout; `--init-secret` creates the secret mode
/// 0600 even under umask 000; a secret file others may read is refused with `chmod 600`.
#[test]
fn token_out_writes_a_private_file_and_secret_mode_is_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("bootstrap.secret");
    let out = dir.path().join("rc.token");
    // A leftover token file others may read is tightened.
    std::fs::write(&out, "old\n").expect("old token");
    chmod(&out, 0o644);
    let script = format!(
        "umask 000; exec '{}' token --init-secret --bootstrap-secret-file '{}' \
         --temp-id temp-rc-1 --region zone-A --type regional --out '{}'",
        pdsno_bin().display(),
        secret.display(),
        out.display()
    );
    let (code, stdout, stderr) = pdsno_tests::run("sh", &["-c", &script], LONG);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "nothing on stdout: {stdout:?}");
    assert!(stderr.contains(&s(&out)), "a note on stderr: {stderr}");
    assert_eq!(mode(&secret), 0o600, "secret mode under umask 000");
    assert_eq!(mode(&out), 0o600, "token file mode");
    let secret_text = std::fs::read_to_string(&secret).expect("secret");
    let valid = |t: &str| {
        pdsno_shared::bootstrap::check_token(
            secret_text.trim().as_bytes(),
            "temp-rc-1",
            "zone-A",
            "regional",
            t,
            chrono::Utc::now().timestamp(),
        ) == pdsno_shared::bootstrap::TokenCheck::Valid
    };
    let written = read_token(&out);
    assert!(valid(&written), "{written}");

    // Without --out the token is printed (and is the same).
    let args = [
        "token",
        "--bootstrap-secret-file",
        &s(&secret),
        "--temp-id",
        "temp-rc-1",
        "--region",
        "zone-A",
        "--type",
        "regional",
    ];
    let printed = ok(&args, &[]);
    assert!(valid(printed.trim()), "{printed}");

    // A secret others may read is refused, naming the fix; no token comes out.
    for m in [0o644, 0o640, 0o604] {
        chmod(&secret, m);
        let (code, stdout, stderr) = pdsno(&args, &[], "");
        assert_eq!(code, Some(2), "mode {m:o}: {stdout}{stderr}");
        assert!(stdout.is_empty(), "{stdout}");
        assert!(
            stderr.contains(&format!("chmod 600 {}", secret.display())),
            "{stderr}"
        );
    }
}

/// Finding: the admin service had no rate limit, so anyone reaching the gRPC port could
/// make a node verify admin signatures as fast as it could send them. Admin requests now
/// count against the node's per-address request budget (`--rate-limit-rps`): a flood of
/// forged requests is refused with RESOURCE_EXHAUSTED, and the operator gets through once
/// the budget refills.
#[test]
fn admin_requests_count_against_the_rate_limit() {
    let lab = Lab::new();
    let gc = lab.global(&["--rate-limit-rps", "2", "--rate-limit-burst", "3"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let forged = pdsno_shared::keys::HmacKey::random();
    let empty = pdsno_shared::json::Value::Object(pdsno_shared::json::Map::new());
    let errors: Vec<String> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..12 {
            let r = pdsno_node::admin::call(
                &gc.grpc_url(),
                &forged,
                "status",
                &empty,
                Duration::from_secs(10),
            )
            .await;
            v.push(r.expect_err("a forged admin request is refused"));
        }
        v
    });
    assert!(
        errors[0].starts_with("unauthenticated"),
        "first forged request reaches the signature check: {errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("Rate limit")),
        "the flood is rate limited: {errors:?}"
    );
    // The operator, once the budget refills.
    std::thread::sleep(Duration::from_secs(2));
    let out = ok(&["status", "--data-dir", &s(&gc.data_dir)], &[]);
    assert!(out.starts_with("global_cntl_1"), "{out}");
}

/// Finding: the admin service could not be kept off the network-facing gRPC port. With
/// `--listen-admin ADDR` it is served only there (e.g. on loopback): an admin request to
/// the gRPC port is refused as an unknown service, while children are still admitted there
/// and the operator tools find the admin listener through `node.json`.
#[test]
fn listen_admin_moves_the_admin_service_off_the_grpc_port() {
    let lab = Lab::new();
    let gc = lab.global(&["--listen-admin", "127.0.0.1:0"]);
    let ready = gc
        .proc
        .lines()
        .into_iter()
        .find(|l| l.starts_with("ready "))
        .expect("ready line");
    let admin_addr: std::net::SocketAddr = pdsno_tests::field(&ready, "admin")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no admin= in {ready:?}"));
    assert_ne!(admin_addr, gc.grpc);
    let key = pdsno_node::admin::read_key(&gc.data_dir).expect("admin key");
    let empty = pdsno_shared::json::Value::Object(pdsno_shared::json::Map::new());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (on_grpc, on_admin) = rt.block_on(async {
        let g = pdsno_node::admin::call(
            &gc.grpc_url(),
            &key,
            "status",
            &empty,
            Duration::from_secs(10),
        )
        .await;
        let a = pdsno_node::admin::call(
            &format!("http://{admin_addr}"),
            &key,
            "status",
            &empty,
            Duration::from_secs(10),
        )
        .await;
        (g, a)
    });
    let err = on_grpc.expect_err("no admin service on the gRPC port, even with the key");
    assert!(err.starts_with("unimplemented"), "{err}");
    let st = on_admin.expect("admin service on --listen-admin");
    assert_eq!(
        st.get("controller_id")
            .and_then(pdsno_shared::json::Value::as_str),
        Some("global_cntl_1")
    );
    // Children still use the gRPC port; the tools find the admin listener by themselves.
    let rc = lab.child("regional", "rc-adm", &gc, "zone-A", &[]);
    let out = ok(&["status", "--data-dir", &s(&gc.data_dir)], &[]);
    assert!(out.contains(&rc.id), "{out}");
}
