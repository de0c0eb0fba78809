//! rumqttd, run on our tokio runtime behind loopback-only listeners.
//!
//! rumqttd binds its listeners itself and cannot report the bound port, so we pick free
//! loopback ports, start it, and prove each listener is rumqttd by completing an MQTT
//! handshake with the internal credential. Only the front door knows that credential; a
//! local process that finds the internal port cannot log in.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttd::{
    ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings, Strategy,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use crate::BrokerError;
use crate::codec::{Connect, Version};
use crate::config::BrokerLimits;

/// The user name the front door presents to rumqttd.
pub(crate) const INTERNAL_USER: &str = "pdsno-front-door";

/// Internal listeners per protocol version. rumqttd's accept loop sleeps after every
/// accept (`next_connection_delay_ms`, and tokio's timer turns even a zero delay into a
/// wait for the next millisecond tick), so one listener takes at most ~1,000 connections a
/// second; the front door spreads its connections over several.
pub(crate) const ACCEPT_LANES: usize = 8;

/// The running rumqttd: [`ACCEPT_LANES`] internal listeners per protocol version.
pub(crate) struct Inner {
    pub(crate) v4: Vec<SocketAddr>,
    pub(crate) v5: Vec<SocketAddr>,
    pub(crate) secret: Zeroizing<String>,
    tasks: Vec<JoinHandle<()>>,
}

impl Inner {
    /// Stops the internal listeners. rumqttd's router thread has no stop API and stays
    /// parked until the process exits (one idle thread per broker started).
    pub(crate) fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_loopback_port() -> Result<SocketAddr, BrokerError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BrokerError::Internal(format!("no free loopback port: {e}")))?;
    l.local_addr()
        .map_err(|e| BrokerError::Internal(e.to_string()))
}

fn connection_settings(limits: &BrokerLimits, secret: &str) -> ConnectionSettings {
    ConnectionSettings {
        connection_timeout_ms: 5_000,
        // The front door already enforced the client's limit; leave room for the rewritten
        // CONNECT's longer credentials.
        max_payload_size: limits.max_packet_size + 1024,
        max_inflight_count: limits.read_batch.max(1),
        auth: Some(HashMap::from([(
            INTERNAL_USER.to_owned(),
            secret.to_owned(),
        )])),
        external_auth: None,
        dynamic_filters: true,
    }
}

pub(crate) async fn start(limits: &BrokerLimits) -> Result<Inner, BrokerError> {
    let secret = Zeroizing::new(hex::encode(pdsno_shared::ids::random_bytes_32()));
    // rumqttd refuses to start a subscription log below these sizes (it panics in its
    // router thread), so clamp here.
    let router_cfg = RouterConfig {
        max_connections: limits.max_connections + 16,
        max_outgoing_packet_count: 200,
        max_segment_size: limits.segment_size.max(1024),
        max_segment_count: limits.segment_count.max(1),
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Strategy::default(),
    };
    let router_tx = Router::new(0, router_cfg).spawn();
    let mut inner = Inner {
        v4: Vec::new(),
        v5: Vec::new(),
        secret,
        tasks: Vec::new(),
    };
    let lanes = [Version::V311, Version::V5]
        .into_iter()
        .flat_map(|v| std::iter::repeat_n(v, ACCEPT_LANES));
    for version in lanes {
        let mut last_err = String::new();
        let mut started = false;
        for _attempt in 0..5 {
            let addr = free_loopback_port()?;
            let settings = ServerSettings {
                name: format!("internal-{version}"),
                listen: addr,
                tls: None,
                next_connection_delay_ms: 0,
                connections: connection_settings(limits, &inner.secret),
            };
            let tx = router_tx.clone();
            let task = match version {
                Version::V311 => tokio::spawn(async move {
                    let mut s = Server::new(settings, tx, rumqttd::protocol::v4::V4);
                    if let Err(e) = s.start(LinkType::Remote).await {
                        tracing::error!(error = %e, "embedded broker listener stopped");
                    }
                }),
                Version::V5 => tokio::spawn(async move {
                    let mut s = Server::new(settings, tx, rumqttd::protocol::v5::V5);
                    if let Err(e) = s.start(LinkType::Remote).await {
                        tracing::error!(error = %e, "embedded broker listener stopped");
                    }
                }),
            };
            match probe(addr, version, &inner.secret, &task).await {
                Ok(()) => {
                    match version {
                        Version::V311 => inner.v4.push(addr),
                        Version::V5 => inner.v5.push(addr),
                    }
                    inner.tasks.push(task);
                    started = true;
                    break;
                }
                Err(e) => {
                    task.abort();
                    last_err = e;
                }
            }
        }
        if !started {
            return Err(BrokerError::Internal(format!(
                "embedded broker did not start: {last_err}"
            )));
        }
    }
    Ok(inner)
}

/// Proves `addr` is our rumqttd: a CONNECT with the internal credential gets CONNACK 0.
async fn probe(
    addr: SocketAddr,
    version: Version,
    secret: &str,
    task: &JoinHandle<()>,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if task.is_finished() {
            return Err(format!("listener {addr} failed to bind"));
        }
        match TcpStream::connect(addr).await {
            Ok(mut s) => {
                let connect = Connect {
                    version,
                    clean: true,
                    keep_alive: 10,
                    properties: Vec::new(),
                    client_id: format!(
                        "pdsno-probe-{}",
                        hex::encode(&pdsno_shared::ids::random_bytes_32()[..6])
                    ),
                    will: None,
                    username: Some(INTERNAL_USER.into()),
                    password: Some(secret.as_bytes().to_vec()),
                    auth_method: false,
                };
                s.write_all(&connect.encode())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut ack = [0u8; 4];
                tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut ack))
                    .await
                    .map_err(|_| "no CONNACK from the embedded broker".to_owned())?
                    .map_err(|e| e.to_string())?;
                // 3.1.1: 20 02 00 00; 5: 20 len 00 00 ...
                if ack[0] != 0x20 || ack[3] != 0x00 {
                    return Err(format!("unexpected CONNACK {ack:02x?}"));
                }
                let _ = s.write_all(&[0xE0, 0x00]).await;
                return Ok(());
            }
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}
