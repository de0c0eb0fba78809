//! Prometheus metrics of one node, served as `GET /metrics` on the REST listener in the
//! standard text exposition format (OpenMetrics text, prometheus-client).
//!
//! - `pdsno_messages_total{type,transport,outcome}`: every message the receive path handled
//!   (`outcome` = `accepted` or the reject reason);
//! - `pdsno_rejects_total{reason}`;
//! - `pdsno_refused_total{transport,reason}`: refused before a handler (rate limit, lockout,
//!   connection cap, TLS handshake);
//! - `pdsno_admission_seconds`: handling time of admission messages (histogram);
//! - `pdsno_lockouts_total`;
//! - `pdsno_broker_connections`, `pdsno_broker_refused_total{reason}`,
//!   `pdsno_broker_throttled_total`, `pdsno_broker_retained_messages`,
//!   `pdsno_broker_retained_bytes` (embedded broker);
//! - `pdsno_mqtt_dropped_total` (this node's MQTT client: QoS 0 while offline, outbox
//!   overflow, subscriber queue full), `pdsno_mqtt_connection_errors_total`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `pdsno_messages_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    /// Message type.
    pub r#type: String,
    /// rest, grpc or mqtt.
    pub transport: String,
    /// accepted or the reject reason.
    pub outcome: String,
}

/// Labels of refusal counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// rest, grpc or mqtt.
    pub transport: String,
    /// Why.
    pub reason: String,
}

/// A label set with one `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: String,
}

/// Values read from elsewhere at scrape time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sampled {
    /// Open broker connections.
    pub broker_connections: Option<u64>,
    /// Broker refusals, in the order of [`BROKER_REFUSALS`].
    pub broker_refused: Option<[u64; 11]>,
    /// Retained messages the broker holds, and their bytes.
    pub broker_retained: Option<(u64, u64)>,
    /// Times the broker paused a controller publishing above its rate.
    pub broker_throttled: Option<u64>,
    /// MQTT client: messages dropped, connection errors.
    pub mqtt: Option<(u64, u64)>,
}

/// The `reason` labels of `pdsno_broker_refused_total`, in the order of
/// [`Sampled::broker_refused`]: wrong credentials, protocol, connection cap, protocol
/// violation after CONNECT, TLS, outside the topic rights, operator lockout, per-address
/// connection cap, reserved client id, retain where nothing is retained, retained-message
/// budget.
pub const BROKER_REFUSALS: [&str; 11] = [
    "auth",
    "protocol",
    "busy",
    "violation",
    "tls",
    "not_authorized",
    "banned",
    "per_address_limit",
    "client_id_reserved",
    "retain_forbidden",
    "retained_quota",
];

type Sampler = Box<dyn Fn(&mut Sampled) + Send + Sync>;

