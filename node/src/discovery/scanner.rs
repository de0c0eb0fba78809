//! Scanners: the ways a local controller finds the devices on its subnet.
//!
//! A [`Scanner`] performs one discovery cycle's scan and returns one [`Observation`] per
//! device, keyed by MAC address (the device's identity). Three implementations exist:
//!
//! - [`SimulatedScanner`]: a deterministic, slowly changing synthetic population, for demos,
//!   benchmarks and tests without a real network;
//! - [`ProbeScanner`]: unprivileged TCP connect probes plus the kernel neighbour table;
//! - [`FileScanner`]: a JSON inventory file, re-read on every scan (labs, external tools).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::time::{Duration, Instant};

use pdsno_shared::payload::discovery::{DiscoveryMethod, normalize_mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// One device seen by a scan.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// MAC address, normalised lower-case colon form (`aa:bb:cc:dd:ee:ff`).
    pub mac: String,
    /// The address the device was seen at.
    pub ip: IpAddr,
    /// Host name, if known.
    pub hostname: Option<String>,
    /// Vendor, if known.
    pub vendor: Option<String>,
    /// Model, if known.
    pub model: Option<String>,
    /// Whether the device answered a reachability probe.
    pub reachable: bool,
    /// Round-trip time of the probe, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Device uptime, seconds.
    pub uptime_seconds: Option<u64>,
    /// The best method that reached the device.
    pub method: DiscoveryMethod,
    /// Free-text protocol tag (`"ARP"`, `"TCP"`, `"SIM"`, `"FILE"`).
    pub protocol: String,
}

/// Why a scan failed.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// Reading a file (inventory, neighbour table) failed; the message names the path.
    #[error("scan I/O error: {0}")]
    Io(String),
    /// The input (subnet, inventory, configuration) is invalid.
    #[error("bad scan input: {0}")]
    BadInput(String),
    /// A probe task failed unexpectedly.
    #[error("scan task failed: {0}")]
    Task(String),
}

/// The future returned by [`Scanner::scan`].
pub type ScanFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Observation>, ScanError>> + Send + 'a>>;

/// A way to find devices on the subnet. One call = one discovery cycle's scan.
pub trait Scanner: Send + Sync {
    /// Short name for logs (`"simulated"`, `"probe"`, `"file"`).
    fn name(&self) -> &'static str;

    /// Scans; `cycle` is the discovery cycle number (1, 2, ...), which the simulated scanner
    /// uses to evolve its population deterministically.
    fn scan(&self, cycle: u64) -> ScanFuture<'_>;
}

// ---------------------------------------------------------------------------------------
// Subnet
// ---------------------------------------------------------------------------------------

/// An IPv4 subnet in CIDR form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: u32,
    prefix: u8,
}

impl Subnet {
    /// Parses `"10.1.0.0/24"`. Host bits may be set (`"10.1.0.7/24"` is `10.1.0.0/24`, like
    /// Python's `ip_network(strict=False)`); a bare address is a `/32`.
    pub fn parse(s: &str) -> Result<Subnet, ScanError> {
        let text = s.trim();
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: Ipv4Addr = addr_text.parse().map_err(|_| {
            ScanError::BadInput(format!(
                "subnet {s:?}: {addr_text:?} is not an IPv4 address"
            ))
        })?;
        let prefix = match prefix_text {
            None => 32,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|n| p.bytes().all(|b| b.is_ascii_digit()) && *n <= 32)
                .ok_or_else(|| {
                    ScanError::BadInput(format!(
                        "subnet {s:?}: prefix length {p:?} is not a number from 0 to 32"
                    ))
                })?,
        };
        Ok(Subnet {
            network: u32::from(addr) & mask(prefix),
            prefix,
        })
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network)
    }

    /// The prefix length, 0 to 32.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// First and last usable host, inclusive (Python's `.hosts()` rules: a `/31` has two
    /// hosts, a `/32` one, otherwise network and broadcast addresses are excluded).
    fn host_range(&self) -> (u32, u32) {
        let broadcast = self.network | !mask(self.prefix);
        match self.prefix {
            32 | 31 => (self.network, broadcast),
            _ => (self.network + 1, broadcast - 1),
        }
    }

    /// The usable host addresses, in ascending order.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let (first, last) = self.host_range();
        (first..=last).map(Ipv4Addr::from)
    }

    /// Whether `ip` lies in this subnet (network and broadcast addresses included).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == self.network
    }

    /// How many addresses [`Subnet::hosts`] yields.
    pub fn host_count(&self) -> u64 {
        let (first, last) = self.host_range();
        u64::from(last - first) + 1
    }

    /// The `index`-th usable host; `index` must be below [`Subnet::host_count`].
    fn nth_host(&self, index: u64) -> Ipv4Addr {
        let (first, _) = self.host_range();
        // index < host_count <= 2^32, so the offset fits in u32.
        Ipv4Addr::from(first.wrapping_add(index as u32))
    }
}

/// The netmask of a prefix length, as an integer.
fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

impl FromStr for Subnet {
    type Err = ScanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Subnet::parse(s)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

// ---------------------------------------------------------------------------------------
// Simulated scanner
// ---------------------------------------------------------------------------------------

/// Upper bound on simulated device slots, whatever the subnet size.
const SIM_MAX_SLOTS: u64 = 1024;
/// Slots per host, in thousandths: with the presence rate below this gives ~60% occupancy.
const SIM_SLOTS_PER_MILLE_HOSTS: u64 = 625;
/// A slot's tenancy period: each tenant stays for 200..=600 cycles.
const SIM_TENANCY_MIN: u64 = 200;
const SIM_TENANCY_SPAN: u64 = 401;
/// Empty cycles at the start of each tenancy, before the new tenant joins: 2..=12.
const SIM_VACANCY_MIN: u64 = 2;
const SIM_VACANCY_SPAN: u64 = 11;
/// Outage windows: per 16-cycle window, 6% chance of one outage of 4..=8 cycles.
const SIM_OUTAGE_WINDOW: u64 = 16;
const SIM_OUTAGE_PERCENT: u64 = 6;
const SIM_OUTAGE_MIN: u64 = 4;
const SIM_OUTAGE_SPAN: u64 = 5;
/// Spare-address leases: per 32-cycle window, each spare address is leased with 20% chance.
const SIM_LEASE_WINDOW: u64 = 32;
const SIM_LEASE_PERCENT: u64 = 20;
/// Host names: per 64-cycle window, 15% chance the device carries a renamed host name.
const SIM_NAME_WINDOW: u64 = 64;
const SIM_RENAME_PERCENT: u64 = 15;
/// Nominal cycle length used to grow uptimes.
const SIM_CYCLE_SECONDS: u64 = 60;
/// Share of devices with a known vendor (and so SNMP), percent.
const SIM_VENDOR_PERCENT: u8 = 70;
/// Share of devices that never answer a probe, percent.
const SIM_UNREACHABLE_PERCENT: u8 = 5;
/// Host index spaces up to this size are shuffled in full when placing addresses.
const SIM_SHUFFLE_LIMIT: u64 = 1 << 16;

const SIM_VENDORS: [&str; 4] = ["Cisco", "Juniper", "Arista", "HP"];
const SIM_MODELS: [&str; 4] = ["Switch", "Router", "Firewall", "AccessPoint"];

/// Keyed SHA-256 over (seed, subnet, tag, numbers): the simulation's only source of chance.
#[derive(Clone, Copy)]
struct SimHash {
    seed: u64,
    subnet: Subnet,
}

impl SimHash {
    fn bytes(&self, tag: &str, values: &[u64]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"pdsno-sim/1\0");
        h.update(self.seed.to_be_bytes());
        h.update(self.subnet.network.to_be_bytes());
        h.update([self.subnet.prefix]);
        h.update(tag.as_bytes());
        h.update([0]);
        for v in values {
            h.update(v.to_be_bytes());
        }
        h.finalize().into()
    }

