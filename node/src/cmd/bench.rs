//! `pdsno bench`: load generators whose numbers go into release notes and issue reports.
//!
//! `pdsno bench mqtt` measures QoS 1 (or 0/2) throughput and one-way latency through any
//! MQTT broker with the node's own client: one publisher, one subscriber, a bounded
//! window of unconfirmed messages. Run it against the embedded broker and against
//! Mosquitto on the same machine to compare.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use pdsno_shared::keys::SecretString;

use crate::transport::mqtt::{BrokerUrl, MqttClient, MqttSettings};

/// `pdsno bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// MQTT throughput and latency through a broker.
    Mqtt(MqttBenchArgs),
    /// Full admission handshakes per second: against a throwaway parent of its own, or the
    /// parent at --url (start it with `--rate-limit-rps 0`: the whole load comes from one
    /// address).
    Admission(AdmissionBenchArgs),
    /// Discovery ingestion at a regional controller (device records per second).
    Discovery(super::bench_work::DiscoveryBenchArgs),
    /// Policy fan-out: GC set -> every LC applied, on N local controller processes.
    Policy(super::bench_work::PolicyBenchArgs),
    /// A topology at work for --minutes: RSS and NIB size of every tier each sample, and
    /// their slopes per hour after the warm-up.
    Soak(super::soak::SoakArgs),
}

