//! Prometheus metrics of one process, served as `GET /metrics` (OpenMetrics text,
//! prometheus-client) on a controller's REST listener and on the plaintext
//! `--listen-metrics` listener of a controller or of `pdsno broker`.
//!
//! Every series below exists from the start (counters at 0, labelled families filled with
//! their fixed label values), so `rate()` and alerts never see "no data"; the lists live in
//! [`Scope::series`] and the tests check the exposition against them.
//!
//! Every process:
//! - `pdsno_build_info{version,commit}`;
//! - `process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_threads`,
//!   `process_open_fds`, `process_cpu_seconds_total`, `process_start_time_seconds`.
//!
//! A controller:
//! - `pdsno_messages_total{type,transport,outcome}`: every message the receive path handled
//!   (`outcome` = `accepted` or the reject reason); from the start one series per message
//!   type the controller handles and transport (`rest`, `grpc`, `mqtt`) with `accepted`;
//! - `pdsno_rejects_total{reason}` (every reason of [`REJECT_REASONS`] from the start);
//! - `pdsno_refused_total{transport,reason}`: refused before a handler (rate limit, lockout,
//!   connection cap, TLS handshake): [`REFUSAL_REASONS`] for `rest` and `grpc`, and the
//!   connection caps ([`CONNECTION_REFUSALS`]) for `metrics` when `--listen-metrics` is on;
//! - `pdsno_admission_seconds`: handling time of admission messages (histogram);
//! - `pdsno_lockouts_total`;
//! - `pdsno_mqtt_dropped_total` (this node's MQTT client: QoS 0 while offline, outbox
//!   overflow, subscriber queue full), `pdsno_mqtt_connection_errors_total`.
//!
//! A process that runs a broker (a global controller with its embedded broker, and
//! `pdsno broker`), and no other:
//! - `pdsno_broker_connections`, `pdsno_broker_refused_total{reason}` (every reason of
//!   [`BROKER_REFUSALS`] from the start), `pdsno_broker_throttled_total`,
//!   `pdsno_broker_retained_messages`, `pdsno_broker_retained_bytes`,
//!   `pdsno_broker_filters`.

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
    pub broker_refused: Option<[u64; 12]>,
    /// Retained messages the broker holds, and their bytes.
    pub broker_retained: Option<(u64, u64)>,
    /// Distinct subscription filters the broker holds a log for.
    pub broker_filters: Option<u64>,
    /// Times the broker paused a controller publishing above its rate.
    pub broker_throttled: Option<u64>,
    /// MQTT client: messages dropped, connection errors.
    pub mqtt: Option<(u64, u64)>,
}

/// The `reason` labels of `pdsno_broker_refused_total`, in the order of
/// [`Sampled::broker_refused`]: wrong credentials, protocol, connection cap, protocol
/// violation after CONNECT, TLS, outside the topic rights, operator lockout, per-address
/// connection cap, reserved client id, retain where nothing is retained, retained-message
/// budget, number of distinct subscription filters.
pub const BROKER_REFUSALS: [&str; 12] = [
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
    "filter_quota",
];

/// The `reason` labels of `pdsno_rejects_total` (and the non-`accepted` outcomes of
/// `pdsno_messages_total`): the receive path's refusals
/// ([`crate::inbound::InboundError::reason`]) and the MQTT link's own (`bad_topic`,
/// `wrong_topic`, `policy_refused`, `stale_policy`).
pub const REJECT_REASONS: [&str; 16] = [
    "malformed",
    "unsigned",
    "replay",
    "stale",
    "bad_signature",
    "forbidden",
    "unavailable",
    "wrong_recipient",
    "type_mismatch",
    "no_handler",
    "busy",
    "tls_identity_mismatch",
    "bad_topic",
    "wrong_topic",
    "policy_refused",
    "stale_policy",
];

/// The transports of `pdsno_messages_total`.
pub const TRANSPORTS: [&str; 4] = ["rest", "grpc", "mqtt", "bus"];

/// The `reason` labels of `pdsno_refused_total` for the `rest` and `grpc` listeners.
pub const REFUSAL_REASONS: [&str; 5] = [
    "rate_limited",
    "locked_out",
    "connection_cap",
    "per_address_limit",
    "tls_handshake",
];