    fn u64(&self, tag: &str, values: &[u64]) -> u64 {
        let d = self.bytes(tag, values);
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        u64::from_be_bytes(first)
    }

    /// Empty cycles at the start of the slot's `generation`-th tenancy.
    fn vacancy(&self, slot: u64, generation: u64) -> u64 {
        SIM_VACANCY_MIN + self.u64("vacancy", &[slot, generation]) % SIM_VACANCY_SPAN
    }
}

/// A device slot: a position in the population whose tenants come and go.
#[derive(Clone, Debug)]
struct SlotPlan {
    /// Length of one tenancy, cycles.
    tenancy: u64,
    /// Offset of the tenancy clock, `0..tenancy`.
    phase: u64,
    /// The address a tenant holds when it has no spare lease.
    home: Ipv4Addr,
}

/// A spare address, leased to one slot at a time for whole lease windows.
#[derive(Clone, Debug)]
struct SparePlan {
    ip: Ipv4Addr,
    phase: u64,
}

/// Where a slot is at a given cycle.
struct Tenancy {
    generation: u64,
    /// Cycles since the tenancy began.
    position: u64,
    /// Empty cycles at the start of this tenancy.
    vacancy: u64,
}

/// A deterministic synthetic population: the result of `scan(cycle)` is a pure function of
/// (seed, subnet, cycle), so a restarted controller sees the same world.
///
/// The model:
///
/// - **Slots.** The subnet gets `min(1024, 0.625 × hosts)` device slots (at least one). Each
///   slot is occupied by a succession of *tenants* (generations). A tenant's identity —
///   MAC, base host name, vendor, model, base RTT, base uptime — comes from SHA-256 of
///   (seed, subnet, slot, generation). MACs are locally administered unicast (first octet
///   `(b & 0xfc) | 0x02`) and their low 10 bits are the slot number, so MACs are unique within
///   a cycle by construction.
/// - **Joins and permanent leaves.** A slot's tenancy lasts 200–600 cycles (per slot, with a
///   per-slot phase). When it ends the tenant leaves for good; the slot stays empty for 2–12
///   cycles, then a new tenant (a new MAC) joins. Slot 0's clock is set so that a tenant
///   joins it at cycle 2, so the delta between cycles 1 and 2 is never empty.
/// - **Temporary leaves.** Each 16-cycle window of a tenancy but the first has a 6% chance of one outage
///   of 4–8 consecutive cycles, after which the same device returns. Every temporary
///   absence therefore lasts at least 4 cycles, so a consumer's "inactive after 3 missed
///   cycles" rule fires.
/// - **Addresses.** Each slot has a fixed home address; another `min(slots, free hosts)`
///   addresses form a spare pool. For each 32-cycle window (per-address phase) each spare
///   address is leased, with 20% chance, to one slot; a slot holding a lease uses its
///   lowest-indexed spare instead of its home (a DHCP-style address change). Homes and spares
///   are disjoint and a spare has one holder per window, so present devices never share an
///   address, and all of them lie inside the subnet.
/// - **Host names.** `dev-<6 hex digits>` from the tenant's identity; in each 64-cycle window
///   there is a 15% chance the device carries a renamed form `dev-<hex>-<4 hex>`.
/// - **Measurements.** 70% of tenants have a vendor (Cisco, Juniper, Arista, HP) and model
///   (Switch, Router, Firewall, AccessPoint), are found by SNMP and report an uptime growing
///   60 s per cycle since they joined; the rest are found by ICMP. 95% are reachable, with a
///   per-device RTT of 0.3–20.3 ms jittered ±10% per cycle. Protocol is `"SIM"`.
///
/// About 96% of slots are occupied at any cycle, so ~60% of the hosts are present, and a few
/// percent of the devices (not more) join, leave or change address or name per cycle.
#[derive(Clone, Debug)]
pub struct SimulatedScanner {
    subnet: Subnet,
    seed: u64,
    slots: Vec<SlotPlan>,
    spares: Vec<SparePlan>,
}

impl SimulatedScanner {
    /// A simulated population on `subnet`, fixed by `seed`.
    pub fn new(subnet: Subnet, seed: u64) -> SimulatedScanner {
        let hash = SimHash { seed, subnet };
        let hosts = subnet.host_count();
        let slot_count = ((hosts * SIM_SLOTS_PER_MILLE_HOSTS + 500) / 1000)
            .clamp(1, SIM_MAX_SLOTS)
            .min(hosts);
        let spare_count = (hosts - slot_count).min(slot_count);
        let picks = pick_distinct_hosts(&hash, hosts, slot_count + spare_count);
        let (home_picks, spare_picks) = picks.split_at(picks.len().min(slot_count as usize));

        let slots = home_picks
            .iter()
            .enumerate()
            .map(|(i, &host)| {
                let i = i as u64;
                let tenancy = SIM_TENANCY_MIN + hash.u64("tenancy", &[i]) % SIM_TENANCY_SPAN;
                SlotPlan {
                    tenancy,
                    phase: if i == 0 {
                        // Slot 0's first tenant joins exactly at cycle 2: the first delta
                        // is never empty.
                        tenancy + hash.vacancy(0, 1) - 2
                    } else {
                        hash.u64("tenancy-phase", &[i]) % tenancy
                    },
                    home: subnet.nth_host(host),
                }
            })
            .collect();
        let spares = spare_picks
            .iter()
            .enumerate()
            .map(|(r, &host)| SparePlan {
                ip: subnet.nth_host(host),
                phase: hash.u64("lease-phase", &[r as u64]) % SIM_LEASE_WINDOW,
            })
            .collect();
        SimulatedScanner {
            subnet,
            seed,
            slots,
            spares,
        }
    }

    /// The simulated subnet.
    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    fn hash(&self) -> SimHash {
        SimHash {
            seed: self.seed,
            subnet: self.subnet,
        }
    }