/// The metrics of one node.
pub struct Metrics {
    registry: Registry,
    messages: Family<MessageLabels, Counter>,
    rejects: Family<ReasonLabel, Counter>,
    refused: Family<RefusedLabels, Counter>,
    admission: Histogram,
    /// Lockouts started.
    pub lockouts: Counter,
    broker_connections: Gauge,
    broker_refused: Family<ReasonLabel, Counter>,
    broker_throttled: Counter,
    broker_retained: Gauge,
    broker_retained_bytes: Gauge,
    mqtt_dropped: Counter,
    mqtt_errors: Counter,
    samplers: Mutex<Vec<Sampler>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pdsno");
        // pdsno_build_info{version,commit} 1
        registry.register(
            "build",
            "The running build",
            prometheus_client::metrics::info::Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("commit", env!("BUILD_GIT_COMMIT")),
            ]),
        );
        let messages = Family::<MessageLabels, Counter>::default();
        registry.register(
            "messages",
            "Messages handled by the receive path, by type, transport and outcome",
            messages.clone(),
        );
        let rejects = Family::<ReasonLabel, Counter>::default();
        registry.register("rejects", "Messages refused, by reason", rejects.clone());
        let refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "refused",
            "Requests or connections refused before a handler (rate limit, lockout, connection cap, TLS)",
            refused.clone(),
        );
        let admission = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "admission_seconds",
            "Time to handle one admission message",
            admission.clone(),
        );
        let lockouts = Counter::default();
        registry.register("lockouts", "Admission lockouts started", lockouts.clone());
        let broker_connections = Gauge::default();
        registry.register(
            "broker_connections",
            "Open connections of the embedded broker",
            broker_connections.clone(),
        );
        let broker_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "broker_refused",
            "Connections the embedded broker refused or closed, by reason",
            broker_refused.clone(),
        );
        let broker_throttled = Counter::default();
        registry.register(
            "broker_throttled",
            "Times the embedded broker paused a controller publishing above its rate",
            broker_throttled.clone(),
        );
        let broker_retained = Gauge::default();
        registry.register(
            "broker_retained_messages",
            "Retained messages the embedded broker holds",
            broker_retained.clone(),
        );
        let broker_retained_bytes = Gauge::default();
        registry.register(
            "broker_retained_bytes",
            "Bytes (topics and payloads) of the retained messages the embedded broker holds",
            broker_retained_bytes.clone(),
        );
        let mqtt_dropped = Counter::default();
        registry.register(
            "mqtt_dropped",
            "Messages this node's MQTT client dropped (QoS 0 offline, outbox full, subscriber queue full)",
            mqtt_dropped.clone(),
        );
        let mqtt_errors = Counter::default();
        registry.register(
            "mqtt_connection_errors",
            "Failed connection attempts or lost connections of this node's MQTT client",
            mqtt_errors.clone(),
        );
        Metrics {
            registry,
            messages,
            rejects,
            refused,
            admission,
            lockouts,
            broker_connections,
            broker_refused,
            broker_throttled,
            broker_retained,
            broker_retained_bytes,
            mqtt_dropped,
            mqtt_errors,
            samplers: Mutex::new(Vec::new()),
        }
    }

    /// Counts one handled message.
    pub fn message(&self, kind: &str, transport: &str, outcome: &str) {
        self.messages
            .get_or_create(&MessageLabels {
                r#type: kind.to_owned(),
                transport: transport.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        if outcome != "accepted" {
            self.rejects
                .get_or_create(&ReasonLabel {
                    reason: outcome.to_owned(),
                })
                .inc();
        }
    }

    /// Counts one request refused before a handler.
    pub fn refused(&self, transport: &str, reason: &str) {
        self.refused
            .get_or_create(&RefusedLabels {
                transport: transport.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Records the handling time of one admission message.
    pub fn admission_time(&self, d: Duration) {
        self.admission.observe(d.as_secs_f64());
    }

    /// Adds a source of values read at scrape time.
    pub fn add_sampler(&self, f: impl Fn(&mut Sampled) + Send + Sync + 'static) {
        self.samplers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Box::new(f));
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut s = Sampled::default();
        for f in self
            .samplers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            f(&mut s);
        }
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        if let Some(c) = s.broker_connections {
            self.broker_connections.set(clamp(c));
        }
        if let Some(t) = s.broker_throttled {
            self.broker_throttled
                .inner()
                .store(t, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some((n, bytes)) = s.broker_retained {
            self.broker_retained.set(clamp(n));
            self.broker_retained_bytes.set(clamp(bytes));
        }
        if let Some(r) = s.broker_refused {
            for (reason, v) in BROKER_REFUSALS.iter().zip(r) {
                let c = self.broker_refused.get_or_create(&ReasonLabel {
                    reason: (*reason).to_owned(),
                });
                c.inner().store(v, std::sync::atomic::Ordering::Relaxed);
            }
        }
        if let Some((dropped, errors)) = s.mqtt {
            self.mqtt_dropped
                .inner()
                .store(dropped, std::sync::atomic::Ordering::Relaxed);
            self.mqtt_errors
                .inner()
                .store(errors, std::sync::atomic::Ordering::Relaxed);
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        // The standard process series (unprefixed, as every Prometheus exporter names them),
        // before the closing `# EOF`.
        let process = process_metrics();
        match out.rfind("# EOF") {
            Some(i) => out.insert_str(i, &process),
            None => out.push_str(&process),
        }
        out
    }
}

/// `process_*` series read from `/proc/self` (Linux; empty elsewhere): resident and virtual
/// memory, CPU seconds, open file descriptors, threads, start time.
fn process_metrics() -> String {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return String::new();
    };
    let kib = |key: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, v: f64| {
        out.push_str(&format!(
            "# TYPE {name} gauge\n# HELP {name} {help}\n{name} {v}\n"
        ));
    };
    if let Some(v) = kib("VmRSS:") {
        gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            (v * 1024) as f64,
        );
    }
    if let Some(v) = kib("VmSize:") {
        gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            (v * 1024) as f64,
        );
    }
    if let Some(v) = kib("Threads:") {
        gauge("process_threads", "Number of OS threads.", v as f64);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge(
            "process_open_fds",
            "Number of open file descriptors.",
            fds.count() as f64,
        );
    }
    // /proc/self/stat: fields after the command name; utime, stime and starttime in clock
    // ticks (USER_HZ, 100 on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    let btime = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    if let (Some(u), Some(s)) = (tick(11), tick(12)) {
        out.push_str(&format!(
            "# TYPE process_cpu_seconds counter\n# HELP process_cpu_seconds Total user and system CPU time spent in seconds.\nprocess_cpu_seconds_total {}\n",
            (u + s) / 100.0
        ));
    }
    if let (Some(start), Some(boot)) = (tick(19), btime) {
        out.push_str(&format!(
            "# TYPE process_start_time_seconds gauge\n# HELP process_start_time_seconds Start time of the process since the Unix epoch in seconds.\nprocess_start_time_seconds {}\n",
            boot + start / 100.0
        ));
    }
    out
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A shared handle.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_counters_with_labels() {
        let m = Metrics::new();
        m.message("DISCOVERY_REPORT", "mqtt", "accepted");
        m.message("DISCOVERY_REPORT", "mqtt", "replay");
        m.message("DISCOVERY_REPORT", "mqtt", "replay");
        m.refused("rest", "rate_limited");
        m.admission_time(Duration::from_millis(3));
        m.add_sampler(|s| {
            s.broker_connections = Some(7);
            s.broker_throttled = Some(3);
            s.broker_retained = Some((2, 300));
            s.broker_refused = Some([0, 0, 0, 0, 0, 0, 4, 5, 0, 6, 0]);
        });
        let text = m.render();
        assert!(
            text.contains(
                r#"pdsno_messages_total{type="DISCOVERY_REPORT",transport="mqtt",outcome="replay"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"pdsno_rejects_total{reason="replay"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pdsno_refused_total{transport="rest",reason="rate_limited"} 1"#),
            "{text}"
        );
        assert!(text.contains("pdsno_admission_seconds_count 1"), "{text}");
        assert!(text.contains("pdsno_broker_connections 7"), "{text}");
        assert!(text.contains("pdsno_broker_throttled_total 3"), "{text}");
        assert!(text.contains("pdsno_broker_retained_messages 2"), "{text}");
        assert!(text.contains("pdsno_broker_retained_bytes 300"), "{text}");
        for (reason, n) in [
            ("banned", 4),
            ("per_address_limit", 5),
            ("retain_forbidden", 6),
        ] {
            assert!(
                text.contains(&format!(
                    "pdsno_broker_refused_total{{reason=\"{reason}\"}} {n}\n"
                )),
                "{text}"
            );
        }
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
