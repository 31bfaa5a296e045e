//! Idle outbound SMTP connections kept per destination for the next
//! units, each holding the destination connection slot it was opened on.

use std::time::{Duration, Instant};

use super::super::leases::SlotGuard;
use super::super::smtp_client::{ConnectSettings, Connection};

/// An open connection (its client knows whether an RSET is due before
/// the next transaction).
pub(crate) struct Session {
    pub(crate) conn: Connection,
    /// The TLS policy it was opened under (`dane`, `mta-sts`, ...), for
    /// events and log lines.
    pub(crate) tls_policy: &'static str,
}

/// How long an idle connection is kept for the next units to the same
/// destination. Short: servers drop idle clients, and an idle connection
/// still counts against the destination's goodwill.
const POOL_IDLE: Duration = Duration::from_secs(5);
/// Idle connections kept per destination. The scheduler spreads a busy
/// destination over up to `perDestinationConcurrency` connections at once,
/// and each idle one holds a slot, so the slots bound this in practice;
/// a cap of 4 closed most of them after every batch.
const POOL_PER_KEY: usize = 32;

/// Idle connections by destination, so units leased in later batches reuse
/// a connection instead of paying TCP, greeting and TLS again. A reused
/// connection is checked with RSET before its next transaction. Each keeps
/// the destination's connection slot it was opened on until it is reused
/// or closed, so idle connections count against
/// `delivery.perDestinationConcurrency` as they do at the destination.
#[derive(Default)]
pub(crate) struct Pool {
    idle: std::sync::Mutex<std::collections::HashMap<String, Vec<(Instant, Pooled)>>>,
}

/// An idle connection taken from the [`Pool`].
pub(crate) struct Pooled {
    /// Its [`Pool::key`].
    pub(crate) key: String,
    pub(crate) session: Session,
    /// The slot it holds (none when the backend failed as it was taken).
    pub(crate) slot: Option<SlotGuard>,
}

impl Pool {
    /// Connections are interchangeable only with the same destination,
    /// port and settings (a reload may change them).
    pub(crate) fn key(domain: &str, port: u16, settings: &ConnectSettings) -> String {
        format!(
            "{domain}|{port}|{:?}|{}|{}|{}",
            settings.tls,
            settings.tls_label,
            settings.ehlo_name,
            settings
                .auth
                .as_ref()
                .map(|(u, _)| u.as_str())
                .unwrap_or("")
        )
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Vec<(Instant, Pooled)>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection for `key`, if fresh.
    pub(crate) fn take(&self, key: &str) -> Option<Pooled> {
        let mut idle = self.lock();
        Self::pop_fresh(idle.get_mut(key)?)
    }

    /// The most recently used fresh idle connection to `domain`, whatever
    /// its settings: its slot is what the group needs first.
    pub(crate) fn take_for(&self, domain: &str) -> Option<Pooled> {
        let prefix = format!("{domain}|");
        let mut idle = self.lock();
        let key = idle
            .iter()
            .filter(|(k, list)| k.starts_with(&prefix) && !list.is_empty())
            .max_by_key(|(_, list)| list.last().map(|(since, _)| *since))
            .map(|(k, _)| k.clone())?;
        Self::pop_fresh(idle.get_mut(&key)?)
    }

    fn pop_fresh(list: &mut Vec<(Instant, Pooled)>) -> Option<Pooled> {
        while let Some((since, mut pooled)) = list.pop() {
            if since.elapsed() < POOL_IDLE {
                // It sat idle: the RSET before its next transaction shows
                // the server is still there.
                pooled.session.conn.client.reset_before_next();
                return Some(pooled);
            }
            close(pooled);
        }
        None
    }

    /// Keeps `session` (and its slot) for later, closing the oldest beyond
    /// the cap.
    pub(crate) fn put(&self, key: String, session: Session, slot: Option<SlotGuard>) {
        let mut idle = self.lock();
        let list = idle.entry(key.clone()).or_default();
        list.push((Instant::now(), Pooled { key, session, slot }));
        if list.len() > POOL_PER_KEY {
            let (_, oldest) = list.remove(0);
            close(oldest);
        }
    }

    /// Closes connections idle for too long.
    pub(crate) fn sweep(&self) {
        let mut idle = self.lock();
        for list in idle.values_mut() {
            let (fresh, stale): (Vec<_>, Vec<_>) = std::mem::take(list)
                .into_iter()
                .partition(|(since, _)| since.elapsed() < POOL_IDLE);
            *list = fresh;
            for (_, s) in stale {
                close(s);
            }
        }
        idle.retain(|_, list| !list.is_empty());
    }

    /// Everything idle (shutdown).
    pub(crate) fn drain(&self) -> Vec<Pooled> {
        self.lock()
            .drain()
            .flat_map(|(_, list)| list.into_iter().map(|(_, s)| s))
            .collect()
    }
}

/// QUIT in the background, so the caller (holding the pool lock) never
/// waits; the slot goes back only once the connection is closed.
fn close(pooled: Pooled) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            pooled.session.conn.client.quit().await;
            if let Some(slot) = pooled.slot {
                slot.release().await;
            }
        });
    }
}