    /// For each slot, the spare address it holds at `cycle`, if any.
    fn leases(&self, cycle: u64) -> Vec<Option<Ipv4Addr>> {
        let hash = self.hash();
        let mut leases = vec![None; self.slots.len()];
        for (r, spare) in self.spares.iter().enumerate() {
            let window = cycle.saturating_add(spare.phase) / SIM_LEASE_WINDOW;
            let roll = hash.u64("lease", &[r as u64, window]);
            if roll % 100 >= SIM_LEASE_PERCENT {
                continue;
            }
            let holder = ((roll >> 8) % self.slots.len() as u64) as usize;
            if let Some(lease @ None) = leases.get_mut(holder) {
                *lease = Some(spare.ip);
            }
        }
        leases
    }

    /// The slot's tenancy at `cycle`, or `None` if the slot is empty or its tenant is out.
    fn tenancy(&self, slot: u64, plan: &SlotPlan, cycle: u64) -> Option<Tenancy> {
        let hash = self.hash();
        let clock = cycle.saturating_add(plan.phase);
        let generation = clock / plan.tenancy;
        let position = clock % plan.tenancy;
        let vacancy = hash.vacancy(slot, generation);
        if position < vacancy {
            return None;
        }
        let window = position / SIM_OUTAGE_WINDOW;
        let roll = hash.u64("outage", &[slot, generation, window]);
        // No outage in a tenancy's first window: a fresh device does not fail right away.
        if window > 0 && roll % 100 < SIM_OUTAGE_PERCENT {
            let length = SIM_OUTAGE_MIN + (roll >> 8) % SIM_OUTAGE_SPAN;
            let start = (roll >> 16) % (SIM_OUTAGE_WINDOW - length + 1);
            let offset = position % SIM_OUTAGE_WINDOW;
            if (start..start + length).contains(&offset) {
                return None;
            }
        }
        Some(Tenancy {
            generation,
            position,
            vacancy,
        })
    }

    fn observe(&self, slot: u64, t: &Tenancy, ip: Ipv4Addr, cycle: u64) -> Observation {
        let hash = self.hash();
        let id = hash.bytes("tenant", &[slot, t.generation]);
        // Low 10 bits carry the slot number (slots < 1024): unique within a cycle.
        let mac = [
            (id[0] & 0xfc) | 0x02,
            id[1],
            id[2],
            id[3],
            (id[4] & 0xfc) | ((slot >> 8) & 0x03) as u8,
            (slot & 0xff) as u8,
        ];
        let mac = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");

        let vendor_known = id[6] % 100 < SIM_VENDOR_PERCENT;
        let vendor = vendor_known.then(|| SIM_VENDORS[usize::from(id[7]) % SIM_VENDORS.len()]);
        let model = vendor_known.then(|| SIM_MODELS[usize::from(id[8]) % SIM_MODELS.len()]);
        let reachable = id[9] % 100 >= SIM_UNREACHABLE_PERCENT;

        let base_name = format!("dev-{}", hex::encode(&id[16..19]));
        let name_phase = u64::from(u16::from_be_bytes([id[19], id[20]])) % SIM_NAME_WINDOW;
        let name_window = (t.position + name_phase) / SIM_NAME_WINDOW;
        let name_roll = hash.u64("name", &[slot, t.generation, name_window]);
        let hostname = if name_roll % 100 < SIM_RENAME_PERCENT {
            format!("{base_name}-{:04x}", (name_roll >> 8) & 0xffff)
        } else {
            base_name
        };

        let rtt_ms = reachable.then(|| {
            let base = 0.3 + f64::from(u16::from_be_bytes([id[10], id[11]]) % 2000) / 100.0;
            let jitter = hash.u64("rtt", &[slot, t.generation, cycle]) % 201;
            let rtt = base * (0.9 + jitter as f64 / 1000.0);
            (rtt * 100.0).round() / 100.0
        });
        let uptime_seconds = vendor_known.then(|| {
            let base =
                u64::from(u32::from_be_bytes([id[12], id[13], id[14], id[15]])) % (30 * 24 * 3600);
            base + (t.position - t.vacancy) * SIM_CYCLE_SECONDS
        });

        Observation {
            mac,
            ip: IpAddr::V4(ip),
            hostname: Some(hostname),
            vendor: vendor.map(str::to_owned),
            model: model.map(str::to_owned),
            reachable,
            rtt_ms,
            uptime_seconds,
            method: if vendor_known {
                DiscoveryMethod::Snmp
            } else {
                DiscoveryMethod::Icmp
            },
            protocol: "SIM".to_owned(),
        }
    }

    /// The population at `cycle` (synchronous core of [`Scanner::scan`]).
    pub fn population(&self, cycle: u64) -> Vec<Observation> {
        let leases = self.leases(cycle);
        self.slots
            .iter()
            .zip(leases)
            .enumerate()
            .filter_map(|(i, (plan, lease))| {
                let slot = i as u64;
                let tenancy = self.tenancy(slot, plan, cycle)?;
                Some(self.observe(slot, &tenancy, lease.unwrap_or(plan.home), cycle))
            })
            .collect()
    }
}

/// `count` distinct host indices in `0..hosts`, in a seeded pseudo-random order.
fn pick_distinct_hosts(hash: &SimHash, hosts: u64, count: u64) -> Vec<u64> {
    let count = count.min(hosts);
    if hosts <= SIM_SHUFFLE_LIMIT {
        // Partial Fisher–Yates over the whole index space.
        let mut all: Vec<u64> = (0..hosts).collect();
        for i in 0..count {
            let j = i + hash.u64("place", &[i]) % (hosts - i);
            all.swap(i as usize, j as usize);
        }
        all.truncate(count as usize);
        all
    } else {
        // Sparse: the picks are a tiny fraction of the space, so rejection is cheap.
        let mut seen = HashSet::new();
        let mut picks = Vec::with_capacity(count as usize);
        let mut attempt = 0u64;
        while (picks.len() as u64) < count {
            let candidate = hash.u64("place", &[attempt]) % hosts;
            attempt += 1;
            if seen.insert(candidate) {
                picks.push(candidate);
            }
        }
        picks
    }
}

impl Scanner for SimulatedScanner {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn scan(&self, cycle: u64) -> ScanFuture<'_> {
        Box::pin(async move { Ok(self.population(cycle)) })
    }
}

// ---------------------------------------------------------------------------------------
// Probe scanner
// ---------------------------------------------------------------------------------------

/// Default TCP ports probed on each host.
pub const DEFAULT_PROBE_PORTS: [u16; 4] = [22, 80, 443, 8080];
/// Default connect timeout per probe.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Default number of connection attempts in flight.
pub const DEFAULT_PROBE_CONCURRENCY: usize = 256;
/// Default largest subnet (in hosts) the probe scanner accepts.
pub const DEFAULT_PROBE_MAX_HOSTS: u64 = 4096;
/// Default neighbour-table path (Linux).
pub const DEFAULT_NEIGHBOUR_TABLE: &str = "/proc/net/arp";

