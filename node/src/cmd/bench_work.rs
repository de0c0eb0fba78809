//! `pdsno bench discovery` and `pdsno bench policy`: the controllers' work, measured on a
//! real topology of `pdsno` processes on loopback.
//!
//! - discovery: a GC and an RC run as processes; the bench admits N local controllers
//!   against the RC (real admission handshakes) and sends their signed DISCOVERY_REPORTs
//!   over gRPC, all LCs at once; it reports device records written to the RC's NIB per
//!   second and the report round-trip times, and checks the RC stored every device.
//! - policy: a GC, an RC and N `pdsno local` processes; each round sets a new policy on
//!   the GC and times until every LC printed that it applied it (both signatures checked).

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Args;
use pdsno_shared::envelope::{Envelope, MessageType, typed_to_map};
use pdsno_shared::json::{Map, Value};
use pdsno_shared::keys::{IdentityKey, SecretString};
use pdsno_shared::payload::discovery::{Device, DiscoveryMethod, DiscoveryReport};
use pdsno_shared::time::format_iso;

use super::lab::{Node, node_args, own_secret, spawn, stop_all};

/// `pdsno bench discovery` arguments.
#[derive(Debug, Args)]
pub struct DiscoveryBenchArgs {
    /// Local controllers reporting at once.
    #[arg(long, default_value_t = 20)]
    pub lcs: usize,
    /// Devices per report.
    #[arg(long, default_value_t = 500)]
    pub devices: usize,
    /// Reports per local controller (the first has new devices, the others updates).
    #[arg(long, default_value_t = 4)]
    pub reports: usize,
}

/// `pdsno bench policy` arguments.
#[derive(Debug, Args)]
pub struct PolicyBenchArgs {
    /// Local controllers (each its own process).
    #[arg(long, default_value_t = 100)]
    pub lcs: usize,
    /// Policy changes to time.
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_kib(pid: Option<u32>) -> u64 {
    pid.and_then(super::lab::rss_kib).unwrap_or(0)
}

/// A GC and an RC (of `region`) as processes; returns them, the RC's gRPC address, its id
/// and its own bootstrap secret.
async fn topology(
    exe: &Path,
    dir: &Path,
    secret: &str,
    mqtt: bool,
    region: &str,
) -> Result<(Vec<Node>, String, String, String), String> {
    let timeout = Duration::from_secs(60);
    // Every load comes from one address: the per-client rate limit and the per-address
    // connection cap are off here.
    let mut gc_extra = vec![
        "--rate-limit-rps".to_owned(),
        "0".into(),
        "--max-connections-per-address".to_owned(),
        "0".into(),
        "--listen-mqtt".to_owned(),
        "127.0.0.1:0".into(),
        "--regions".into(),
        region.into(),
        "--heartbeat-interval".into(),
        "5".into(),
    ];
    if !mqtt {
        gc_extra.push("--no-mqtt".into());
    }
    let mut gc = spawn(
        exe,
        "global",
        &node_args("global", &dir.join("global"), &gc_extra),
        dir,
        secret,
    )?;
    let gc_grpc = gc.ready(timeout).await?.grpc;
    let temp = "temp-rc-bench";
    let token =
        pdsno_shared::bootstrap::bootstrap_token(secret.as_bytes(), temp, region, "regional");
    let mut rc_extra = vec![
        "--rate-limit-rps".to_owned(),
        "0".into(),
        "--max-connections-per-address".to_owned(),
        "0".into(),
        "--parent".to_owned(),
        format!("http://{gc_grpc}"),
        "--region".into(),
        region.into(),
        "--temp-id".into(),
        temp.into(),
        "--bootstrap-token".into(),
        token,
        "--quota-per-region".into(),
        "100000".into(),
        "--heartbeat-interval".into(),
        "5".into(),
        "--summary-interval".into(),
        "3600".into(),
    ];
    if !mqtt {
        rc_extra.push("--no-mqtt".into());
    }
    let mut rc = spawn(
        exe,
        temp,
        &node_args("regional", &dir.join(temp), &rc_extra),
        dir,
        secret,
    )?;
    let ready = rc.ready(timeout).await?;
    rc.wait_for("key ", timeout).await?;
    let (rc_grpc, rc_id) = (ready.grpc, ready.id);
    let rc_secret = own_secret(&dir.join(temp))?;
    Ok((vec![gc, rc], rc_grpc, rc_id, rc_secret))
}

/// A throwaway parent for `pdsno bench admission` without `--url`: for regional children a
/// global controller (no `--regions`: each admission asks for its own region), for local
/// children a global and a regional controller of `region`. Their data lives under `dir`;
/// every limit that one busy client address would hit is off. Returns the processes, the
/// gRPC URL to bench and the bootstrap secret that mints its tokens.
pub(crate) async fn throwaway_parent(
    dir: &Path,
    role: pdsno_shared::ids::Role,
    region: &str,
) -> Result<(Vec<Node>, String, String), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let secret = hex::encode(pdsno_shared::ids::random_bytes_32());
    if role == pdsno_shared::ids::Role::Local {
        let (nodes, rc_grpc, _, rc_secret) = topology(&exe, dir, &secret, false, region).await?;
        return Ok((nodes, format!("http://{rc_grpc}"), rc_secret));
    }
    let extra: Vec<String> = [
        "--rate-limit-rps",
        "0",
        "--max-connections-per-address",
        "0",
        "--no-mqtt",
        "--no-embedded-broker",
        "--heartbeat-interval",
        "5",
    ]
    .map(str::to_owned)
    .to_vec();
    let mut gc = spawn(
        &exe,
        "global",
        &node_args("global", &dir.join("global"), &extra),
        dir,
        &secret,
    )?;
    let grpc = match gc.ready(Duration::from_secs(60)).await {
        Ok(r) => r.grpc,
        Err(e) => {
            stop_all(std::slice::from_mut(&mut gc)).await;
            return Err(e);
        }
    };
    Ok((vec![gc], format!("http://{grpc}"), secret))
}

