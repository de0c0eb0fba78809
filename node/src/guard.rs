//! The front guard of the REST and gRPC listeners: a per-client request rate (governor's
//! keyed GCRA limiter, by source address) and the admission lockout (too many failed
//! admission attempts from one address lock it out for a while).
//!
//! A refused request answers 429 `{"error":"Rate limit exceeded. Retry after N seconds"}`
//! with `Retry-After` (REST) or RESOURCE_EXHAUSTED with `retry-after` metadata (gRPC).
//! Lockouts are written to the audit log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock as _, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use chrono::{DateTime, Utc};
use pdsno_shared::time::parse_iso;

use crate::audit::Audit;
use crate::metrics::Metrics;
use crate::nib::events::EventRow;

/// Configured limits.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Requests per second per client address (0 = no limit).
    pub rate_per_sec: u32,
    /// Burst above the rate.
    pub burst: u32,
    /// Source networks the rate limit does not apply to (e.g. a NAT gateway in front of
    /// many controllers); the admission lockout still does.
    pub rate_limit_exempt: Vec<ipnet::IpNet>,
    /// Failed admissions from one address that trigger a lockout (0 = never).
    pub lockout_failures: u32,
    /// The window those failures are counted in.
    pub lockout_window: Duration,
    /// Lockout duration.
    pub lockout: Duration,
    /// Concurrent connections per listener.
    pub max_connections: usize,
    /// Concurrent connections one source address may hold per listener (0 = no cap); see
    /// [`pdsno_shared::slots`]. `rate_limit_exempt` networks are exempt.
    pub max_connections_per_address: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rate_per_sec: 200,
            burst: 400,
            rate_limit_exempt: Vec::new(),
            lockout_failures: 5,
            lockout_window: Duration::from_secs(60),
            lockout: Duration::from_secs(900),
            max_connections: 1024,
            max_connections_per_address: 64,
        }
    }
}

/// Why a request was refused before it reached a handler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Over the request rate.
    RateLimited {
        /// Whole seconds to wait (at least 1).
        retry_after: u64,
    },
    /// Locked out after failed admissions.
    LockedOut {
        /// Whole seconds left.
        retry_after: u64,
    },
}

impl Refusal {
    /// Seconds to wait.
    pub fn retry_after(&self) -> u64 {
        match self {
            Refusal::RateLimited { retry_after } | Refusal::LockedOut { retry_after } => {
                *retry_after
            }
        }
    }

    /// The message of the answer (the REST body's `error`).
    pub fn message(&self) -> String {
        match self {
            Refusal::RateLimited { retry_after } => {
                format!("Rate limit exceeded. Retry after {retry_after} seconds")
            }
            Refusal::LockedOut { retry_after } => format!(
                "Too many failed admission attempts from this address. Retry after {retry_after} seconds"
            ),
        }
    }
}

type Keyed = RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock>;

/// Most addresses whose failed admissions are tracked. Under a flood from more addresses
/// (each with a failure in the window, or locked out) a new address is not tracked until
/// entries expire: it is refused by the admission checks alone, and the lockouts already
/// in force stay.
const MAX_TRACKED_ADDRESSES: usize = 16_384;

#[derive(Default)]
struct Failures {
    /// Failure instants inside the window.
    recent: Vec<Instant>,
    locked_until: Option<Instant>,
}

/// The guard shared by the REST and gRPC listeners of one node.
pub struct Guard {
    limits: Limits,
    limiter: Option<Keyed>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    audit: Option<Arc<Audit>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("limits", &self.limits)
            .finish()
    }
}

fn ceil_secs(d: Duration) -> u64 {
    (d.as_millis().div_ceil(1000) as u64).max(1)
}