/// Scans the real network without special privileges.
///
/// Every host of the subnet gets TCP connect probes on the configured ports (bounded
/// concurrency). A host *answers* if a connect succeeds or is refused (a refusal proves the
/// host is up); its RTT is the fastest answer. After probing, the kernel neighbour table
/// (which the probes populated) supplies the MACs, joined by IP:
///
/// - answering hosts with a MAC: `reachable = true`, `method = Icmp` (meaning "answered a
///   reachability probe"), protocol `"TCP"`;
/// - neighbour entries inside the subnet that did not answer: `reachable = false`,
///   `method = Arp`, protocol `"ARP"`;
/// - answering hosts without a MAC are skipped (the MAC is the identity).
///
/// No reverse DNS; host name, vendor, model and uptime stay empty.
#[derive(Clone, Debug)]
pub struct ProbeScanner {
    subnet: Subnet,
    ports: Vec<u16>,
    timeout: Duration,
    concurrency: usize,
    max_hosts: u64,
    neighbour_table: PathBuf,
}

impl ProbeScanner {
    /// A probe scanner with the defaults: ports 22, 80, 443, 8080; 500 ms connect timeout;
    /// 256 attempts in flight; at most 4096 hosts; neighbour table `/proc/net/arp`.
    pub fn new(subnet: Subnet) -> ProbeScanner {
        ProbeScanner {
            subnet,
            ports: DEFAULT_PROBE_PORTS.to_vec(),
            timeout: DEFAULT_PROBE_TIMEOUT,
            concurrency: DEFAULT_PROBE_CONCURRENCY,
            max_hosts: DEFAULT_PROBE_MAX_HOSTS,
            neighbour_table: PathBuf::from(DEFAULT_NEIGHBOUR_TABLE),
        }
    }

    /// Probes these TCP ports instead.
    pub fn with_ports(mut self, ports: Vec<u16>) -> Self {
        self.ports = ports;
        self
    }

    /// Uses this connect timeout per probe.
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Keeps at most `n` connection attempts in flight (at least one).
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Refuses subnets with more than `n` hosts.
    pub fn with_max_hosts(mut self, n: u64) -> Self {
        self.max_hosts = n;
        self
    }

    /// Reads the neighbour table from this file instead of `/proc/net/arp`.
    pub fn with_neighbour_table(mut self, path: PathBuf) -> Self {
        self.neighbour_table = path;
        self
    }

    /// Probes every host; returns the RTT (ms) of each host that answered.
    async fn probe_all(&self) -> Result<HashMap<Ipv4Addr, f64>, ScanError> {
        let host_count = self.subnet.host_count();
        if host_count > self.max_hosts {
            return Err(ScanError::BadInput(format!(
                "subnet {} has {host_count} hosts; the probe scanner is limited to {} hosts",
                self.subnet, self.max_hosts
            )));
        }
        if self.ports.is_empty() {
            return Err(ScanError::BadInput("no probe ports configured".to_owned()));
        }

        let mut answered = HashMap::new();
        let mut probes = JoinSet::new();
        for ip in self.subnet.hosts() {
            for &port in &self.ports {
                while probes.len() >= self.concurrency {
                    if let Some(done) = probes.join_next().await {
                        record_probe(&mut answered, done)?;
                    }
                }
                if answered.contains_key(&ip) {
                    break; // one answer is enough
                }
                probes.spawn(probe(ip, port, self.timeout));
            }
        }
        while let Some(done) = probes.join_next().await {
            record_probe(&mut answered, done)?;
        }
        Ok(answered)
    }

    async fn scan_once(&self) -> Result<Vec<Observation>, ScanError> {
        let started = Instant::now();
        let answered = self.probe_all().await?;
        let table = tokio::fs::read_to_string(&self.neighbour_table)
            .await
            .map_err(|e| {
                ScanError::Io(format!(
                    "reading neighbour table {}: {e}",
                    self.neighbour_table.display()
                ))
            })?;
        let observations =
            join_with_neighbours(self.subnet, &answered, &parse_neighbour_table(&table));
        tracing::debug!(
            subnet = %self.subnet,
            answered = answered.len(),
            observed = observations.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "probe scan done"
        );
        Ok(observations)
    }
}

/// One connect attempt: `Some(rtt_ms)` if the host answered (connected or refused).
async fn probe(ip: Ipv4Addr, port: u16, limit: Duration) -> (Ipv4Addr, Option<f64>) {
    let started = Instant::now();
    let connect = TcpStream::connect(SocketAddr::from((ip, port)));
    let answered = match tokio::time::timeout(limit, connect).await {
        Ok(Ok(_stream)) => true,
        Ok(Err(e)) => e.kind() == ErrorKind::ConnectionRefused,
        Err(_elapsed) => false,
    };
    let rtt = answered.then(|| (started.elapsed().as_secs_f64() * 1e6).round() / 1e3);
    (ip, rtt)
}

fn record_probe(
    answered: &mut HashMap<Ipv4Addr, f64>,
    done: Result<(Ipv4Addr, Option<f64>), tokio::task::JoinError>,
) -> Result<(), ScanError> {
    let (ip, rtt) = done.map_err(|e| ScanError::Task(e.to_string()))?;
    if let Some(rtt) = rtt {
        answered
            .entry(ip)
            .and_modify(|best: &mut f64| *best = best.min(rtt))
            .or_insert(rtt);
    }
    Ok(())
}

/// Joins probe answers with neighbour entries (see [`ProbeScanner`]). One observation per
/// MAC and per IP (answering entries win), sorted by IP.
fn join_with_neighbours(
    subnet: Subnet,
    answered: &HashMap<Ipv4Addr, f64>,
    neighbours: &[(Ipv4Addr, String)],
) -> Vec<Observation> {
    let mut seen_macs = HashSet::new();
    let mut seen_ips = HashSet::new();
    let mut out = Vec::new();
    let in_subnet = || neighbours.iter().filter(|(ip, _)| subnet.contains(*ip));
    let answering = in_subnet().filter_map(|(ip, mac)| Some((ip, mac, Some(*answered.get(ip)?))));
    let silent = in_subnet()
        .filter(|(ip, _)| !answered.contains_key(ip))
        .map(|(ip, mac)| (ip, mac, None));
    for (ip, mac, rtt) in answering.chain(silent) {
        if seen_ips.contains(ip) || seen_macs.contains(mac) {
            continue;
        }
        seen_ips.insert(*ip);
        seen_macs.insert(mac.clone());
        let reachable = rtt.is_some();
        out.push(Observation {
            mac: mac.clone(),
            ip: IpAddr::V4(*ip),
            hostname: None,
            vendor: None,
            model: None,
            reachable,
            rtt_ms: rtt,
            uptime_seconds: None,
            method: if reachable {
                DiscoveryMethod::Icmp
            } else {
                DiscoveryMethod::Arp
            },
            protocol: if reachable { "TCP" } else { "ARP" }.to_owned(),
        });
    }
    out.sort_by_key(|o| o.ip);
    out
}