fn mac(lc: usize, d: usize) -> String {
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        (lc >> 8) & 255,
        lc & 255,
        (d >> 16) & 255,
        (d >> 8) & 255,
        d & 255
    )
}

/// Runs `pdsno bench discovery`.
pub async fn discovery(a: &DiscoveryBenchArgs) -> Result<(), String> {
    use crate::admission::child::{ChildConfig, admit};
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let tmp = tempfile::Builder::new()
        .prefix("pdsno-bench-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let dir = tmp.path().to_path_buf();
    let secret = hex::encode(pdsno_shared::ids::random_bytes_32());
    let (mut nodes, rc_grpc, rc_id, rc_secret) =
        topology(&exe, &dir, &secret, false, "zone-A").await?;
    let result = async {
        let url = format!("http://{rc_grpc}");
        let link = crate::transport::parent::ParentLink::new(&url).map_err(|e| e.to_string())?;
        let clock: std::sync::Arc<dyn pdsno_shared::time::Clock> =
            std::sync::Arc::new(pdsno_shared::time::SystemClock);
        // Admit the local controllers (real handshakes).
        let mut lcs = Vec::new();
        for i in 0..a.lcs.max(1) {
            let temp = format!("temp-lc-bench-{i}");
            let token = pdsno_shared::bootstrap::bootstrap_token(rc_secret.as_bytes(), &temp, "zone-A", "local");
            let cfg = ChildConfig {
                temp_id: temp,
                role: pdsno_shared::ids::Role::Local,
                region: "zone-A".into(),
                bootstrap_token: SecretString::new(token),
                network_key: None,
                metadata: Default::default(),
                root_public_key: None,
                parent_pin: Default::default(),
            };
            let identity = IdentityKey::generate();
            let adm = admit(&link, &cfg, &identity, &clock)
                .await
                .map_err(|e| e.to_string())?;
            lcs.push((adm.assigned_id, identity));
        }
        println!(
            "admitted {} local controllers; each sends {} reports of {} devices",
            lcs.len(),
            a.reports.max(1),
            a.devices.max(1)
        );
        // Prepare every report (signing and encoding are the LCs' cost, not the RC's).
        let mut plans = Vec::new();
        for (i, (id, key)) in lcs.iter().enumerate() {
            let mut envs = Vec::new();
            for r in 0..a.reports.max(1) {
                let now = chrono::Utc::now();
                let devices: Vec<Device> = (0..a.devices.max(1))
                    .map(|d| Device {
                        ip: format!("10.{}.{}.{}", r % 250, (d >> 8) & 255, d & 255),
                        mac: mac(i, d),
                        last_seen: format_iso(now),
                        protocol: "BENCH".into(),
                        reachable: true,
                        rtt_ms: Some(1.0),
                        hostname: Some(format!("dev-{i}-{d}")),
                        vendor: Some("Cisco".into()),
                        model: Some("Switch".into()),
                        uptime_seconds: Some(3600),
                        discovery_method: DiscoveryMethod::Snmp,
                        extra: Map::new(),
                    })
                    .collect();
                let mut extra = Map::new();
                extra.insert("report_id".into(), format!("bench-{i}-{r}").into());
                let report = DiscoveryReport {
                    lc_id: id.clone(),
                    subnet: "10.0.0.0/8".into(),
                    region: "zone-A".into(),
                    timestamp: format_iso(now),
                    new_devices: if r == 0 { devices.clone() } else { Vec::new() },
                    updated_devices: if r == 0 { Vec::new() } else { devices },
                    inactive_devices: Vec::new(),
                    extra,
                };
                let mut env = Envelope::new(
                    MessageType::DiscoveryReport,
                    id.clone(),
                    rc_id.clone(),
                    typed_to_map(&report).map_err(|e| e.to_string())?,
                    now,
                );
                pdsno_shared::signing::sign_ed25519(&mut env, key, None, now);
                envs.push(env);
            }
            plans.push(envs);
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for envs in plans {
            let link = crate::transport::parent::ParentLink::new(&url).map_err(|e| e.to_string())?;
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                for env in envs {
                    let t = Instant::now();
                    let reply = link.exchange(&env).await.map_err(|e| e.to_string())?;
                    let ok = reply.is_some_and(|r| r.message_type == MessageType::DiscoveryReportAck);
                    if !ok {
                        return Err("a report was not acknowledged".to_owned());
                    }
                    lat.push(t.elapsed());
                }
                Ok::<_, String>(lat)
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.map_err(|e| e.to_string())??);
        }
        let elapsed = started.elapsed();
        lat.sort();
        let records = (a.lcs.max(1) * a.devices.max(1) * a.reports.max(1)) as f64;
        let rc_rss = rss_kib(nodes.get(1).and_then(Node::pid));
        // Check: the RC stored every device.
        let st = super::lab::admin_call(&dir.join("temp-rc-bench"), &rc_grpc, "status", Value::Object(Map::new())).await?;
        let stored = st
            .get("discovery")
            .and_then(|d| d.get("active_devices"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let want = (a.lcs.max(1) * a.devices.max(1)) as u64;
        println!(
            "discovery.ingest lcs={} devices/report={} reports={} records={records:.0} in {:.2} s: {:.0} records/s ({:.0} reports/s); report round trip p50 {:.1} ms p99 {:.1} ms; RC stores {stored}/{want} devices; RC RSS {:.1} MiB",
            a.lcs.max(1),
            a.devices.max(1),
            a.reports.max(1),
            elapsed.as_secs_f64(),
            records / elapsed.as_secs_f64(),
            lat.len() as f64 / elapsed.as_secs_f64(),
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
            rc_rss as f64 / 1024.0
        );
        if stored != want {
            return Err(format!("the RC stores {stored} devices, expected {want}"));
        }
        Ok(())
    }
    .await;
    stop_all(&mut nodes).await;
    result
}

/// Runs `pdsno bench policy`.
pub async fn policy(a: &PolicyBenchArgs) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let tmp = tempfile::Builder::new()
        .prefix("pdsno-bench-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let dir = tmp.path().to_path_buf();
    let secret = hex::encode(pdsno_shared::ids::random_bytes_32());
    let (mut nodes, rc_grpc, _rc_id, rc_secret) =
        topology(&exe, &dir, &secret, true, "zone-A").await?;
    let timeout = Duration::from_secs(120);
    let result = async {
        let gc_grpc = nodes
            .first()
            .and_then(Node::seen_ready)
            .map(|r| r.grpc)
            .ok_or("no GC")?;
        let started = Instant::now();
        for i in 0..a.lcs.max(1) {
            let temp = format!("temp-lc-{i}");
            let token = pdsno_shared::bootstrap::bootstrap_token(rc_secret.as_bytes(), &temp, "zone-A", "local");
            let args = node_args(
                "local",
                &dir.join(&temp),
                &[
                    "--parent".into(),
                    format!("http://{rc_grpc}"),
                    "--region".into(),
                    "zone-A".into(),
                    "--temp-id".into(),
                    temp.clone(),
                    "--bootstrap-token".into(),
                    token,
                    "--heartbeat-interval".into(),
                    "5".into(),
                    "--discovery-interval".into(),
                    "3600".into(),
                ],
            );
            nodes.push(spawn(&exe, &temp, &args, &dir, &secret)?);
        }
        for n in nodes.iter_mut().skip(2) {
            n.wait_for("policy version=1 applied", timeout).await?;
        }
        println!(
            "{} local controllers up, each applied policy v1, in {:.1} s",
            a.lcs.max(1),
            started.elapsed().as_secs_f64()
        );
        let mut per_lc = Vec::new();
        let mut all = Vec::new();
        for round in 0..a.rounds.max(1) {
            let mut content = crate::policy::default_content();
            content.insert("round".into(), (round as u64).into());
            let mut args = Map::new();
            args.insert("content".into(), Value::Object(content));
            let t0 = Instant::now();
            let key = crate::admin::read_key(&dir.join("global"))?;
            let r = crate::admin::call(
                &format!("http://{gc_grpc}"),
                &key,
                "policy.set",
                &Value::Object(args),
                Duration::from_secs(10),
            )
            .await?;
            let v = r.get("policy_version").and_then(Value::as_u64).ok_or("no version")?;
            let want = format!("policy version={v} applied");
            let mut last = Duration::ZERO;
            for n in nodes.iter_mut().skip(2) {
                let (at, _) = n.next_match("the policy", |l| l == want, timeout).await?;
                let d = at.saturating_duration_since(t0);
                per_lc.push(d);
                last = last.max(d);
            }
            all.push(last);
        }
        per_lc.sort();
        all.sort();
        println!(
            "policy.fanout lcs={} rounds={}: GC set -> LC applied p50 {:.1} ms p99 {:.1} ms; all {} applied p50 {:.1} ms p99 {:.1} ms; RSS GC {:.1} MiB RC {:.1} MiB LC {:.1} MiB",
            a.lcs.max(1),
            a.rounds.max(1),
            ms(percentile(&per_lc, 0.5)),
            ms(percentile(&per_lc, 0.99)),
            a.lcs.max(1),
            ms(percentile(&all, 0.5)),
            ms(percentile(&all, 0.99)),
            rss_kib(nodes.first().and_then(Node::pid)) as f64 / 1024.0,
            rss_kib(nodes.get(1).and_then(Node::pid)) as f64 / 1024.0,
            rss_kib(nodes.get(2).and_then(Node::pid)) as f64 / 1024.0,
        );
        Ok::<(), String>(())
    }
    .await;
    stop_all(&mut nodes).await;
    result
}
