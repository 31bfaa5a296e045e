//! Send API requests in flight, in total and per client IP: a slot is
//! taken before anything of a request's body is read and given back when
//! the request is answered, however it ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Why no slot was free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Busy {
    /// `http.maxConcurrentRequests` requests are in flight.
    Total,
    /// `http.maxConcurrentRequestsPerClient` from this address are in flight.
    Client,
}

/// Counts of requests in flight. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct RequestSlots {
    counts: Arc<Mutex<Counts>>,
}

#[derive(Debug, Default)]
struct Counts {
    total: u32,
    per_ip: HashMap<IpAddr, u32>,
}

/// A taken slot; dropping it gives the slot back.
#[derive(Debug)]
pub struct Slot {
    slots: RequestSlots,
    ip: IpAddr,
}

impl RequestSlots {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Each update is a couple of integer writes; a poisoned lock still
        // holds consistent counts.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for `ip`, never waiting.
    pub fn try_take(&self, ip: IpAddr, max_total: u32, max_per_ip: u32) -> Result<Slot, Busy> {
        let ip = canonical(ip);
        let mut c = self.lock();
        if c.total >= max_total {
            return Err(Busy::Total);
        }
        let n = c.per_ip.entry(ip).or_insert(0);
        if *n >= max_per_ip {
            if *n == 0 {
                c.per_ip.remove(&ip);
            }
            return Err(Busy::Client);
        }
        *n += 1;
        c.total += 1;
        Ok(Slot {
            slots: self.clone(),
            ip,
        })
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.lock().total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.slots.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// An IPv4 client seen as `::ffff:a.b.c.d` counts as itself.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_total_and_per_client_and_gives_back_on_drop() {
        let slots = RequestSlots::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = slots.try_take(a, 3, 2).unwrap();
        let _second = slots.try_take(mapped, 3, 2).unwrap();
        assert_eq!(slots.try_take(a, 3, 2).unwrap_err(), Busy::Client);
        let _third = slots.try_take(b, 3, 2).unwrap();
        assert_eq!(slots.try_take(b, 3, 2).unwrap_err(), Busy::Total);
        assert_eq!(slots.in_flight(), 3);
        drop(first);
        assert_eq!(slots.in_flight(), 2);
        assert!(slots.try_take(b, 3, 2).is_ok());
        assert_eq!(slots.in_flight(), 2);
    }
}