/// Parses the kernel neighbour table text (format of `/proc/net/arp`) into (ip, normalised
/// mac) for complete entries (flags `0x2` set, MAC not `00:00:00:00:00:00`). The header and
/// any line that does not parse are skipped.
pub fn parse_neighbour_table(text: &str) -> Vec<(Ipv4Addr, String)> {
    const ATF_COMPLETE: u32 = 0x2;
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let ip: Ipv4Addr = fields.next()?.parse().ok()?;
            let _hw_type = fields.next()?;
            let flags = fields.next()?;
            let flags = u32::from_str_radix(
                flags
                    .strip_prefix("0x")
                    .or_else(|| flags.strip_prefix("0X"))?,
                16,
            )
            .ok()?;
            let mac = normalize_mac(fields.next()?)?;
            (flags & ATF_COMPLETE != 0 && mac != "00:00:00:00:00:00").then_some((ip, mac))
        })
        .collect()
}

impl Scanner for ProbeScanner {
    fn name(&self) -> &'static str {
        "probe"
    }

    fn scan(&self, _cycle: u64) -> ScanFuture<'_> {
        Box::pin(self.scan_once())
    }
}

// ---------------------------------------------------------------------------------------
// File scanner
// ---------------------------------------------------------------------------------------

/// Reads devices from a JSON inventory file, afresh on every scan.
///
/// The file is a JSON array of objects:
/// `{"mac": "...", "ip": "...", "hostname"?: "...", "vendor"?: "...", "model"?: "...",
/// "reachable"?: bool (default true), "rtt_ms"?: number, "uptime_seconds"?: integer,
/// "discovery_method"?: "snmp" | "icmp" | "arp" (default "icmp")}`. Other keys are ignored;
/// empty strings count as absent. An invalid entry, bad JSON or a repeated MAC fails the
/// whole scan ([`ScanError::BadInput`], naming the entry's index); an unreadable file is
/// [`ScanError::Io`]. Protocol is `"FILE"`.
#[derive(Clone, Debug)]
pub struct FileScanner {
    path: PathBuf,
}

impl FileScanner {
    /// A scanner reading `path`.
    pub fn new(path: PathBuf) -> FileScanner {
        FileScanner { path }
    }

    async fn scan_once(&self) -> Result<Vec<Observation>, ScanError> {
        let bytes = tokio::fs::read(&self.path).await.map_err(|e| {
            ScanError::Io(format!("reading inventory {}: {e}", self.path.display()))
        })?;
        parse_inventory(&bytes, &self.path.display().to_string())
    }
}

/// One entry of an inventory file.
#[derive(Deserialize)]
struct InventoryEntry {
    mac: String,
    ip: String,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    vendor: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default = "default_reachable")]
    reachable: bool,
    #[serde(default)]
    rtt_ms: Option<f64>,
    #[serde(default)]
    uptime_seconds: Option<u64>,
    #[serde(default)]
    discovery_method: Option<DiscoveryMethod>,
}

fn default_reachable() -> bool {
    true
}

/// Parses an inventory (see [`FileScanner`]); `source` names it in errors.
fn parse_inventory(bytes: &[u8], source: &str) -> Result<Vec<Observation>, ScanError> {
    let bad = |msg: String| ScanError::BadInput(format!("inventory {source}: {msg}"));
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let serde_json::Value::Array(items) = value else {
        return Err(bad("expected a JSON array of devices".to_owned()));
    };

    let mut first_index_of_mac: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let entry: InventoryEntry =
            serde_json::from_value(item).map_err(|e| bad(format!("entry {index}: {e}")))?;
        let mac = normalize_mac(entry.mac.trim()).ok_or_else(|| {
            bad(format!(
                "entry {index}: {:?} is not a MAC address",
                entry.mac
            ))
        })?;
        let ip: IpAddr = entry.ip.trim().parse().map_err(|_| {
            bad(format!(
                "entry {index}: {:?} is not an IP address",
                entry.ip
            ))
        })?;
        if let Some(rtt) = entry.rtt_ms
            && !(rtt.is_finite() && rtt >= 0.0)
        {
            return Err(bad(format!(
                "entry {index}: rtt_ms {rtt} is not a valid time"
            )));
        }
        if let Some(first) = first_index_of_mac.insert(mac.clone(), index) {
            return Err(bad(format!(
                "entry {index}: MAC {mac} already used by entry {first}"
            )));
        }
        let non_empty =
            |s: Option<String>| s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
        out.push(Observation {
            mac,
            ip,
            hostname: non_empty(entry.hostname),
            vendor: non_empty(entry.vendor),
            model: non_empty(entry.model),
            reachable: entry.reachable,
            rtt_ms: entry.rtt_ms,
            uptime_seconds: entry.uptime_seconds,
            method: entry.discovery_method.unwrap_or(DiscoveryMethod::Icmp),
            protocol: "FILE".to_owned(),
        });
    }
    Ok(out)
}