/// The `transport` label of the `--listen-metrics` listener's refusals, and the only
/// reasons it has (it is plaintext and not rate limited).
pub const METRICS_TRANSPORT: &str = "metrics";
/// See [`METRICS_TRANSPORT`].
pub const CONNECTION_REFUSALS: [&str; 2] = ["connection_cap", "per_address_limit"];

/// Which series a process exposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// A controller without a broker (regional, local, a global controller with
    /// `--no-embedded-broker`).
    Node,
    /// A global controller running its embedded broker.
    NodeWithBroker,
    /// `pdsno broker`: the broker alone.
    Broker,
}

/// Series of every process.
pub const COMMON_SERIES: [&str; 7] = [
    "pdsno_build_info",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_threads",
    "process_open_fds",
    "process_cpu_seconds_total",
    "process_start_time_seconds",
];

/// Series of a controller.
pub const NODE_SERIES: [&str; 7] = [
    "pdsno_messages_total",
    "pdsno_rejects_total",
    "pdsno_refused_total",
    "pdsno_admission_seconds",
    "pdsno_lockouts_total",
    "pdsno_mqtt_dropped_total",
    "pdsno_mqtt_connection_errors_total",
];

/// Series of a process running a broker.
pub const BROKER_SERIES: [&str; 6] = [
    "pdsno_broker_connections",
    "pdsno_broker_refused_total",
    "pdsno_broker_throttled_total",
    "pdsno_broker_retained_messages",
    "pdsno_broker_retained_bytes",
    "pdsno_broker_filters",
];

impl Scope {
    /// True when the process runs a broker.
    pub fn has_broker(self) -> bool {
        matches!(self, Scope::NodeWithBroker | Scope::Broker)
    }

    /// True for a controller.
    pub fn is_node(self) -> bool {
        matches!(self, Scope::Node | Scope::NodeWithBroker)
    }

    /// The documented series names this process exposes from the start (a histogram by its
    /// base name).
    pub fn series(self) -> Vec<&'static str> {
        let mut v = COMMON_SERIES.to_vec();
        if self.is_node() {
            v.extend(NODE_SERIES);
        }
        if self.has_broker() {
            v.extend(BROKER_SERIES);
        }
        v
    }
}

/// True when the exposition `text` has a sample of series `name` (for a histogram, of its
/// `_count`, `_sum` or `_bucket`), not only its `# TYPE` line.
pub fn has_sample(text: &str, name: &str) -> bool {
    text.lines().filter(|l| !l.starts_with('#')).any(|l| {
        let metric = l.split(['{', ' ']).next().unwrap_or_default();
        metric == name
            || metric
                .strip_prefix(name)
                .is_some_and(|rest| matches!(rest, "_count" | "_sum" | "_bucket"))
    })
}

impl Sampled {
    /// Takes the broker's values from its counters.
    pub fn broker(&mut self, st: &pdsno_broker::StatsSnapshot) {
        self.broker_connections = Some(st.active);
        self.broker_throttled = Some(st.throttled);
        self.broker_retained = Some((st.retained_messages, st.retained_bytes));
        self.broker_filters = Some(st.filters);
        self.broker_refused = Some([
            st.refused_auth,
            st.refused_protocol,
            st.refused_busy,
            st.violations,
            st.tls_failures,
            st.denied,
            st.banned,
            st.refused_per_address,
            st.refused_client_id,
            st.retain_forbidden,
            st.retained_quota,
            st.filter_quota,
        ]);
    }
}

type Sampler = Box<dyn Fn(&mut Sampled) + Send + Sync>;