impl Guard {
    /// A guard with `limits`; lockouts are audited to `audit` when given.
    pub fn new(limits: Limits, audit: Option<Arc<Audit>>, metrics: Arc<Metrics>) -> Arc<Guard> {
        let limiter = NonZeroU32::new(limits.rate_per_sec).map(|rate| {
            let burst = NonZeroU32::new(limits.burst.max(limits.rate_per_sec)).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        let g = Arc::new(Guard {
            limits,
            limiter,
            failures: Mutex::new(HashMap::new()),
            audit,
            metrics,
        });
        // Forget idle clients so the tables stay bounded.
        let weak = Arc::downgrade(&g);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(30));
                loop {
                    tick.tick().await;
                    let Some(g) = weak.upgrade() else { break };
                    g.sweep();
                }
            });
        }
        g
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Failures>> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn sweep(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
        let now = Instant::now();
        let window = self.limits.lockout_window;
        self.failures().retain(|_, f| {
            f.recent.retain(|t| now.duration_since(*t) < window);
            f.locked_until.is_some_and(|u| u > now) || !f.recent.is_empty()
        });
    }

    /// Counts one request from `ip` against its rate; `transport` labels the metric.
    ///
    /// # Errors
    /// [`Refusal::RateLimited`] when over the rate.
    pub fn check_rate(&self, ip: IpAddr, transport: &'static str) -> Result<(), Refusal> {
        let Some(l) = &self.limiter else {
            return Ok(());
        };
        let ip = ip.to_canonical();
        if self
            .limits
            .rate_limit_exempt
            .iter()
            .any(|n| n.contains(&ip))
        {
            return Ok(());
        }
        match l.check_key(&ip) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                self.metrics.refused(transport, "rate_limited");
                Err(Refusal::RateLimited {
                    retry_after: ceil_secs(wait),
                })
            }
        }
    }

    /// Whether `ip` may attempt an admission now.
    ///
    /// # Errors
    /// [`Refusal::LockedOut`] while locked out.
    pub fn check_admission(&self, ip: IpAddr, transport: &'static str) -> Result<(), Refusal> {
        let now = Instant::now();
        let map = self.failures();
        if let Some(until) = map.get(&ip).and_then(|f| f.locked_until)
            && until > now
        {
            self.metrics.refused(transport, "locked_out");
            return Err(Refusal::LockedOut {
                retry_after: ceil_secs(until - now),
            });
        }
        Ok(())
    }

    /// Records a failed admission attempt from `ip`; returns true when it starts a lockout.
    pub fn admission_failed(&self, ip: IpAddr, reason: &str) -> bool {
        if self.limits.lockout_failures == 0 {
            return false;
        }
        let now = Instant::now();
        let window = self.limits.lockout_window;
        let locked = {
            let mut map = self.failures();
            if map.len() >= MAX_TRACKED_ADDRESSES && !map.contains_key(&ip) {
                map.retain(|_, f| {
                    f.recent.retain(|t| now.duration_since(*t) < window);
                    f.locked_until.is_some_and(|u| u > now) || !f.recent.is_empty()
                });
                if map.len() >= MAX_TRACKED_ADDRESSES {
                    return false;
                }
            }
            let f = map.entry(ip).or_default();
            f.recent.retain(|t| now.duration_since(*t) < window);
            f.recent.push(now);
            if f.recent.len() >= self.limits.lockout_failures as usize
                && f.locked_until.is_none_or(|u| u <= now)
            {
                f.locked_until = Some(now + self.limits.lockout);
                f.recent.clear();
                true
            } else {
                false
            }
        };
        if locked {
            self.metrics.lockouts.inc();
            tracing::warn!(source = %ip, lockout_secs = self.limits.lockout.as_secs(), last_reason = reason, "admission lockout");
            if let Some(a) = &self.audit {
                a.lockout(
                    ip,
                    self.limits.lockout_failures,
                    self.limits.lockout,
                    reason,
                );
            }
        }
        locked
    }

    /// Re-establishes the lockouts of an earlier run that have not ended yet, from the
    /// audit log's `ADMISSION_LOCKOUT` events (a restart must not open the door to an
    /// address that was locked out). Returns how many were restored.
    pub fn restore_lockouts(&self, events: &[EventRow], now: DateTime<Utc>) -> usize {
        let mono = Instant::now();
        let mut map = self.failures();
        let mut n: usize = 0;
        // Oldest first, so a clearing undoes the lockouts imposed before it.
        let mut ordered: Vec<&EventRow> = events.iter().collect();
        ordered.sort_by_key(|e| e.seq);
        for ev in ordered {
            let Ok(details) = pdsno_shared::json::parse(ev.details.as_bytes()) else {
                continue;
            };
            if ev.event_type == "ADMISSION_LOCKOUT_CLEARED" {
                if let Some(ip) = details
                    .get("source")
                    .and_then(|v| v.as_str())
                    .and_then(|s| s.parse::<IpAddr>().ok())
                    && map.remove(&ip).is_some_and(|f| f.locked_until.is_some())
                {
                    n = n.saturating_sub(1);
                }
                continue;
            }
            if ev.event_type != "ADMISSION_LOCKOUT" {
                continue;
            }
            let ip = details
                .get("source")
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse::<IpAddr>().ok());
            let secs = details.get("lockout_secs").and_then(|v| v.as_u64());
            let (Some(ip), Some(secs), Ok(at)) = (ip, secs, parse_iso(&ev.timestamp)) else {
                continue;
            };
            let end = at + chrono::Duration::seconds(i64::try_from(secs).unwrap_or(i64::MAX / 2));
            let Ok(left) = (end - now).to_std() else {
                continue; // ended (or the clock went back past its end)
            };
            // Never longer than it was when imposed (a clock set back must not extend it).
            let left = left.min(Duration::from_secs(secs));
            let until = mono + left;
            let f = map.entry(ip).or_default();
            if f.locked_until.is_none_or(|u| u < until) {
                f.locked_until = Some(until);
                n += 1;
            }
        }
        n
    }

    /// The addresses locked out now, with the seconds left, longest first.
    pub fn lockouts(&self) -> Vec<(IpAddr, u64)> {
        let now = Instant::now();
        let mut v: Vec<(IpAddr, u64)> = self
            .failures()
            .iter()
            .filter_map(|(ip, f)| {
                let until = f.locked_until.filter(|u| *u > now)?;
                Some((*ip, ceil_secs(until - now)))
            })
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Lifts the lockout of `ip` (an operator's decision, audited as
    /// `ADMISSION_LOCKOUT_CLEARED` so a restart does not restore it); also forgets its
    /// failures. Returns whether it was locked out.
    pub fn clear_lockout(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let was = self
            .failures()
            .remove(&ip)
            .and_then(|f| f.locked_until)
            .is_some_and(|u| u > now);
        if let Some(a) = &self.audit {
            a.lockout_cleared(ip, was);
        }
        tracing::warn!(source = %ip, was_locked_out = was, "admission lockout cleared by an operator");
        was
    }

    /// Records a successful admission from `ip`: its failure count starts again.
    pub fn admission_succeeded(&self, ip: IpAddr) {
        let mut map = self.failures();
        if let Some(f) = map.get_mut(&ip) {
            f.recent.clear();
        }
    }
}

/// Feeds the outcome of one admission message from `ip` to the lockout: a refused request
/// or a failed answer counts as a failure, an approval resets the count; a challenge, our
/// own trouble (busy, unavailable) and refusals that say nothing about the requester's
/// secrets (region full, region already served) count as neither.
pub fn record_admission(
    g: &Guard,
    ip: IpAddr,
    r: &Result<crate::inbound::Reply, crate::inbound::InboundError>,
) {
    use crate::inbound::{InboundError, Reply};
    use pdsno_shared::envelope::MessageType;
    match r {
        Err(InboundError::Busy(_) | InboundError::Unavailable(_)) => {}
        Err(e) => {
            g.admission_failed(ip, e.reason());
        }
        Ok(Reply::Envelope(e)) if e.message_type == MessageType::ValidationResult => {
            let status = e
                .payload
                .get("status")
                .and_then(pdsno_shared::json::Value::as_str)
                .unwrap_or("");
            let reason = e
                .payload
                .get("reason")
                .and_then(pdsno_shared::json::Value::as_str)
                .unwrap_or(status);
            if status == "APPROVED" {
                g.admission_succeeded(ip);
            } else if !matches!(
                reason,
                "CONTROLLER_QUOTA_EXCEEDED" | "REGION_ALREADY_SERVED"
            ) {
                g.admission_failed(ip, reason);
            }
        }
        Ok(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(l: Limits) -> Arc<Guard> {
        Guard::new(l, None, Arc::new(Metrics::new()))
    }

    #[test]
    fn rate_limit_is_per_address_with_a_retry_hint() {
        let g = guard(Limits {
            rate_per_sec: 1,
            burst: 3,
            ..Limits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        for _ in 0..3 {
            assert!(g.check_rate(a, "rest").is_ok());
        }
        let r = g.check_rate(a, "rest").expect_err("over the burst");
        assert!(
            matches!(r, Refusal::RateLimited { retry_after: 1 }),
            "{r:?}"
        );
        assert_eq!(r.message(), "Rate limit exceeded. Retry after 1 seconds");
        assert!(
            g.check_rate(b, "rest").is_ok(),
            "another client is not affected"
        );
    }

    #[test]
    fn failed_admissions_are_tracked_for_a_bounded_number_of_addresses() {
        let g = guard(Limits {
            lockout_failures: 2,
            ..Limits::default()
        });
        let first: IpAddr = "10.0.0.1".parse().expect("ip");
        assert!(!g.admission_failed(first, "bad token"));
        assert!(g.admission_failed(first, "bad token"), "locked out");
        for i in 1..(MAX_TRACKED_ADDRESSES as u32 + 1000) {
            g.admission_failed(IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i)), "x");
        }
        assert_eq!(g.failures().len(), MAX_TRACKED_ADDRESSES);
        assert!(
            g.check_admission(first, "rest").is_err(),
            "a lockout in force is kept"
        );
    }

    #[test]
    fn zero_rate_disables_the_limit() {
        let g = guard(Limits {
            rate_per_sec: 0,
            ..Limits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        for _ in 0..10_000 {
            assert!(g.check_rate(a, "grpc").is_ok());
        }
    }

    #[test]
    fn lockout_after_the_configured_failures_only_for_that_address() {
        let g = guard(Limits {
            lockout_failures: 3,
            lockout: Duration::from_secs(600),
            ..Limits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        assert!(!g.admission_failed(a, "x"));
        assert!(!g.admission_failed(a, "x"));
        assert!(g.check_admission(a, "rest").is_ok());
        assert!(g.admission_failed(a, "x"), "the third failure locks");
        let r = g.check_admission(a, "rest").expect_err("locked");
        assert!(
            matches!(r, Refusal::LockedOut { retry_after } if (599..=600).contains(&retry_after)),
            "{r:?}"
        );
        assert!(g.check_admission(b, "rest").is_ok());
    }

    #[test]
    fn success_resets_the_failure_count() {
        let g = guard(Limits {
            lockout_failures: 2,
            ..Limits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        assert!(!g.admission_failed(a, "x"));
        g.admission_succeeded(a);
        assert!(!g.admission_failed(a, "x"));
        assert!(g.check_admission(a, "grpc").is_ok());
    }

    #[test]
    fn a_full_or_served_region_is_not_a_failed_admission() {
        use pdsno_shared::envelope::{Envelope, MessageType};
        let g = guard(Limits {
            lockout_failures: 1,
            ..Limits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let result = |reason: &str| {
            let mut p = pdsno_shared::json::Map::new();
            p.insert("status".into(), "REJECTED".into());
            p.insert("reason".into(), reason.into());
            Ok(crate::inbound::Reply::Envelope(Box::new(Envelope::new(
                MessageType::ValidationResult,
                "global_cntl_1",
                "temp-x",
                p,
                chrono::Utc::now(),
            ))))
        };
        for reason in ["CONTROLLER_QUOTA_EXCEEDED", "REGION_ALREADY_SERVED"] {
            record_admission(&g, a, &result(reason));
            assert!(g.check_admission(a, "grpc").is_ok(), "{reason} locked out");
        }
        record_admission(&g, a, &result("INVALID_BOOTSTRAP_TOKEN"));
        assert!(g.check_admission(a, "grpc").is_err());
    }

    #[test]
    fn lockout_expires() {
        let g = guard(Limits {
            lockout_failures: 1,
            lockout: Duration::from_millis(50),
            ..Limits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        assert!(g.admission_failed(a, "x"));
        assert!(g.check_admission(a, "rest").is_err());
        std::thread::sleep(Duration::from_millis(80));
        assert!(g.check_admission(a, "rest").is_ok());
    }

    fn lockout_event(ip: &str, at: &str, secs: u64) -> EventRow {
        EventRow {
            seq: 1,
            event_id: "event-000000000001".into(),
            event_type: "ADMISSION_LOCKOUT".into(),
            actor: "global_cntl_1".into(),
            subject: Some(ip.into()),
            action: "Locked out".into(),
            decision: Some("LOCKED_OUT".into()),
            timestamp: at.into(),
            details: format!(
                r#"{{"failures":5,"last_reason":"x","lockout_secs":{secs},"source":"{ip}"}}"#
            ),
            prev_hash: String::new(),
            hash: String::new(),
            signature: String::new(),
        }
    }

    #[test]
    fn lockouts_of_an_earlier_run_are_restored_until_they_end() {
        let g = guard(Limits::default());
        let now = parse_iso("2026-03-01T12:10:00+00:00").expect("time");
        let mut broken = lockout_event("10.0.0.9", "2026-03-01T12:09:00+00:00", 900);
        broken.details = "not json".into();
        let mut other_type = lockout_event("10.0.0.8", "2026-03-01T12:09:00+00:00", 900);
        other_type.event_type = "MESSAGE_REJECTED".into();
        let events = [
            // 15 min imposed 5 min ago: 10 min left.
            lockout_event("10.0.0.1", "2026-03-01T12:05:00+00:00", 900),
            // Ended a minute ago.
            lockout_event("10.0.0.2", "2026-03-01T11:54:00+00:00", 900),
            // "In the future" (the clock was set back): no longer than imposed.
            lockout_event("10.0.0.3", "2026-03-01T13:00:00+00:00", 60),
            lockout_event("not-an-ip", "2026-03-01T12:09:00+00:00", 900),
            broken,
            other_type,
        ];
        assert_eq!(g.restore_lockouts(&events, now), 2);
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let r = g
            .check_admission(ip("10.0.0.1"), "grpc")
            .expect_err("still locked");
        assert!(
            matches!(r, Refusal::LockedOut { retry_after } if (599..=600).contains(&retry_after)),
            "{r:?}"
        );
        assert!(g.check_admission(ip("10.0.0.2"), "grpc").is_ok(), "ended");
        let r = g
            .check_admission(ip("10.0.0.3"), "grpc")
            .expect_err("locked");
        assert!(r.retry_after() <= 60, "{r:?}");
        for free in ["10.0.0.8", "10.0.0.9"] {
            assert!(g.check_admission(ip(free), "grpc").is_ok(), "{free}");
        }
    }

    #[test]
    fn exempt_networks_skip_the_rate_limit_only() {
        let g = guard(Limits {
            rate_per_sec: 1,
            burst: 1,
            rate_limit_exempt: vec![
                "10.1.0.0/16".parse().expect("net"),
                "fd00::/8".parse().expect("net"),
            ],
            lockout_failures: 1,
            ..Limits::default()
        });
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        for inside in ["10.1.2.3", "::ffff:10.1.200.1", "fd00::5"] {
            for _ in 0..100 {
                assert!(g.check_rate(ip(inside), "rest").is_ok(), "{inside}");
            }
        }
        assert!(g.check_rate(ip("10.2.0.1"), "rest").is_ok());
        assert!(
            g.check_rate(ip("10.2.0.1"), "rest").is_err(),
            "outside: limited"
        );
        assert!(
            g.admission_failed(ip("10.1.2.3"), "x"),
            "the lockout still applies"
        );
        assert!(g.check_admission(ip("10.1.2.3"), "rest").is_err());
    }
}
