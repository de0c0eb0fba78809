//! Connection slots of a listener, counted per source address.
//!
//! Every listener of a node (gRPC, REST, the embedded broker) takes a slot for each
//! connection it accepts and gives it back when the connection ends:
//!
//! - at most `max` connections are open at once (the listener's cap);
//! - one address holds at most `per_address` of them, so one host cannot take every slot
//!   and keep them with idle connections;
//! - the last quarter of the slots is kept for addresses that hold fewer than a quarter of
//!   `per_address`. A controller holds one or two connections per listener, so when a few
//!   busy addresses have filled three quarters of the listener, controllers and operators
//!   still get in; filling that last quarter takes many more distinct addresses.
//!
//! Exempt addresses (a NAT gateway in front of many controllers) are held to `max` only.
//! `per_address = 0` turns both per-address rules off.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Whether an address is exempt from the per-address rules.
pub type Exempt = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// Why a connection got no slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotRefusal {
    /// Every slot of the listener is taken.
    Full,
    /// The address already holds its share (the per-address cap, or the reserved last
    /// quarter of the slots while it holds a quarter of the cap).
    PerAddress,
}

impl SlotRefusal {
    /// The reason label of refusal metrics: `connection_cap` or `per_address_limit`.
    pub fn reason(self) -> &'static str {
        match self {
            SlotRefusal::Full => "connection_cap",
            SlotRefusal::PerAddress => "per_address_limit",
        }
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// The slots of one listener (or of listeners that share one cap).
pub struct AddressSlots {
    max: usize,
    per_address: usize,
    exempt: Option<Exempt>,
    counts: Mutex<Counts>,
}

impl std::fmt::Debug for AddressSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressSlots")
            .field("max", &self.max)
            .field("per_address", &self.per_address)
            .field("open", &self.open())
            .finish_non_exhaustive()
    }
}

/// A taken slot; dropping it gives the slot back.
pub struct Slot {
    slots: Arc<AddressSlots>,
    addr: IpAddr,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("addr", &self.addr).finish()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.slots.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_address.get_mut(&self.addr) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.by_address.remove(&self.addr);
            }
        }
    }
}

impl AddressSlots {
    /// `max` slots (at least 1), at most `per_address` per address (0: no per-address
    /// rules); `exempt` addresses are held to `max` only.
    pub fn new(max: usize, per_address: usize, exempt: Option<Exempt>) -> Arc<AddressSlots> {
        Arc::new(AddressSlots {
            max: max.max(1),
            per_address,
            exempt,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Slots in use.
    pub fn open(&self) -> usize {
        self.lock().total
    }

    /// Slots `addr` holds.
    pub fn held_by(&self, addr: IpAddr) -> usize {
        self.lock().by_address.get(&addr).copied().unwrap_or(0)
    }

    /// Takes a slot for a connection from `addr`.
    ///
    /// # Errors
    /// [`SlotRefusal`] when the listener is full or `addr` holds its share.
    pub fn try_take(self: &Arc<Self>, addr: IpAddr) -> Result<Slot, SlotRefusal> {
        // An IPv4 peer on a dual-stack socket counts as its IPv4 address.
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        let exempt = self.per_address == 0 || self.exempt.as_ref().is_some_and(|f| f(addr));
        let mut c = self.lock();
        if c.total >= self.max {
            return Err(SlotRefusal::Full);
        }
        let held = c.by_address.get(&addr).copied().unwrap_or(0);
        if !exempt {
            if held >= self.per_address {
                return Err(SlotRefusal::PerAddress);
            }
            // The reserved last quarter: only for addresses holding little.
            let reserve = self.max / 4;
            if c.total >= self.max - reserve && held >= (self.per_address / 4).max(1) {
                return Err(SlotRefusal::PerAddress);
            }
        }
        c.total += 1;
        *c.by_address.entry(addr).or_default() += 1;
        drop(c);
        Ok(Slot {
            slots: self.clone(),
            addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn one_address_is_held_to_its_cap_and_others_still_get_in() {
        let s = AddressSlots::new(100, 8, None);
        let a = ip("10.0.0.1");
        let held: Vec<Slot> = (0..8)
            .map(|_| s.try_take(a).expect("under the cap"))
            .collect();
        assert_eq!(s.try_take(a).err(), Some(SlotRefusal::PerAddress));
        assert_eq!(s.held_by(a), 8);
        let b = s.try_take(ip("10.0.0.2")).expect("another address");
        assert_eq!(s.open(), 9);
        drop(held);
        assert_eq!(s.held_by(a), 0);
        assert_eq!(s.open(), 1);
        drop(b);
        assert_eq!(s.open(), 0);
        assert!(s.try_take(a).is_ok(), "slots come back");
    }

    #[test]
    fn the_last_quarter_is_kept_for_addresses_holding_little() {
        // 16 slots, 4 reserved; 8 per address, 2 per address inside the reserve.
        let s = AddressSlots::new(16, 8, None);
        let mut held = Vec::new();
        for a in ["10.0.0.1", "10.0.0.2"] {
            for _ in 0..6 {
                held.push(s.try_take(ip(a)).expect("outside the reserve"));
            }
        }
        assert_eq!(s.open(), 12);
        // Busy addresses are refused from now on, below their own cap.
        assert_eq!(
            s.try_take(ip("10.0.0.1")).err(),
            Some(SlotRefusal::PerAddress)
        );
        // A new address gets in, twice; then it is busy too.
        held.push(s.try_take(ip("10.0.0.3")).expect("reserve"));
        held.push(s.try_take(ip("10.0.0.3")).expect("reserve"));
        assert_eq!(
            s.try_take(ip("10.0.0.3")).err(),
            Some(SlotRefusal::PerAddress)
        );
        held.push(s.try_take(ip("10.0.0.4")).expect("reserve"));
        held.push(s.try_take(ip("10.0.0.5")).expect("reserve"));
        assert_eq!(s.try_take(ip("10.0.0.6")).err(), Some(SlotRefusal::Full));
    }

    #[test]
    fn exempt_addresses_and_a_zero_cap_only_meet_the_total() {
        let gw = ip("192.0.2.1");
        let s = AddressSlots::new(10, 2, Some(Arc::new(move |a| a == gw)));
        let held: Vec<Slot> = (0..10).map(|_| s.try_take(gw).expect("exempt")).collect();
        assert_eq!(s.try_take(gw).err(), Some(SlotRefusal::Full));
        drop(held);
        let off = AddressSlots::new(5, 0, None);
        let held: Vec<Slot> = (0..5)
            .map(|_| off.try_take(gw).expect("no per-address rule"))
            .collect();
        assert_eq!(off.try_take(gw).err(), Some(SlotRefusal::Full));
        drop(held);
    }

    #[test]
    fn mapped_ipv4_counts_as_ipv4() {
        let s = AddressSlots::new(10, 1, None);
        let _a = s.try_take(ip("10.0.0.1")).expect("first");
        assert_eq!(
            s.try_take(ip("::ffff:10.0.0.1")).err(),
            Some(SlotRefusal::PerAddress)
        );
    }
}