/// `pdsno bench admission` arguments.
#[derive(Debug, Args)]
pub struct AdmissionBenchArgs {
    /// The parent's gRPC URL. Without it the bench starts a throwaway parent of its own on
    /// free loopback ports (a global controller, or for `--kind local` a global and a
    /// regional controller), mints its tokens, and stops and deletes it at the end.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// File holding the bootstrap secret of the parent at --url (or PDSNO_BOOTSTRAP_SECRET).
    #[arg(long, env = "PDSNO_BOOTSTRAP_SECRET_FILE")]
    pub bootstrap_secret_file: Option<std::path::PathBuf>,
    /// Region to ask for. For regional controllers a prefix: a region has one regional
    /// controller, so each admission asks for its own region `PREFIX-N` (start the global
    /// controller without --regions).
    #[arg(long, default_value = "zone-A")]
    pub region: String,
    /// Child type to ask for (`regional` against a GC, `local` against an RC).
    #[arg(long, default_value = "regional")]
    pub kind: String,
    /// Concurrent clients, comma-separated runs.
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    pub conns: Vec<usize>,
    /// Seconds per run (runs over 3 s show their progress on stderr every second).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// End each run after this many admission attempts (0: only --duration ends it).
    #[arg(long, default_value_t = 0)]
    pub max: usize,
    /// CA certificates (PEM) for an https:// URL.
    #[arg(long, value_name = "FILE", requires = "url")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "url"])]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

/// `pdsno bench mqtt` arguments.
#[derive(Debug, Args)]
pub struct MqttBenchArgs {
    /// Broker URL.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub url: String,
    /// User name.
    #[arg(long, env = "PDSNO_BENCH_MQTT_USER")]
    pub user: Option<String>,
    /// Password (prefer the environment variable).
    #[arg(long, env = "PDSNO_BENCH_MQTT_PASSWORD", hide_env_values = true)]
    pub password: Option<crate::config::SecretArg>,
    /// Messages in the throughput run.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Payload bytes per message (at least 16).
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// QoS of publish and subscription.
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// Most messages published but not yet received.
    #[arg(long, default_value_t = 1000)]
    pub window: usize,
    /// Messages in the unloaded latency run (one in flight at a time).
    #[arg(long, default_value_t = 2000)]
    pub latency_messages: usize,
}

/// Runs a bench subcommand.
pub fn run(cmd: &BenchCommand) -> ExitCode {
    crate::logging::init();
    match cmd {
        BenchCommand::Mqtt(a) => crate::runtime::block_on(async move {
            match mqtt(a).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }),
        BenchCommand::Discovery(a) => crate::runtime::block_on(async move {
            match super::bench_work::discovery(a).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }),
        BenchCommand::Policy(a) => crate::runtime::block_on(async move {
            match super::bench_work::policy(a).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }),
        BenchCommand::Soak(a) => crate::runtime::block_on(async move {
            match super::soak::soak(a).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }),
        BenchCommand::Admission(a) => crate::runtime::block_on(async move {
            match admission(a).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i]
}

async fn client(a: &MqttBenchArgs, id: String) -> Result<MqttClient, String> {
    let url = BrokerUrl::parse(&a.url)?;
    let mut s = MqttSettings::new(url, id);
    s.username = a.user.clone();
    s.password = a.password.as_ref().map(|p| SecretString::new(p.expose()));
    s.max_inflight = 100;
    s.outbox_limit = a.window.max(1) * 2;
    s.handler_queue = a.window.max(1) * 2;
    let (c, _task) = MqttClient::start(s)?;
    c.wait_connected(Duration::from_secs(10)).await?;
    Ok(c)
}

/// One run: publishes `n` messages keeping at most `window` in flight (published, not
/// received); returns the elapsed time and each message's one-way latency.
async fn one_run(
    publ: &MqttClient,
    rx: &mut tokio::sync::mpsc::Receiver<crate::transport::mqtt::Message>,
    topic: &str,
    a: &MqttBenchArgs,
    n: usize,
    window: usize,
    base: Instant,
) -> Result<(Duration, Vec<Duration>), String> {
    let payload_len = a.payload.max(16);
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    let mut sent = 0usize;
    let mut received = 0usize;
    while received < n {
        while sent < n && sent - received < window {
            let mut p = vec![0u8; payload_len];
            p[..8].copy_from_slice(&(sent as u64).to_be_bytes());
            p[8..16].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_be_bytes());
            publ.publish(topic.to_owned(), p, a.qos, false)
                .await
                .map_err(|e| e.to_string())?;
            sent += 1;
        }
        let m = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .map_err(|_| format!("stalled: {received} of {n} received after 30 s"))?
            .ok_or("subscription closed")?;
        if m.payload.len() >= 16 {
            let mut t = [0u8; 8];
            t.copy_from_slice(&m.payload[8..16]);
            let sent_at = Duration::from_nanos(u64::from_be_bytes(t));
            lat.push(base.elapsed().saturating_sub(sent_at));
            received += 1;
        }
    }
    Ok((start.elapsed(), lat))
}

async fn mqtt(a: &MqttBenchArgs) -> Result<(), String> {
    let tag = hex_tag();
    let topic = format!("pdsno/bench/{tag}");
    let sub = client(a, format!("bench-sub-{tag}")).await?;
    let publ = client(a, format!("bench-pub-{tag}")).await?;
    let mut rx = sub
        .subscribe(topic.clone(), a.qos)
        .await
        .map_err(|e| e.to_string())?;
    // Wait until the subscription is live.
    loop {
        publ.publish_confirmed(topic.clone(), vec![0u8; 4], 1, false)
            .await
            .map_err(|e| e.to_string())?;
        if tokio::time::timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_ok()
        {
            break;
        }
    }
    while rx.try_recv().is_ok() {}
    let base = Instant::now();
    let (_, mut unloaded) = one_run(
        &publ,
        &mut rx,
        &topic,
        a,
        a.latency_messages.max(1),
        1,
        base,
    )
    .await?;
    unloaded.sort();
    let (elapsed, mut loaded) = one_run(
        &publ,
        &mut rx,
        &topic,
        a,
        a.messages.max(1),
        a.window.max(1),
        base,
    )
    .await?;
    loaded.sort();
    let rate = a.messages as f64 / elapsed.as_secs_f64();
    println!(
        "mqtt.bench broker={} qos={} payload={}B",
        a.url,
        a.qos,
        a.payload.max(16)
    );
    println!(
        "mqtt.latency_unloaded n={} p50 {:.3} ms p99 {:.3} ms",
        unloaded.len(),
        percentile(&unloaded, 0.5).as_secs_f64() * 1e3,
        percentile(&unloaded, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "mqtt.throughput n={} window={} {:.0} msg/s, latency p50 {:.3} ms p99 {:.3} ms",
        a.messages,
        a.window,
        rate,
        percentile(&loaded, 0.5).as_secs_f64() * 1e3,
        percentile(&loaded, 0.99).as_secs_f64() * 1e3
    );
    publ.shutdown().await;
    sub.shutdown().await;
    Ok(())
}

fn hex_tag() -> String {
    let b = pdsno_shared::ids::random_bytes_32();
    b[..4].iter().map(|x| format!("{x:02x}")).collect()
}

async fn admission(a: &AdmissionBenchArgs) -> Result<(), String> {
    use pdsno_shared::ids::Role;

    let role = Role::parse(&a.kind)
        .filter(|r| *r != Role::Global)
        .ok_or("--kind is regional or local")?;
    let Some(url) = &a.url else {
        let tmp = tempfile::Builder::new()
            .prefix("pdsno-bench-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let parent = match role {
            Role::Local => "a global and a regional controller",
            _ => "a global controller",
        };
        eprintln!(
            "no --url: starting {parent} of our own (data in {}, deleted at the end)",
            tmp.path().display()
        );
        if a.bootstrap_secret_file.is_some() {
            eprintln!("(--bootstrap-secret-file is for a parent at --url; not used)");
        }
        let (mut nodes, url, secret) =
            super::bench_work::throwaway_parent(tmp.path(), role, &a.region).await?;
        eprintln!("benchmarking {url}");
        let r = admission_runs(a, &url, &secret, None, role).await;
        super::lab::stop_all(&mut nodes).await;
        return r;
    };
    let secret = match &a.bootstrap_secret_file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .trim_end_matches(['\n', '\r'])
            .to_owned(),
        None => std::env::var("PDSNO_BOOTSTRAP_SECRET").map_err(|_| {
            "with --url, give that parent's --bootstrap-secret-file or set PDSNO_BOOTSTRAP_SECRET (without --url the bench starts its own parent)".to_owned()
        })?,
    };
    let tls = crate::tls::TlsMaterial::load(&crate::tls::TlsOptions {
        cert: a.tls_cert.clone(),
        key: a.tls_key.clone(),
        ca: a.tls_ca.clone(),
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    admission_runs(a, url, &secret, tls.as_deref(), role)
        .await
        .map_err(|e| {
            format!("{e}\nIs {url} the parent's gRPC URL, started with --rate-limit-rps 0, and the secret its bootstrap secret? Without --url the bench starts its own parent.")
        })
}

/// Counts shared by a run's clients and its progress line.
#[derive(Default)]
struct RunCounts {
    started: std::sync::atomic::AtomicUsize,
    ok: std::sync::atomic::AtomicUsize,
    errors: std::sync::atomic::AtomicUsize,
}

/// Errors with no admission at all after which a run gives up (a wrong URL or secret).
const GIVE_UP_AFTER: usize = 10;

/// Runs longer than this show a progress line on stderr every second.
const PROGRESS_AFTER: Duration = Duration::from_secs(3);

/// The runs of `pdsno bench admission` against `url`, minting tokens from `secret`.
async fn admission_runs(
    a: &AdmissionBenchArgs,
    url: &str,
    secret: &str,
    tls: Option<&crate::tls::TlsMaterial>,
    role: pdsno_shared::ids::Role,
) -> Result<(), String> {
    use crate::admission::child::{ChildConfig, admit};
    use pdsno_shared::bootstrap::bootstrap_token;
    use pdsno_shared::ids::Role;
    use pdsno_shared::keys::IdentityKey;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    let clock: Arc<dyn pdsno_shared::time::Clock> = Arc::new(pdsno_shared::time::SystemClock);
    let duration = Duration::from_secs(a.duration.max(1));
    let mut best = (0.0f64, 0usize, Duration::ZERO, Duration::ZERO);
    let (mut all_ok, mut all_errors, mut an_error) = (0usize, 0usize, None);
    for &conns in &a.conns {
        let conns = conns.max(1);
        let started = Instant::now();
        let stop_at = started + duration;
        let counts = Arc::new(RunCounts::default());
        let mut tasks = Vec::new();
        for w in 0..conns {
            let link = crate::transport::parent::ParentLink::with_tls(url, tls)
                .map_err(|e| e.to_string())?;
            let (secret, region, clock, counts, max) = (
                secret.to_owned(),
                a.region.clone(),
                clock.clone(),
                counts.clone(),
                a.max,
            );
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut first_error = None;
                let mut n = 0u64;
                while Instant::now() < stop_at {
                    if max > 0 && counts.started.fetch_add(1, Ordering::Relaxed) >= max {
                        break;
                    }
                    if counts.ok.load(Ordering::Relaxed) == 0
                        && counts.errors.load(Ordering::Relaxed) >= GIVE_UP_AFTER
                    {
                        break;
                    }
                    let temp = format!("temp-bench-{}-{w}-{n}", hex_tag());
                    n += 1;
                    let region = if role == Role::Regional {
                        // Unique across runs too: the temp id's tag.
                        format!("{region}-{}", temp.trim_start_matches("temp-bench-"))
                    } else {
                        region.clone()
                    };
                    let token = bootstrap_token(secret.as_bytes(), &temp, &region, role.as_str());
                    let cfg = ChildConfig {
                        temp_id: temp,
                        role,
                        region: region.clone(),
                        bootstrap_token: SecretString::new(token),
                        network_key: None,
                        metadata: Default::default(),
                        root_public_key: None,
                        parent_pin: Default::default(),
                    };
                    let identity = IdentityKey::generate();
                    let t = Instant::now();
                    // The chain check needs an RC's chain; a GC result carries none for
                    // locals, so count any APPROVED answer.
                    match admit(&link, &cfg, &identity, &clock).await {
                        Ok(_) => {
                            lat.push(t.elapsed());
                            counts.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            counts.errors.fetch_add(1, Ordering::Relaxed);
                            first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                (lat, first_error)
            }));
        }
        let progress = (duration > PROGRESS_AFTER).then(|| {
            let (counts, max) = (counts.clone(), a.max);
            tokio::spawn(async move {
                let second = Duration::from_secs(1);
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + second, second);
                loop {
                    tick.tick().await;
                    let el = started.elapsed();
                    let ok = counts.ok.load(Ordering::Relaxed);
                    let of = if max > 0 { format!("/{max}") } else { String::new() };
                    eprintln!(
                        "progress conns={conns} {:.0}/{} s: {ok}{of} admitted, {} errors, {:.0} ops/s",
                        el.as_secs_f64(),
                        duration.as_secs(),
                        counts.errors.load(Ordering::Relaxed),
                        ok as f64 / el.as_secs_f64()
                    );
                }
            })
        });
        let mut lat = Vec::new();
        let mut first_error = None;
        let mut joined = Vec::with_capacity(tasks.len());
        for t in tasks {
            joined.push(t.await);
        }
        if let Some(p) = progress {
            p.abort();
        }
        for r in joined {
            let (l, f) = r.map_err(|e| e.to_string())?;
            lat.extend(l);
            if first_error.is_none() {
                first_error = f;
            }
        }
        // The run's real length: a --max run ends early, a timed one after its last
        // handshake in flight.
        let elapsed = started.elapsed();
        let errors = counts.errors.load(Ordering::Relaxed);
        lat.sort();
        all_ok += lat.len();
        all_errors += errors;
        if an_error.is_none() {
            an_error.clone_from(&first_error);
        }
        let rate = lat.len() as f64 / elapsed.as_secs_f64().max(1e-3);
        let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
        println!(
            "grpc.handshake conns={conns} {rate:.0} ops/s p50 {:.2} ms p99 {:.2} ms ok={} errors={errors}{}",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            lat.len(),
            first_error
                .map(|e| format!(" first_error={e}"))
                .unwrap_or_default()
        );
        if rate > best.0 {
            best = (rate, conns, p50, p99);
        }
        if lat.is_empty() && errors >= GIVE_UP_AFTER {
            // Nothing gets through: the next runs would only repeat the refusals.
            break;
        }
    }
    println!(
        "grpc.handshake.best {:.0} ops/s with {} conns (p50 {:.2} ms, p99 {:.2} ms)",
        best.0,
        best.1,
        best.2.as_secs_f64() * 1e3,
        best.3.as_secs_f64() * 1e3
    );
    // A benchmark of refusals measures nothing: say so, and fail.
    if all_errors > all_ok {
        return Err(format!(
            "most admissions failed ({all_errors} errors, {all_ok} admitted): the numbers above are not admission rates. First error: {}",
            an_error.unwrap_or_default()
        ));
    }
    Ok(())
}