impl Scanner for FileScanner {
    fn name(&self) -> &'static str {
        "file"
    }

    fn scan(&self, _cycle: u64) -> ScanFuture<'_> {
        Box::pin(self.scan_once())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(s: &str) -> Subnet {
        Subnet::parse(s).expect("valid subnet")
    }

    // ---- Subnet ----

    #[test]
    fn subnet_parses_valid_and_normalises_host_bits() {
        let s = subnet("10.1.0.0/24");
        assert_eq!(s.network(), Ipv4Addr::new(10, 1, 0, 0));
        assert_eq!(s.prefix(), 24);
        assert_eq!(s.to_string(), "10.1.0.0/24");

        let s = subnet("10.1.0.77/24");
        assert_eq!(s.to_string(), "10.1.0.0/24");
        assert_eq!(subnet("192.168.5.200/22").to_string(), "192.168.4.0/22");
        assert_eq!(
            "10.1.2.3/32".parse::<Subnet>().expect("parse").to_string(),
            "10.1.2.3/32"
        );
        assert_eq!(subnet("10.1.2.3").to_string(), "10.1.2.3/32");
    }

    #[test]
    fn subnet_prefix_limits() {
        let all = subnet("1.2.3.4/0");
        assert_eq!(all.to_string(), "0.0.0.0/0");
        assert!(all.contains(Ipv4Addr::new(255, 255, 255, 255)));
        assert_eq!(all.host_count(), (1u64 << 32) - 2);
        assert_eq!(subnet("10.0.0.5/32").host_count(), 1);
        assert!(Subnet::parse("10.0.0.0/33").is_err());
        assert!(Subnet::parse("10.0.0.0/-1").is_err());
        assert!(Subnet::parse("10.0.0.0/+8").is_err());
    }

    #[test]
    fn subnet_rejects_garbage_with_clear_message() {
        for bad in [
            "",
            "/24",
            "10.0.0/24",
            "10.0.0.256/24",
            "hello",
            "10.0.0.0/",
            "10.0.0.0/x",
            "::1/128",
            "10.0.0.0/24/1",
        ] {
            let err = Subnet::parse(bad).expect_err(bad);
            assert!(matches!(err, ScanError::BadInput(_)), "{bad}: {err}");
            assert!(err.to_string().contains("subnet"), "{bad}: {err}");
        }
        let msg = Subnet::parse("10.0.0.0/40")
            .expect_err("too long")
            .to_string();
        assert!(msg.contains("0 to 32"), "{msg}");
    }

    #[test]
    fn subnet_hosts_like_python() {
        let s24 = subnet("10.0.0.0/24");
        assert_eq!(s24.hosts().count(), 254);
        assert_eq!(s24.host_count(), 254);
        assert_eq!(s24.hosts().next(), Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(s24.hosts().last(), Some(Ipv4Addr::new(10, 0, 0, 254)));

        let s30 = subnet("10.0.0.4/30");
        assert_eq!(
            s30.hosts().collect::<Vec<_>>(),
            [Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(10, 0, 0, 6)]
        );
        assert_eq!(s30.host_count(), 2);

        let s31 = subnet("10.0.0.6/31");
        assert_eq!(
            s31.hosts().collect::<Vec<_>>(),
            [Ipv4Addr::new(10, 0, 0, 6), Ipv4Addr::new(10, 0, 0, 7)]
        );
        assert_eq!(s31.host_count(), 2);

        let s32 = subnet("10.0.0.9/32");
        assert_eq!(
            s32.hosts().collect::<Vec<_>>(),
            [Ipv4Addr::new(10, 0, 0, 9)]
        );
        assert_eq!(s32.host_count(), 1);

        let top = subnet("255.255.255.255/32");
        assert_eq!(top.hosts().count(), 1);
    }

    #[test]
    fn subnet_contains() {
        let s = subnet("10.1.0.0/24");
        assert!(s.contains(Ipv4Addr::new(10, 1, 0, 0)));
        assert!(s.contains(Ipv4Addr::new(10, 1, 0, 255)));
        assert!(!s.contains(Ipv4Addr::new(10, 1, 1, 0)));
        assert!(!s.contains(Ipv4Addr::new(10, 0, 0, 5)));
    }

    // ---- Neighbour table ----

    #[test]
    fn neighbour_table_keeps_only_complete_entries() {
        let text = "\
IP address       HW type     Flags       HW address            Mask     Device
192.168.1.1      0x1         0x2         AA:BB:CC:DD:EE:01     *        eth0
192.168.1.2      0x1         0x0         00:00:00:00:00:00     *        eth0
192.168.1.3      0x1         0x2         00:00:00:00:00:00     *        eth0
192.168.1.4      0x1         0x6         aa:bb:cc:dd:ee:04     *        eth0
192.168.1.5      0x1         0x0         aa:bb:cc:dd:ee:05     *        eth0
this is not a neighbour line at all
999.1.1.1        0x1         0x2         aa:bb:cc:dd:ee:06     *        eth0
192.168.1.7      0x1         zz          aa:bb:cc:dd:ee:07     *        eth0
192.168.1.8      0x1         0x2         not-a-mac             *        eth0
192.168.1.9      0x1
";
        assert_eq!(
            parse_neighbour_table(text),
            vec![
                (
                    Ipv4Addr::new(192, 168, 1, 1),
                    "aa:bb:cc:dd:ee:01".to_owned()
                ),
                (
                    Ipv4Addr::new(192, 168, 1, 4),
                    "aa:bb:cc:dd:ee:04".to_owned()
                ),
            ]
        );
        assert!(parse_neighbour_table("").is_empty());
    }

    // ---- Simulated ----

    type Snapshot = HashMap<String, Observation>;

    fn snapshots(scanner: &SimulatedScanner, cycles: u64) -> Vec<Snapshot> {
        (1..=cycles)
            .map(|c| {
                scanner
                    .population(c)
                    .into_iter()
                    .map(|o| (o.mac.clone(), o))
                    .collect()
            })
            .collect()
    }

    #[tokio::test]
    async fn simulated_is_deterministic() {
        let s = subnet("10.1.0.0/24");
        let a = SimulatedScanner::new(s, 42);
        let b = SimulatedScanner::new(s, 42);
        for cycle in [1, 2, 17, 1000, 1_000_000] {
            let first = a.scan(cycle).await.expect("scan");
            assert!(!first.is_empty());
            assert_eq!(first, b.scan(cycle).await.expect("scan"), "cycle {cycle}");
        }
        assert_eq!(a.name(), "simulated");
    }

    #[test]
    fn simulated_depends_on_seed_and_subnet() {
        let s = subnet("10.1.0.0/24");
        let macs = |scanner: SimulatedScanner| -> HashSet<String> {
            scanner.population(1).into_iter().map(|o| o.mac).collect()
        };
        let base = macs(SimulatedScanner::new(s, 1));
        assert_ne!(base, macs(SimulatedScanner::new(s, 2)));
        assert!(base.is_disjoint(&macs(SimulatedScanner::new(s, 2))));
        assert_ne!(base, macs(SimulatedScanner::new(subnet("10.2.0.0/24"), 1)));
    }

    #[test]
    fn simulated_cycles_are_consistent() {
        for (net, seed) in [
            ("10.1.0.0/24", 7),
            ("10.9.0.0/28", 3),
            ("10.9.0.4/30", 3),
            ("10.9.0.6/31", 5),
            ("10.9.0.9/32", 9),
            ("172.16.0.0/16", 11),
        ] {
            let s = subnet(net);
            let scanner = SimulatedScanner::new(s, seed);
            for cycle in 1..=60 {
                let pop = scanner.population(cycle);
                assert!(pop.len() as u64 <= s.host_count().min(SIM_MAX_SLOTS));
                let macs: HashSet<_> = pop.iter().map(|o| o.mac.as_str()).collect();
                let ips: HashSet<_> = pop.iter().map(|o| o.ip).collect();
                assert_eq!(macs.len(), pop.len(), "{net} cycle {cycle}: duplicate MAC");
                assert_eq!(ips.len(), pop.len(), "{net} cycle {cycle}: duplicate IP");
                for o in &pop {
                    let IpAddr::V4(v4) = o.ip else {
                        panic!("IPv6 in simulation")
                    };
                    let (first, last) = s.host_range();
                    assert!(
                        (first..=last).contains(&u32::from(v4)),
                        "{net}: {v4} not a host"
                    );
                    assert_eq!(normalize_mac(&o.mac).as_deref(), Some(o.mac.as_str()));
                    let first = u8::from_str_radix(&o.mac[..2], 16).expect("hex");
                    assert_eq!(first & 0x03, 0x02, "locally administered unicast");
                    assert_eq!(o.protocol, "SIM");
                    assert!(o.hostname.as_deref().is_some_and(|h| h.starts_with("dev-")));
                    let expected = if o.vendor.is_some() {
                        DiscoveryMethod::Snmp
                    } else {
                        DiscoveryMethod::Icmp
                    };
                    assert_eq!(o.method, expected);
                    assert_eq!(o.reachable, o.rtt_ms.is_some());
                }
            }
        }
    }

    #[test]
    fn simulated_population_size() {
        let scanner = SimulatedScanner::new(subnet("10.1.0.0/24"), 5);
        let counts: Vec<usize> = (1..=60).map(|c| scanner.population(c).len()).collect();
        let mean = counts.iter().sum::<usize>() as f64 / counts.len() as f64;
        assert!((0.5 * 254.0..=0.7 * 254.0).contains(&mean), "mean {mean}");

        let big = SimulatedScanner::new(subnet("10.0.0.0/8"), 5).population(1);
        assert!(big.len() <= 1024 && big.len() > 800, "{}", big.len());
    }

    #[test]
    fn simulated_population_evolves_in_small_steps() {
        let scanner = SimulatedScanner::new(subnet("10.1.0.0/24"), 2026);
        let snaps = snapshots(&scanner, 60);

        // Cycle 1 and cycle 2 differ, and not only in measurements: a device joins.
        assert_ne!(scanner.population(1), scanner.population(2));
        for seed in 0..10 {
            let sc = SimulatedScanner::new(subnet("10.1.0.0/24"), seed);
            let first: HashSet<String> = sc.population(1).into_iter().map(|o| o.mac).collect();
            assert!(
                sc.population(2).iter().any(|o| !first.contains(&o.mac)),
                "seed {seed}: nobody joined at cycle 2"
            );
        }

        let mut joins = 0;
        let mut long_leaves = 0;
        let mut ip_changes = 0;
        let mut name_changes = 0;
        let mut ever_seen: HashSet<&str> = snaps[0].keys().map(String::as_str).collect();
        for c in 1..snaps.len() {
            let (prev, cur) = (&snaps[c - 1], &snaps[c]);
            let mut churn = 0;
            for (mac, o) in cur {
                match prev.get(mac) {
                    None => {
                        churn += 1;
                        if ever_seen.insert(mac) {
                            joins += 1;
                        }
                    }
                    Some(p) => {
                        if p.ip != o.ip {
                            ip_changes += 1;
                            churn += 1;
                        }
                        if p.hostname != o.hostname {
                            name_changes += 1;
                            churn += 1;
                        }
                    }
                }
            }
            for mac in prev.keys().filter(|m| !cur.contains_key(*m)) {
                churn += 1;
                // Absent for at least 4 cycles (or until the end of the run)?
                let absent = snaps[c..]
                    .iter()
                    .take_while(|s| !s.contains_key(mac))
                    .count();
                assert!(
                    absent >= 4 || c + absent == snaps.len(),
                    "{mac} left at cycle {} for only {absent} cycles",
                    c + 1
                );
                if absent >= 4 {
                    long_leaves += 1;
                }
            }
            let size = prev.len().max(cur.len());
            assert!(
                churn * 10 < size,
                "cycle {}: {churn} changes among {size} devices",
                c + 1
            );
        }
        assert!(joins >= 1, "no new device joined");
        assert!(long_leaves >= 1, "no device left");
        assert!(ip_changes >= 1, "no IP change");
        assert!(name_changes >= 1, "no hostname change");

        // Some leave permanently: gone from mid-run to the end.
        let permanent = snaps[..40]
            .iter()
            .flat_map(|s| s.keys())
            .collect::<HashSet<_>>()
            .into_iter()
            .filter(|mac| snaps[40..].iter().all(|s| !s.contains_key(*mac)))
            .count();
        assert!(permanent >= 1, "nobody left for good");
    }

    #[test]
    fn simulated_returning_device_keeps_identity() {
        // A device that leaves temporarily comes back with the same MAC and base name.
        let scanner = SimulatedScanner::new(subnet("10.1.0.0/24"), 2026);
        let snaps = snapshots(&scanner, 60);
        let returned = (1..snaps.len()).any(|c| {
            snaps[c].keys().any(|mac| {
                !snaps[c - 1].contains_key(mac)
                    && snaps[..c - 1].iter().any(|s| s.contains_key(mac))
            })
        });
        assert!(returned, "no device came back after an outage");
    }

    #[test]
    fn simulated_uptime_grows() {
        let scanner = SimulatedScanner::new(subnet("10.1.0.0/24"), 8);
        let snaps = snapshots(&scanner, 3);
        let grown = snaps[0]
            .iter()
            .filter_map(|(mac, o)| Some((o.uptime_seconds?, snaps[1].get(mac)?.uptime_seconds?)))
            .collect::<Vec<_>>();
        assert!(!grown.is_empty());
        assert!(grown.iter().all(|(a, b)| b == &(a + SIM_CYCLE_SECONDS)));
    }

    // ---- Probe ----

    fn table_file(lines: &[(&str, &str)]) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        writeln!(
            f,
            "IP address       HW type     Flags       HW address            Mask     Device"
        )
        .expect("write");
        for (ip, mac) in lines {
            writeln!(f, "{ip}    0x1    0x2    {mac}    *    lo").expect("write");
        }
        f
    }

    #[tokio::test]
    async fn probe_finds_listening_host() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let table = table_file(&[("127.0.0.1", "02:00:00:AA:BB:CC")]);
        let scanner = ProbeScanner::new(subnet("127.0.0.1/32"))
            .with_ports(vec![port])
            .with_timeout(Duration::from_secs(2))
            .with_neighbour_table(table.path().to_path_buf());
        let found = scanner.scan(1).await.expect("scan");
        assert_eq!(found.len(), 1, "{found:?}");
        let o = &found[0];
        assert_eq!(o.mac, "02:00:00:aa:bb:cc");
        assert_eq!(o.ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(o.reachable);
        assert!(o.rtt_ms.is_some_and(|r| (0.0..2000.0).contains(&r)));
        assert_eq!(o.method, DiscoveryMethod::Icmp);
        assert_eq!(o.protocol, "TCP");
        assert_eq!(scanner.name(), "probe");
    }

    #[tokio::test]
    async fn probe_counts_refused_as_up() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        }; // closed again: connects are refused
        let table = table_file(&[("127.0.0.1", "02:00:00:00:00:01")]);
        let found = ProbeScanner::new(subnet("127.0.0.1/32"))
            .with_ports(vec![port])
            .with_neighbour_table(table.path().to_path_buf())
            .scan(1)
            .await
            .expect("scan");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].reachable);
        assert!(found[0].rtt_ms.is_some());
    }

    #[tokio::test]
    async fn probe_skips_hosts_without_mac() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        // The table knows another address only (outside the subnet).
        let table = table_file(&[("10.0.0.1", "02:00:00:00:00:02")]);
        let found = ProbeScanner::new(subnet("127.0.0.1/32"))
            .with_ports(vec![port])
            .with_neighbour_table(table.path().to_path_buf())
            .scan(1)
            .await
            .expect("scan");
        assert!(found.is_empty(), "{found:?}");
    }

    #[tokio::test]
    async fn probe_refuses_large_subnet_and_missing_table() {
        let err = ProbeScanner::new(subnet("10.0.0.0/16"))
            .scan(1)
            .await
            .expect_err("too large");
        assert!(matches!(err, ScanError::BadInput(_)), "{err}");
        assert!(err.to_string().contains("4096"), "{err}");

        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("arp");
        let err = ProbeScanner::new(subnet("127.0.0.1/32"))
            .with_ports(vec![9])
            .with_timeout(Duration::from_millis(200))
            .with_neighbour_table(missing.clone())
            .scan(1)
            .await
            .expect_err("no table");
        assert!(matches!(err, ScanError::Io(_)), "{err}");
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn join_reports_silent_neighbours_as_unreachable() {
        let s = subnet("10.0.0.0/24");
        let answered = HashMap::from([(Ipv4Addr::new(10, 0, 0, 5), 1.5)]);
        let neighbours = vec![
            (Ipv4Addr::new(10, 0, 0, 9), "02:00:00:00:00:09".to_owned()),
            (Ipv4Addr::new(10, 0, 0, 5), "02:00:00:00:00:05".to_owned()),
            (Ipv4Addr::new(10, 0, 1, 1), "02:00:00:00:01:01".to_owned()), // outside
            (Ipv4Addr::new(10, 0, 0, 7), "02:00:00:00:00:05".to_owned()), // MAC again
        ];
        let out = join_with_neighbours(s, &answered, &neighbours);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0].ip, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)));
        assert!(out[0].reachable);
        assert_eq!(out[0].rtt_ms, Some(1.5));
        assert_eq!(out[0].method, DiscoveryMethod::Icmp);
        assert_eq!(out[1].ip, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)));
        assert!(!out[1].reachable);
        assert_eq!(out[1].rtt_ms, None);
        assert_eq!(out[1].method, DiscoveryMethod::Arp);
    }

    // ---- File ----

    fn inventory(text: &str) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        f.write_all(text.as_bytes()).expect("write");
        f
    }

    #[tokio::test]
    async fn file_reads_valid_inventory_fresh_each_scan() {
        let f = inventory(
            r#"[
                {"mac": "AA-BB-CC-DD-EE-01", "ip": "10.0.0.1", "hostname": "core-1",
                 "vendor": "Cisco", "model": "Router", "rtt_ms": 1.25, "uptime_seconds": 3600,
                 "discovery_method": "snmp", "rack": "r1"},
                {"mac": "aa:bb:cc:dd:ee:02", "ip": "fd00::2", "reachable": false}
            ]"#,
        );
        let scanner = FileScanner::new(f.path().to_path_buf());
        let found = scanner.scan(1).await.expect("scan");
        assert_eq!(
            found[0],
            Observation {
                mac: "aa:bb:cc:dd:ee:01".to_owned(),
                ip: "10.0.0.1".parse().expect("ip"),
                hostname: Some("core-1".to_owned()),
                vendor: Some("Cisco".to_owned()),
                model: Some("Router".to_owned()),
                reachable: true,
                rtt_ms: Some(1.25),
                uptime_seconds: Some(3600),
                method: DiscoveryMethod::Snmp,
                protocol: "FILE".to_owned(),
            }
        );
        assert_eq!(found[1].ip, "fd00::2".parse::<IpAddr>().expect("ip"));
        assert!(!found[1].reachable);
        assert_eq!(found[1].method, DiscoveryMethod::Icmp);
        assert_eq!(found[1].hostname, None);

        std::fs::write(
            f.path(),
            r#"[{"mac": "02:00:00:00:00:03", "ip": "10.0.0.3"}]"#,
        )
        .expect("rewrite");
        let found = scanner.scan(2).await.expect("scan");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].mac, "02:00:00:00:00:03");
        assert_eq!(scanner.name(), "file");
    }

    #[tokio::test]
    async fn file_rejects_bad_entries() {
        let cases = [
            (
                r#"[{"mac": "02:00:00:00:00:01", "ip": "10.0.0.1"}, {"mac": "zz:00", "ip": "10.0.0.2"}]"#,
                "entry 1",
            ),
            (
                r#"[{"mac": "02:00:00:00:00:01", "ip": "10.0.0.300"}]"#,
                "entry 0",
            ),
            (r#"[{"mac": "02:00:00:00:00:01"}]"#, "entry 0"),
            (
                r#"[{"mac": "02:00:00:00:00:01", "ip": "10.0.0.1", "reachable": "yes"}]"#,
                "entry 0",
            ),
            (
                r#"[{"mac": "02:00:00:00:00:01", "ip": "10.0.0.1", "discovery_method": "lldp"}]"#,
                "entry 0",
            ),
            (
                r#"[{"mac": "02:00:00:00:00:01", "ip": "10.0.0.1", "rtt_ms": -1}]"#,
                "entry 0",
            ),
            (r#"{"mac": "02:00:00:00:00:01"}"#, "array"),
            (r#"[{"mac": "02:00:00:00:00:01", "ip": "#, "invalid JSON"),
        ];
        for (text, needle) in cases {
            let f = inventory(text);
            let err = FileScanner::new(f.path().to_path_buf())
                .scan(1)
                .await
                .expect_err(text);
            assert!(matches!(err, ScanError::BadInput(_)), "{text}: {err}");
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
    }

    #[tokio::test]
    async fn file_rejects_duplicate_mac() {
        let f = inventory(
            r#"[{"mac": "02:00:00:00:00:01", "ip": "10.0.0.1"},
                {"mac": "02:00:00:00:00:02", "ip": "10.0.0.2"},
                {"mac": "02-00-00-00-00-01", "ip": "10.0.0.3"}]"#,
        );
        let err = FileScanner::new(f.path().to_path_buf())
            .scan(1)
            .await
            .expect_err("duplicate");
        let msg = err.to_string();
        assert!(matches!(err, ScanError::BadInput(_)), "{msg}");
        assert!(msg.contains("entry 2") && msg.contains("entry 0"), "{msg}");
    }

    #[tokio::test]
    async fn file_missing_is_io_error_naming_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("inventory.json");
        let err = FileScanner::new(path.clone())
            .scan(1)
            .await
            .expect_err("missing");
        assert!(matches!(err, ScanError::Io(_)), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
}