/// The metrics of one process.
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
    broker_filters: Gauge,
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
    /// The metrics of a controller without a broker.
    pub fn new() -> Metrics {
        Metrics::with_scope(Scope::Node)
    }

    /// Registers the series of `scope`, each with its fixed label values at 0.
    pub fn with_scope(scope: Scope) -> Metrics {
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
        let rejects = Family::<ReasonLabel, Counter>::default();
        let refused = Family::<RefusedLabels, Counter>::default();
        let admission = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let lockouts = Counter::default();
        let mqtt_dropped = Counter::default();
        let mqtt_errors = Counter::default();
        if scope.is_node() {
            registry.register(
                "messages",
                "Messages handled by the receive path, by type, transport and outcome",
                messages.clone(),
            );
            registry.register("rejects", "Messages refused, by reason", rejects.clone());
            for reason in REJECT_REASONS {
                let _ = rejects.get_or_create(&ReasonLabel {
                    reason: reason.to_owned(),
                });
            }
            registry.register(
                "refused",
                "Requests or connections refused before a handler (rate limit, lockout, connection cap, TLS)",
                refused.clone(),
            );
            for transport in ["rest", "grpc"] {
                for reason in REFUSAL_REASONS {
                    let _ = refused.get_or_create(&RefusedLabels {
                        transport: transport.to_owned(),
                        reason: reason.to_owned(),
                    });
                }
            }
            registry.register(
                "admission_seconds",
                "Time to handle one admission message",
                admission.clone(),
            );
            registry.register("lockouts", "Admission lockouts started", lockouts.clone());
            registry.register(
                "mqtt_dropped",
                "Messages this node's MQTT client dropped (QoS 0 offline, outbox full, subscriber queue full)",
                mqtt_dropped.clone(),
            );
            registry.register(
                "mqtt_connection_errors",
                "Failed connection attempts or lost connections of this node's MQTT client",
                mqtt_errors.clone(),
            );
        }
        let broker_connections = Gauge::default();
        let broker_refused = Family::<ReasonLabel, Counter>::default();
        let broker_throttled = Counter::default();
        let broker_retained = Gauge::default();
        let broker_retained_bytes = Gauge::default();
        let broker_filters = Gauge::default();
        if scope.has_broker() {
            registry.register(
                "broker_connections",
                "Open connections of the embedded broker",
                broker_connections.clone(),
            );
            registry.register(
                "broker_refused",
                "Connections the embedded broker refused or closed, by reason",
                broker_refused.clone(),
            );
            for reason in BROKER_REFUSALS {
                let _ = broker_refused.get_or_create(&ReasonLabel {
                    reason: reason.to_owned(),
                });
            }
            registry.register(
                "broker_throttled",
                "Times the embedded broker paused a controller publishing above its rate",
                broker_throttled.clone(),
            );
            registry.register(
                "broker_retained_messages",
                "Retained messages the embedded broker holds",
                broker_retained.clone(),
            );
            registry.register(
                "broker_retained_bytes",
                "Bytes (topics and payloads) of the retained messages the embedded broker holds",
                broker_retained_bytes.clone(),
            );
            registry.register(
                "broker_filters",
                "Distinct subscription filters the embedded broker keeps a message log for",
                broker_filters.clone(),
            );
        }
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
            broker_filters,
            mqtt_dropped,
            mqtt_errors,
            samplers: Mutex::new(Vec::new()),
        }
    }

    /// Creates `pdsno_messages_total{type,transport,outcome="accepted"}` at 0 for each of
    /// `types` (the message types this controller handles) on every transport.
    pub fn expect_messages<T: AsRef<str>>(&self, types: impl IntoIterator<Item = T>) {
        for kind in types {
            for transport in TRANSPORTS {
                let _ = self.messages.get_or_create(&MessageLabels {
                    r#type: kind.as_ref().to_owned(),
                    transport: transport.to_owned(),
                    outcome: "accepted".to_owned(),
                });
            }
        }
    }

    /// Creates `pdsno_refused_total{transport,reason}` at 0 for each of `reasons`.
    pub fn expect_refusals(&self, transport: &str, reasons: &[&str]) {
        for reason in reasons {
            let _ = self.refused.get_or_create(&RefusedLabels {
                transport: transport.to_owned(),
                reason: (*reason).to_owned(),
            });
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
        if let Some(n) = s.broker_filters {
            self.broker_filters.set(clamp(n));
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
        let m = Metrics::with_scope(Scope::NodeWithBroker);
        m.message("DISCOVERY_REPORT", "mqtt", "accepted");
        m.message("DISCOVERY_REPORT", "mqtt", "replay");
        m.message("DISCOVERY_REPORT", "mqtt", "replay");
        m.refused("rest", "rate_limited");
        m.admission_time(Duration::from_millis(3));
        m.add_sampler(|s| {
            s.broker_connections = Some(7);
            s.broker_throttled = Some(3);
            s.broker_retained = Some((2, 300));
            s.broker_refused = Some([0, 0, 0, 0, 0, 0, 4, 5, 0, 6, 0, 8]);
            s.broker_filters = Some(9);
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
        assert!(text.contains("pdsno_broker_filters 9"), "{text}");
        for (reason, n) in [
            ("banned", 4),
            ("per_address_limit", 5),
            ("retain_forbidden", 6),
            ("filter_quota", 8),
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

    #[test]
    fn every_documented_series_exists_from_the_start_and_broker_series_only_with_a_broker() {
        for scope in [Scope::Node, Scope::NodeWithBroker, Scope::Broker] {
            let m = Metrics::with_scope(scope);
            m.expect_messages(["HEARTBEAT"]);
            let text = m.render();
            for name in scope.series() {
                assert!(has_sample(&text, name), "{scope:?}: no {name}\n{text}");
            }
            assert_eq!(text.contains("pdsno_broker_"), scope.has_broker(), "{text}");
            assert_eq!(text.contains("pdsno_messages_"), scope.is_node(), "{text}");
            // Nothing undocumented.
            for l in text.lines().filter(|l| !l.starts_with('#')) {
                let metric = l.split(['{', ' ']).next().unwrap_or_default();
                assert!(
                    scope.series().iter().any(|n| has_sample(l, n)),
                    "{scope:?}: undocumented {metric}"
                );
            }
        }
        let text = Metrics::new().render();
        for reason in REJECT_REASONS {
            assert!(
                text.contains(&format!("pdsno_rejects_total{{reason=\"{reason}\"}} 0\n")),
                "{reason}\n{text}"
            );
        }
        assert!(
            text.contains(r#"pdsno_refused_total{transport="grpc",reason="tls_handshake"} 0"#),
            "{text}"
        );
        assert!(!text.contains("transport=\"metrics\""), "{text}");
        assert!(!has_sample(
            "# TYPE pdsno_lockouts counter\n",
            "pdsno_lockouts_total"
        ));
        let m = Metrics::with_scope(Scope::NodeWithBroker);
        m.expect_messages(["VALIDATION_REQUEST"]);
        m.expect_refusals(METRICS_TRANSPORT, &CONNECTION_REFUSALS);
        let text = m.render();
        assert!(
            text.contains(r#"pdsno_messages_total{type="VALIDATION_REQUEST",transport="mqtt",outcome="accepted"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"pdsno_refused_total{transport="metrics",reason="per_address_limit"} 0"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"pdsno_broker_refused_total{reason="retained_quota"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn the_module_doc_names_every_series_and_every_reject_reason_is_listed() {
        let doc: String = include_str!("metrics.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .collect::<Vec<_>>()
            .join("\n");
        for name in Scope::NodeWithBroker.series() {
            assert!(doc.contains(&format!("`{name}")), "the doc lacks {name}");
        }
        use crate::inbound::InboundError;
        use pdsno_shared::envelope::MessageType;
        use pdsno_shared::signing::VerifyError;
        let errors = [
            InboundError::BadRequest(String::new()),
            InboundError::Unsigned,
            InboundError::BadSignature(VerifyError::Replay),
            InboundError::BadSignature(VerifyError::Stale {
                age_secs: 1,
                max_secs: 0,
            }),
            InboundError::BadSignature(VerifyError::BadSignature),
            InboundError::Forbidden(String::new()),
            InboundError::Unavailable(String::new()),
            InboundError::WrongRecipient {
                recipient: String::new(),
                me: String::new(),
            },
            InboundError::TypeMismatch {
                body: MessageType::Heartbeat,
                path: MessageType::Heartbeat,
            },
            InboundError::NoHandler(MessageType::Heartbeat),
            InboundError::Busy(String::new()),
            InboundError::PeerMismatch {
                peer: String::new(),
                sender: String::new(),
            },
        ];
        for e in errors {
            assert!(REJECT_REASONS.contains(&e.reason()), "{}", e.reason());
        }
    }
}
