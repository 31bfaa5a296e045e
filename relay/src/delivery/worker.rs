//! The delivery loop: lease due units, group them by destination, deliver
//! each group over one connection, and settle every recipient (complete,
//! retry, bounce).
//!
//! Concurrency: at most `workers` units are in flight in this pod (a
//! semaphore); each destination group takes one of the destination's
//! connection slots, shared by all pods, or goes back to the queue for a
//! moment. A throttled or slow destination holds only its own units, so
//! it never holds up another.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_crds::config::{RelayConfig, TlsMode, Transport};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::DeliveryContext;
use super::classify::{Failure, Fault, Outcome, Reply};
use super::client::{self, ConnectSettings, Connection, Envelope, TlsPolicy};
use super::limits;
use super::mx::{self, MxHost};
use super::retry::{RetryPolicy, throttle_delay};
use super::settle::{self, Fate, Plan, RcptOutcome, SettleInput};
use super::slot::{SlotGuard, renew_wait};
use super::tls_policy;
use crate::metrics::destination_group;
use crate::queue::{Lease, Millis, Reschedule, Settlement, now_millis};

/// Longest pause between queue polls when nothing is due.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// Pause after the queue backend failed.
const BACKEND_PAUSE: Duration = Duration::from_secs(1);
/// Units leased per poll, at most.
const MAX_BATCH: usize = 100;
/// How often queue gauges are refreshed.
const STATS_EVERY: Duration = Duration::from_secs(10);
/// Wait for a unit whose message data is missing or unreadable.
const DATA_RETRY: Duration = Duration::from_secs(60);
/// Wait for a unit whose message data could not be fetched because the
/// backend was briefly away (a Redis restart): it is there, so try soon.
const DATA_RETRY_TRANSIENT: Duration = Duration::from_secs(2);

/// How long to wait before reading a unit's message data again.
fn data_retry_delay(error: &crate::queue::QueueError) -> Duration {
    use crate::queue::QueueError;
    match error {
        QueueError::Unavailable(_) | QueueError::Timeout(_) => DATA_RETRY_TRANSIENT,
        QueueError::NotFound(_)
        | QueueError::Corrupt { .. }
        | QueueError::LeaseLost(_)
        | QueueError::NotReplicated { .. } => DATA_RETRY,
    }
}

/// Runs the delivery workers until `shutdown` completes, then lets
/// deliveries in progress finish for up to `limits.shutdownGrace` (their
/// leases expire and another worker takes them otherwise).
pub async fn run(
    ctx: Arc<DeliveryContext>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let workers = ctx.config.get().delivery.workers.max(1) as usize;
    let permits = Arc::new(Semaphore::new(workers));
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut last_stats: Option<Instant> = None;
    tokio::pin!(shutdown);
    tracing::info!(workers, "delivery workers started");
    loop {
        while tasks.try_join_next().is_some() {}
        ctx.pool.sweep();
        if last_stats.is_none_or(|t| t.elapsed() >= STATS_EVERY) {
            last_stats = Some(Instant::now());
            update_gauges(&ctx).await;
        }
        let available = permits.available_permits();
        if available == 0 {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tasks.join_next() => continue,
            }
        }
        let cfg = ctx.config.get();
        let lease_for = cfg.queue.lease.get();
        let leases = match ctx
            .queue
            .lease(now_millis(), available.min(MAX_BATCH), lease_for)
            .await
        {
            Ok(leases) => leases,
            Err(error) => {
                tracing::warn!(%error, "cannot lease from the queue");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(BACKEND_PAUSE) => continue,
                }
            }
        };
        if leases.is_empty() {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(IDLE_POLL) => continue,
            }
        }
        for (domain, group) in group_by_destination(leases) {
            let n = u32::try_from(group.len()).unwrap_or(u32::MAX);
            // Never blocks long: we leased no more units than free permits.
            let Ok(permit) = permits.clone().acquire_many_owned(n).await else {
                break;
            };
            tasks.spawn(deliver_group(
                ctx.clone(),
                cfg.clone(),
                domain,
                group,
                permit,
            ));
        }
    }
    let grace = ctx.config.get().limits.shutdown_grace.get();
    tracing::info!(in_flight = tasks.len(), ?grace, "delivery workers stopping");
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tasks.abort_all();
    }
    for pooled in ctx.pool.drain() {
        pooled.session.conn.client.quit().await;
        if let Some(slot) = pooled.slot {
            slot.release().await;
        }
    }
}

async fn update_gauges(ctx: &DeliveryContext) {
    let now = now_millis();
    match ctx.queue.stats(now).await {
        Ok(stats) => {
            let m = &ctx.metrics;
            m.queue_units
                .with_label_values(&["due"])
                .set(stats.due as i64);
            m.queue_units
                .with_label_values(&["deferred"])
                .set(stats.deferred as i64);
            m.queue_units
                .with_label_values(&["leased"])
                .set(stats.leased as i64);
            m.queue_units
                .with_label_values(&["held"])
                .set(stats.held as i64);
            let age = stats
                .oldest_received_at
                .map(|t| now.saturating_sub(t) / 1000)
                .unwrap_or(0);
            m.oldest_message_age.set(age as i64);
        }
        Err(error) => tracing::debug!(%error, "queue stats unavailable"),
    }
    if let Ok(holds) = ctx.control.holds().await {
        ctx.metrics.held_destinations.set(holds.len() as i64);
    }
}

/// Leases grouped by destination domain, keeping lease order inside a group.
pub fn group_by_destination(leases: Vec<Lease>) -> BTreeMap<String, Vec<Lease>> {
    let mut groups: BTreeMap<String, Vec<Lease>> = BTreeMap::new();
    for lease in leases {
        groups
            .entry(lease.unit.domain.clone())
            .or_default()
            .push(lease);
    }
    groups
}

fn policy(cfg: &RelayConfig) -> RetryPolicy {
    RetryPolicy {
        schedule: cfg
            .delivery
            .retry_schedule
            .iter()
            .map(|d| d.get())
            .collect(),
        max_lifetime: cfg.delivery.max_queue_lifetime.get(),
        delayed_dsn_after: cfg.delivery.delayed_dsn_after.map(|d| d.get()),
    }
}

fn jitter() -> u64 {
    rand::random::<u64>() % 1000
}

fn millis(d: Duration) -> Millis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Hands a unit back for `wait` because of a limit; not an attempt. A
/// unit past the maximum queue lifetime is not handed back but expires,
/// with a DSN, as after a temporary failure: a limit too tight for the
/// volume must not keep mail forever without telling the sender.
async fn throttle(
    ctx: &DeliveryContext,
    cfg: &RelayConfig,
    lease: &Lease,
    wait: Duration,
    why: &str,
) {
    let unit = &lease.unit;
    if now_millis() >= policy(cfg).expires_at(unit.lifetime_start()) {
        let route = Route::Fail(Fault::Throttled(why.to_string()));
        deliver_unit(ctx, cfg, &unit.domain, &route, &mut None, lease).await;
        return;
    }
    let lifetime = cfg.delivery.max_queue_lifetime.get();
    if let Err(error) = limits::note_throttled(ctx.state.as_ref(), &unit.id, lifetime).await {
        tracing::warn!(%error, unit = %unit.id, "cannot record throttle");
    }
    let next = now_millis().saturating_add(millis(throttle_delay(wait, jitter())));
    let reschedule = Reschedule {
        recipients: unit.recipients.clone(),
        next_attempt_at: next,
        last_error: unit.last_error.clone().unwrap_or_else(|| why.to_string()),
        delay_notified: unit.delay_notified,
    };
    tracing::debug!(unit = %unit.id, destination = %unit.domain, why, "throttled");
    if let Err(error) = ctx.queue.retry(lease, reschedule).await {
        tracing::warn!(%error, unit = %unit.id, "cannot hand back a throttled unit; its lease will expire");
    }
}

/// Where a group goes.
enum Route {
    /// SMTP to these hosts on this port.
    Smtp(Vec<MxHost>, u16),
    /// SMTP to these hosts on this port, with these connection settings.
    Ready(Vec<MxHost>, u16, Box<ConnectSettings>),
    /// Nowhere, for this reason.
    Fail(Fault),
    /// The Maildir tree.
    Maildir(std::path::PathBuf),
}

async fn route(ctx: &DeliveryContext, cfg: &RelayConfig, domain: &str) -> Route {
    match cfg.delivery.transport {
        Transport::Maildir => match &cfg.delivery.maildir {
            Some(m) => Route::Maildir(m.path.clone()),
            None => Route::Fail(Fault::Local(
                "transport maildir without maildir.path".into(),
            )),
        },
        Transport::Smarthost => {
            let Some(sh) = &cfg.delivery.smarthost else {
                return Route::Fail(Fault::Local(
                    "transport smarthost without smarthost settings".into(),
                ));
            };
            // The system resolver: a smarthost is often a cluster service
            // name that only the pod's resolv.conf search path finds.
            match tokio::net::lookup_host((sh.host.as_str(), sh.port)).await {
                Ok(addrs) => {
                    let addrs: Vec<_> = addrs.map(|a| a.ip()).collect();
                    if addrs.is_empty() {
                        return Route::Fail(Fault::DnsTemporary(format!(
                            "smarthost {} has no address",
                            sh.host
                        )));
                    }
                    Route::Smtp(
                        vec![MxHost {
                            name: sh.host.clone(),
                            addrs,
                        }],
                        sh.port,
                    )
                }
                Err(e) => Route::Fail(Fault::DnsTemporary(format!("smarthost {}: {e}", sh.host))),
            }
        }
        Transport::Mx => {
            if domain.is_empty() {
                return Route::Fail(Fault::DnsPermanent {
                    status: "5.1.3",
                    reason: "recipient address has no domain".into(),
                });
            }
            let resolver = match ctx.resolver(&cfg.delivery.mx.nameservers) {
                Ok(r) => r,
                Err(e) => return Route::Fail(Fault::DnsTemporary(e.to_string())),
            };
            match mx::resolve(&resolver, domain).await {
                Ok(hosts) => Route::Smtp(hosts, cfg.delivery.mx.port),
                Err(fault) => Route::Fail(fault),
            }
        }
    }
}

async fn connect_settings(
    ctx: &DeliveryContext,
    cfg: &RelayConfig,
    domain: &str,
) -> Result<ConnectSettings, Fault> {
    let timeouts = client::Timeouts::from(&cfg.delivery.timeouts);
    match (cfg.delivery.transport, &cfg.delivery.smarthost) {
        (Transport::Smarthost, Some(sh)) => {
            let auth = match (&sh.username, &sh.password_file) {
                (Some(user), Some(file)) => {
                    // Read per group (a rotated Secret is picked up), off
                    // the async threads: a slow volume must not stall them.
                    let password = tokio::fs::read_to_string(file).await.map_err(|e| {
                        Fault::Local(format!("cannot read smarthost password file: {e}"))
                    })?;
                    Some((
                        user.clone(),
                        password.trim_end_matches(['\r', '\n']).to_string(),
                    ))
                }
                _ => None,
            };
            let tls = match sh.tls {
                TlsMode::None => TlsPolicy::Disabled,
                // AUTH will follow: STARTTLS must happen.
                TlsMode::Starttls => TlsPolicy::Required,
                TlsMode::Implicit => TlsPolicy::Implicit,
            };
            let tls_config = match tls {
                TlsPolicy::Disabled => ctx.unverified_tls.clone(),
                TlsPolicy::Opportunistic | TlsPolicy::Required | TlsPolicy::Implicit => {
                    ctx.verified_tls().map_err(|e| Fault::Tls(e.to_string()))?
                }
            };
            Ok(ConnectSettings {
                ehlo_name: cfg.hostname.clone(),
                timeouts,
                tls,
                tls_config,
                tls_label: if tls == TlsPolicy::Disabled {
                    "none"
                } else {
                    "verified"
                },
                auth,
            })
        }
        _ => {
            let mode = tls_policy::configured(cfg, domain);
            Ok(ConnectSettings {
                ehlo_name: cfg.hostname.clone(),
                timeouts,
                tls: tls_policy::client_policy(mode),
                tls_config: ctx.mx_tls_config(mode, cfg.delivery.tls.ca_file.as_deref())?,
                tls_label: mode.as_str(),
                auth: None,
            })
        }
    }
}

/// Puts back the units whose sending domain the reputation guard paused,
/// due again in [`crate::reputation::HOLD_FOR`], without counting an
/// attempt (`Postpone`); returns the others. A unit held for longer than
/// the queue lifetime is not expired while held: a pause must not turn
/// into bounces for mail the app was told was accepted.
async fn hold_paused(ctx: &DeliveryContext, leases: Vec<Lease>) -> Vec<Lease> {
    let mut paused: BTreeMap<String, bool> = BTreeMap::new();
    let mut ready = Vec::with_capacity(leases.len());
    for lease in leases {
        let sending = lease.unit.sending_domain.to_ascii_lowercase();
        let held = match paused.get(&sending) {
            Some(p) => *p,
            None => {
                let p = match ctx.reputation.is_paused(&sending).await {
                    Ok(p) => p,
                    Err(error) => {
                        tracing::warn!(%error, domain = %sending, "cannot read the reputation state; delivering");
                        false
                    }
                };
                paused.insert(sending.clone(), p);
                p
            }
        };
        if !held {
            ready.push(lease);
            continue;
        }
        let until = now_millis().saturating_add(millis(crate::reputation::HOLD_FOR));
        let op = crate::queue::Settlement::only(crate::queue::SettleOp::Postpone { until });
        match ctx.queue.settle(&lease, op).await {
            Ok(()) => {
                ctx.metrics
                    .reputation
                    .held
                    .with_label_values(&[&sending])
                    .inc();
                tracing::debug!(unit = %lease.unit.id, domain = %sending, "held: sending domain paused");
            }
            Err(error) => {
                tracing::warn!(%error, unit = %lease.unit.id, "cannot hold a unit of a paused domain; its lease will expire")
            }
        }
    }
    ready
}

/// Delivers one destination's units, sharing a connection.
async fn deliver_group(
    ctx: Arc<DeliveryContext>,
    cfg: Arc<RelayConfig>,
    domain: String,
    leases: Vec<Lease>,
    _permit: OwnedSemaphorePermit,
) {
    let leases = hold_paused(&ctx, leases).await;
    if leases.is_empty() {
        return;
    }
    let is_smtp = cfg.delivery.transport != Transport::Maildir;
    let slot_key = limits::slot_key(&domain);
    let limit = cfg.delivery.per_destination_concurrency.max(1);
    // An idle connection to the destination holds a slot of its own: use
    // it rather than take a second one.
    let mut pooled = if is_smtp {
        ctx.pool.take_for(&domain)
    } else {
        None
    };
    let mut slot = if let Some(p) = pooled.as_mut().filter(|p| p.slot.is_some()) {
        p.slot.take()
    } else if is_smtp {
        match SlotGuard::acquire(&ctx.state, &slot_key, limit, cfg.queue.lease.get()).await {
            Ok(Some(guard)) => Some(guard),
            Ok(None) => {
                for lease in &leases {
                    throttle(
                        &ctx,
                        &cfg,
                        lease,
                        Duration::from_secs(1),
                        "waiting for a connection slot",
                    )
                    .await;
                }
                if let Some(p) = pooled {
                    p.session.conn.client.quit().await;
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, destination = %domain, "cannot take a connection slot; delivering without");
                None
            }
        }
    } else {
        None
    };

    // Rate limits, per unit.
    let mut ready = Vec::with_capacity(leases.len());
    for lease in leases {
        let unit = &lease.unit;
        let windows = limits::rate_windows(
            &unit.sending_domain,
            cfg.domain(&unit.sending_domain).map(|d| &d.rate_limits),
            &domain,
            if is_smtp {
                cfg.delivery.per_destination_rate
            } else {
                None
            },
        );
        match limits::take_rate(ctx.state.as_ref(), &windows).await {
            Ok(None) => ready.push(lease),
            Ok(Some(wait)) => throttle(&ctx, &cfg, &lease, wait, "rate limit").await,
            Err(error) => {
                tracing::warn!(%error, "rate limit check failed; delivering anyway");
                ready.push(lease);
            }
        }
    }

    if !ready.is_empty() {
        let route = match route(&ctx, &cfg, &domain).await {
            Route::Smtp(hosts, port) => match connect_settings(&ctx, &cfg, &domain).await {
                Ok(settings) => {
                    match tls_policy::apply_mta_sts(&ctx, &cfg, &domain, hosts, settings).await {
                        Ok((hosts, settings)) => Route::Ready(hosts, port, Box::new(settings)),
                        Err(fault) => Route::Fail(fault),
                    }
                }
                Err(fault) => Route::Fail(fault),
            },
            other => other,
        };
        let key = match &route {
            Route::Ready(_, port, settings) => Some(Pool::key(&domain, *port, settings)),
            Route::Smtp(..) | Route::Fail(_) | Route::Maildir(_) => None,
        };
        let mut session = match pooled.take() {
            Some(p) if key.as_deref() == Some(p.key.as_str()) => Some(p.session),
            other => {
                // Settings changed under it (a reload): close it before
                // opening another on the same slot.
                if let Some(p) = other {
                    p.session.conn.client.quit().await;
                }
                key.as_deref().and_then(|k| ctx.pool.take(k)).map(|p| {
                    // Its slot is redundant with the group's.
                    slot = slot.take().or(p.slot);
                    p.session
                })
            }
        };
        let lease_for = millis(cfg.queue.lease.get());
        for lease in &ready {
            // Units wait in a group while earlier ones are sent; one whose
            // lease has mostly run out goes back rather than risk being
            // delivered here and by the worker that takes it over.
            if lease.expires_at.saturating_sub(now_millis()) < lease_for / 3 {
                throttle(&ctx, &cfg, lease, Duration::ZERO, "lease running out").await;
                continue;
            }
            if !keep_slot(&ctx, &cfg, &slot_key, limit, &mut slot, &mut session).await {
                throttle(
                    &ctx,
                    &cfg,
                    lease,
                    Duration::from_secs(1),
                    "connection slot lost",
                )
                .await;
                continue;
            }
            let _renewing = Renewer::start(&ctx.queue, lease, cfg.queue.lease.get());
            deliver_unit(&ctx, &cfg, &domain, &route, &mut session, lease).await;
        }
        if let Some(s) = session {
            match key {
                // The connection keeps the slot while it waits in the pool:
                // an idle connection counts at the destination too.
                Some(k) => {
                    ctx.pool.put(k, s, slot.take());
                }
                None => s.conn.client.quit().await,
            }
        }
    } else if let Some(p) = pooled {
        p.session.conn.client.quit().await;
    }

    if let Some(slot) = slot {
        slot.release().await;
    }
}

/// Whether the group may deliver its next unit: yes without a slot (the
/// backend failed when it was taken, or Maildir) or with one still held.
/// A lost slot may be some other pod's now: the connection on it is
/// closed (QUIT awaited, so the destination sees it gone) and a new slot
/// is taken if one is free; otherwise the rest of the group goes back to
/// the queue, as when no slot was free at the start.
async fn keep_slot(
    ctx: &DeliveryContext,
    cfg: &RelayConfig,
    key: &str,
    limit: u32,
    slot: &mut Option<SlotGuard>,
    session: &mut Option<Session>,
) -> bool {
    if !slot.as_ref().is_some_and(SlotGuard::lost) {
        return true;
    }
    if let Some(s) = session.take() {
        s.conn.client.quit().await;
    }
    if let Some(old) = slot.take() {
        old.release().await;
    }
    match SlotGuard::acquire(&ctx.state, key, limit, cfg.queue.lease.get()).await {
        Ok(Some(guard)) => {
            *slot = Some(guard);
            true
        }
        Ok(None) => false,
        Err(error) => {
            tracing::warn!(%error, slot = %key, "cannot take a connection slot again; handing the units back");
            false
        }
    }
}

/// Keeps one unit's lease renewed while it is being delivered, so SMTP
/// timeouts that add up past the lease do not let another worker take the
/// unit over and deliver it again. Stops when dropped: after the delivery,
/// and on every early exit (panic, or the group aborted at shutdown).
///
/// The delivery keeps its original [`Lease`]: renewal keeps the token, so
/// settling with it works; only its `expires_at` is stale, which makes
/// `record`'s retry window err on the short side.
struct Renewer(tokio::task::JoinHandle<()>);

impl Renewer {
    fn start(queue: &Arc<dyn crate::queue::Queue>, lease: &Lease, lease_for: Duration) -> Self {
        Renewer(tokio::spawn(keep_renewed(
            queue.clone(),
            lease.clone(),
            lease_for,
        )))
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Renews `lease` until aborted or lost. A lost lease is only logged: the
/// delivery goes on, and recording its outcome reports the loss.
async fn keep_renewed(queue: Arc<dyn crate::queue::Queue>, mut lease: Lease, lease_for: Duration) {
    use crate::queue::QueueError;
    while let Some(wait) = renew_wait(lease.expires_at, now_millis(), lease_for) {
        tokio::time::sleep(wait).await;
        match queue.renew(&lease, now_millis(), lease_for).await {
            Ok(renewed) => lease = renewed,
            Err(QueueError::LeaseLost(_)) => {
                tracing::warn!(unit = %lease.unit.id, "lease lost during delivery; another worker may deliver the unit too");
                return;
            }
            // Tried again sooner next time: the wait halves what is left.
            Err(error) => {
                tracing::warn!(%error, unit = %lease.unit.id, "cannot renew a lease; trying again");
            }
        }
    }
    tracing::warn!(unit = %lease.unit.id, "lease expired during delivery; another worker may deliver the unit too");
}

/// An open connection and whether a transaction already used it.
pub(crate) struct Session {
    conn: Connection,
    used: bool,
}

/// How long an idle connection is kept for the next units to the same
/// destination. Short: servers drop idle clients, and an idle connection
/// still counts against the destination's goodwill.
const POOL_IDLE: Duration = Duration::from_secs(5);
/// Idle connections kept per destination.
const POOL_PER_KEY: usize = 4;

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
    key: String,
    session: Session,
    /// The slot it holds (none when the backend failed as it was taken).
    slot: Option<SlotGuard>,
}

impl Pool {
    /// Connections are interchangeable only with the same destination,
    /// port and settings (a reload may change them).
    fn key(domain: &str, port: u16, settings: &ConnectSettings) -> String {
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
    fn take(&self, key: &str) -> Option<Pooled> {
        let mut idle = self.lock();
        Self::pop_fresh(idle.get_mut(key)?)
    }

    /// The most recently used fresh idle connection to `domain`, whatever
    /// its settings: its slot is what the group needs first.
    fn take_for(&self, domain: &str) -> Option<Pooled> {
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
        while let Some((since, pooled)) = list.pop() {
            if since.elapsed() < POOL_IDLE {
                return Some(Pooled {
                    session: Session {
                        used: true,
                        ..pooled.session
                    },
                    ..pooled
                });
            }
            close(pooled);
        }
        None
    }

    /// Keeps `session` (and its slot) for later, closing the oldest beyond
    /// the cap.
    fn put(&self, key: String, session: Session, slot: Option<SlotGuard>) {
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
    fn drain(&self) -> Vec<Pooled> {
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

async fn deliver_unit(
    ctx: &DeliveryContext,
    cfg: &RelayConfig,
    domain: &str,
    route: &Route,
    session: &mut Option<Session>,
    lease: &Lease,
) {
    let unit = &lease.unit;
    if unit.recipients.is_empty() {
        if let Err(error) = ctx.queue.complete(lease).await {
            tracing::warn!(%error, unit = %unit.id, "cannot complete an empty unit");
        }
        return;
    }
    let data = match ctx.queue.message_data(&unit.message_id).await {
        Ok(d) => d,
        Err(error) => {
            tracing::error!(%error, unit = %unit.id, "cannot read message data; retrying later");
            let reschedule = Reschedule {
                recipients: unit.recipients.clone(),
                next_attempt_at: now_millis().saturating_add(millis(data_retry_delay(&error))),
                last_error: format!("queue: {error}"),
                delay_notified: unit.delay_notified,
            };
            if let Err(error) = ctx.queue.retry(lease, reschedule).await {
                tracing::warn!(%error, unit = %unit.id, "cannot reschedule");
            }
            return;
        }
    };

    let started = Instant::now();
    let outcomes: Vec<RcptOutcome> = match route {
        Route::Fail(fault) => unit
            .recipients
            .iter()
            .map(|_| RcptOutcome {
                result: Err(Failure::Fault(fault.clone())),
                remote: None,
                tls: false,
            })
            .collect(),
        Route::Maildir(root) => deliver_maildir(cfg, root, unit, &data).await,
        Route::Ready(hosts, port, settings) => {
            deliver_smtp(ctx, settings, hosts, *port, session, unit, &data, domain).await
        }
        // `deliver_group` turns every Smtp route into Ready or Fail.
        Route::Smtp(..) => unit
            .recipients
            .iter()
            .map(|_| RcptOutcome {
                result: Err(Failure::Fault(Fault::Local(
                    "no connection settings".into(),
                ))),
                remote: None,
                tls: false,
            })
            .collect(),
    };
    ctx.metrics
        .attempt_duration
        .with_label_values(&[destination_group(domain)])
        .observe(started.elapsed().as_secs_f64());
    settle(ctx, cfg, lease, &data, outcomes).await;
}

async fn deliver_maildir(
    cfg: &RelayConfig,
    root: &std::path::Path,
    unit: &crate::queue::DeliveryUnit,
    data: &[u8],
) -> Vec<RcptOutcome> {
    let root = root.to_path_buf();
    let hostname = cfg.hostname.clone();
    let mail_from = unit.mail_from.clone();
    let recipients = unit.recipients.clone();
    let data = data.to_vec();
    let joined = tokio::task::spawn_blocking(move || {
        recipients
            .iter()
            .map(|rcpt| super::maildir::deliver(&root, &hostname, &mail_from, rcpt, &data))
            .collect::<Vec<_>>()
    })
    .await;
    match joined {
        Ok(results) => results
            .into_iter()
            .map(|r| RcptOutcome {
                result: match r {
                    Ok(path) => Ok(Reply::new(
                        250,
                        Some([2, 0, 0]),
                        format!("delivered to {}", path.display()),
                    )),
                    Err(e) => Err(Failure::Fault(Fault::Local(e.to_string()))),
                },
                remote: None,
                tls: false,
            })
            .collect(),
        Err(e) => unit
            .recipients
            .iter()
            .map(|_| RcptOutcome {
                result: Err(Failure::Fault(Fault::Local(e.to_string()))),
                remote: None,
                tls: false,
            })
            .collect(),
    }
}

/// Delivers one unit over SMTP, reusing `session` when it is open and
/// moving on to the next host after a host failure.
#[allow(clippy::too_many_arguments)]
async fn deliver_smtp(
    ctx: &DeliveryContext,
    settings: &ConnectSettings,
    hosts: &[MxHost],
    port: u16,
    session: &mut Option<Session>,
    unit: &crate::queue::DeliveryUnit,
    data: &[u8],
    domain: &str,
) -> Vec<RcptOutcome> {
    let n = unit.recipients.len();
    let verp = super::return_path::verp_sender(&ctx.config.get(), ctx.feedback.as_deref(), unit);
    let mut outcomes: Vec<Option<RcptOutcome>> = vec![None; n];
    let mut pending: Vec<usize> = (0..n).collect();
    let mut last_failure = Failure::Fault(Fault::Connect(format!("no server for {domain}")));
    let mut next_host = 0usize;
    while !pending.is_empty() {
        // Reuse the open connection after RSET, or open a new one.
        if let Some(s) = session.as_mut()
            && s.used
        {
            match s.conn.client.rset().await {
                Ok(true) => {}
                Ok(false) | Err(_) => {
                    if let Some(s) = session.take() {
                        s.conn.client.quit().await;
                    }
                }
            }
        }
        if session.is_none() {
            while session.is_none() && next_host < hosts.len() {
                let host = &hosts[next_host];
                next_host += 1;
                for ip in &host.addrs {
                    match client::connect(SocketAddr::new(*ip, port), &host.name, settings).await {
                        Ok(conn) => {
                            let tls = if conn.tls { "tls" } else { "plaintext" };
                            ctx.metrics
                                .outbound_sessions
                                .with_label_values(&[destination_group(domain), tls])
                                .inc();
                            ctx.metrics
                                .outbound_tls
                                .with_label_values(&[settings.tls_label, tls])
                                .inc();
                            *session = Some(Session { conn, used: false });
                            break;
                        }
                        Err(failure) => {
                            if let Some(result) = tls_policy::failure_result(&failure) {
                                ctx.metrics
                                    .outbound_tls
                                    .with_label_values(&[settings.tls_label, result])
                                    .inc();
                            }
                            tracing::debug!(host = %host.name, %ip, %failure, tls_policy = settings.tls_label, "host failed; trying the next");
                            last_failure = failure;
                        }
                    }
                }
            }
            if session.is_none() {
                break;
            }
        }
        let Some(s) = session.as_mut() else { break };
        let recipients: Vec<String> = pending
            .iter()
            .map(|&i| unit.recipients[i].clone())
            .collect();
        let env = Envelope {
            mail_from: verp.as_deref().unwrap_or(&unit.mail_from),
            recipients: &recipients,
            eight_bit: unit.flags.eight_bit,
            smtputf8: unit.flags.smtputf8,
        };
        let t = s.conn.client.send(&env, data).await;
        s.used = true;
        let host = s.conn.host.clone();
        let tls = s.conn.tls;
        let mut still = Vec::new();
        for (&i, result) in pending.iter().zip(t.results) {
            match result {
                Err(f)
                    if t.host_failure
                        && f.outcome() == Outcome::Temporary
                        && next_host < hosts.len() =>
                {
                    last_failure = f;
                    still.push(i);
                }
                result => {
                    outcomes[i] = Some(RcptOutcome {
                        result,
                        remote: Some(host.clone()),
                        tls,
                    })
                }
            }
        }
        pending = still;
        if t.connection_lost {
            *session = None;
        } else if t.host_failure
            && let Some(s) = session.take()
        {
            s.conn.client.quit().await;
        }
    }
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| RcptOutcome {
                result: Err(last_failure.clone()),
                remote: None,
                tls: false,
            })
        })
        .collect()
}

/// Applies the outcomes: [`settle::plan`] decides, one atomic
/// `Queue::settle` stores the unit's fate with its DSNs, events and
/// suppression entries, and only once that is stored are the metrics
/// counted and the outcome logged, so a failed settlement (the unit is
/// delivered again after its lease) never counts or suppresses twice.
async fn settle(
    ctx: &DeliveryContext,
    cfg: &RelayConfig,
    lease: &Lease,
    data: &[u8],
    outcomes: Vec<RcptOutcome>,
) {
    let unit = &lease.unit;
    let now = now_millis();
    let policy = policy(cfg);
    let needs_attempts = outcomes
        .iter()
        .any(|o| matches!(&o.result, Err(f) if f.outcome() != Outcome::Permanent));
    let attempts = if needs_attempts {
        limits::effective_attempts(ctx.state.as_ref(), &unit.id, unit.attempts).await
    } else {
        unit.attempts
    };
    let input = SettleInput {
        unit,
        data,
        attempts,
        policy: &policy,
        hostname: &cfg.hostname,
        relay: &ctx.relay,
        suppression_ttl: cfg.delivery.suppression_ttl.map(|d| d.get()),
        now,
    };
    let plan = settle::plan(&input, outcomes);
    if let Err(error) = record(ctx, lease, &plan.settlement).await {
        tracing::warn!(%error, unit = %unit.id, "cannot record the outcome in the queue; the unit may be delivered again");
        return;
    }
    count_and_log(ctx, unit, &plan, now);
}

/// Metrics and one log line per recipient of a stored settlement.
fn count_and_log(
    ctx: &DeliveryContext,
    unit: &crate::queue::DeliveryUnit,
    plan: &Plan,
    now: Millis,
) {
    let dest = destination_group(&unit.domain);
    let attempt = unit.attempts.saturating_add(1);
    let domain = unit.sending_domain.as_str();
    for r in &plan.records {
        let remote = r.remote.as_deref().unwrap_or("-");
        let rcpt = r.recipient.as_str();
        match &r.fate {
            Fate::Delivered(reply) => {
                ctx.metrics
                    .delivered
                    .with_label_values(&[domain, dest])
                    .inc();
                let latency = now.saturating_sub(unit.received_at) as f64 / 1000.0;
                ctx.metrics
                    .delivery_latency
                    .with_label_values(&[domain])
                    .observe(latency);
                tracing::info!(
                    outcome = "delivered", message_id = %unit.message_id, sending_domain = %domain,
                    destination = %unit.domain, recipient = %rcpt, remote, reply = %reply, tls = r.tls, attempt,
                    "delivered"
                );
            }
            Fate::Deferred(failure) => {
                ctx.metrics
                    .deferred
                    .with_label_values(&[domain, dest])
                    .inc();
                tracing::info!(
                    outcome = "deferred", message_id = %unit.message_id, sending_domain = %domain,
                    destination = %unit.domain, recipient = %rcpt, remote,
                    reply = %failure, attempt, next_attempt_at = plan.retry_at.unwrap_or(0), "deferred"
                );
            }
            Fate::Bounced {
                failure,
                hard,
                expired,
            } => {
                ctx.metrics
                    .bounced
                    .with_label_values(&[domain, dest, &failure.class()])
                    .inc();
                if *expired {
                    tracing::info!(
                        outcome = "expired", message_id = %unit.message_id, sending_domain = %domain,
                        destination = %unit.domain, recipient = %rcpt, remote,
                        reply = %failure, attempt, "gave up: maximum queue lifetime reached"
                    );
                } else {
                    tracing::info!(
                        outcome = "bounced", message_id = %unit.message_id, sending_domain = %domain,
                        destination = %unit.domain, recipient = %rcpt, remote,
                        reply = %failure, attempt, hard = *hard, "bounced"
                    );
                }
            }
        }
    }
    for event in &plan.settlement.events {
        ctx.metrics
            .events
            .with_label_values(&[event.kind.as_str()])
            .inc();
    }
    if plan.settlement.enqueue.is_empty()
        && plan
            .records
            .iter()
            .any(|r| matches!(r.fate, Fate::Bounced { .. }))
    {
        tracing::debug!(unit = %unit.id, "no DSN: null sender or the message is a DSN");
    }
}

/// Pauses before recording an outcome again while the backend is down.
const RECORD_BACKOFF: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(4),
];

/// Records `op` in the queue, trying again for a few seconds while the
/// backend is unreachable (a Redis failover, say) and the lease has time
/// left. Giving up at once would let the lease run out, and the next worker
/// would deliver the message again, or bounce it again after the DSN went
/// out. The operations are guarded by the lease token, so a retry after a
/// timeout that did apply fails harmlessly instead of applying twice.
async fn record(
    ctx: &DeliveryContext,
    lease: &Lease,
    settlement: &Settlement,
) -> Result<(), crate::queue::QueueError> {
    use crate::queue::QueueError;
    let mut pauses = RECORD_BACKOFF.iter();
    loop {
        let result = ctx.queue.settle(lease, settlement.clone()).await;
        let transient = matches!(
            result,
            Err(QueueError::Unavailable(_) | QueueError::Timeout(_))
        );
        match pauses.next() {
            Some(pause)
                if transient && now_millis().saturating_add(millis(*pause)) < lease.expires_at =>
            {
                tracing::debug!(unit = %lease.unit.id, ?pause, "queue unavailable; recording the outcome again");
                tokio::time::sleep(*pause).await;
            }
            Some(_) | None => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{DeliveryUnit, MessageFlags};

    fn lease(domain: &str, id: &str) -> Lease {
        Lease {
            unit: DeliveryUnit {
                id: id.into(),
                message_id: id.into(),
                domain: domain.into(),
                recipients: vec![format!("a@{domain}")],
                mail_from: "s@example.test".into(),
                sending_domain: "example.test".into(),
                received_at: 0,
                flags: MessageFlags::default(),
                attempts: 0,
                next_attempt_at: 0,
                last_error: None,
                delay_notified: false,
                tags: Default::default(),
                header_message_id: None,
                history: Vec::new(),
                held_ms: 0,
            },
            token: "t".into(),
            expires_at: 0,
        }
    }

    #[test]
    fn unreadable_data_is_retried_soon_only_when_the_backend_was_away() {
        use crate::queue::QueueError;
        // A Redis restart must not park a stored message for a minute.
        assert_eq!(
            data_retry_delay(&QueueError::Unavailable("reset".into())),
            DATA_RETRY_TRANSIENT
        );
        assert_eq!(
            data_retry_delay(&QueueError::Timeout(Duration::from_secs(2))),
            DATA_RETRY_TRANSIENT
        );
        assert_eq!(
            data_retry_delay(&QueueError::NotFound("m1".into())),
            DATA_RETRY
        );
    }

    #[test]
    fn leases_are_renewed_every_third_or_before_they_run_out() {
        let minute = Duration::from_secs(60);
        assert_eq!(
            renew_wait(1_060_000, 1_000_000, minute),
            Some(Duration::from_secs(20))
        );
        assert_eq!(
            renew_wait(1_010_000, 1_000_000, minute),
            Some(Duration::from_secs(5))
        );
        assert_eq!(renew_wait(1_000_000, 1_000_000, minute), None);
        assert_eq!(renew_wait(999_999, 1_000_000, minute), None);
    }

    #[test]
    fn groups_by_destination_in_lease_order() {
        let groups = group_by_destination(vec![
            lease("b.test", "1"),
            lease("a.test", "2"),
            lease("b.test", "3"),
        ]);
        let ids: Vec<(&str, Vec<&str>)> = groups
            .iter()
            .map(|(d, l)| (d.as_str(), l.iter().map(|l| l.unit.id.as_str()).collect()))
            .collect();
        assert_eq!(ids, vec![("a.test", vec!["2"]), ("b.test", vec!["1", "3"])]);
    }
}

#[cfg(test)]
mod record_tests {
    use super::*;
    use crate::metrics::RelayMetrics;
    use crate::queue::embedded::EmbeddedBackend;
    use crate::queue::memory::MemoryBackend;
    use crate::queue::{Backend, MessageFlags, NewMessage, Queue, QueueError, SharedState};
    use crate::reload::Reloading;

    fn message(id: &str, recipients: &[&str]) -> NewMessage {
        NewMessage {
            id: id.into(),
            mail_from: "s@example.test".into(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            data: b"Subject: x\r\n\r\nbody\r\n".to_vec(),
            sending_domain: "example.test".into(),
            received_at: now_millis(),
            flags: MessageFlags::default(),
            tags: Default::default(),
            header_message_id: None,
        }
    }

    #[tokio::test]
    async fn a_dropped_slot_guard_gives_the_slot_back() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let dir = tempfile::tempdir().unwrap();
            let config = petrel_crds::config::EmbeddedQueue {
                path: dir.path().join("q.redb"),
            };
            let state: Arc<dyn crate::queue::SharedState> = Arc::new(
                EmbeddedBackend::open(&config, Duration::from_secs(5))
                    .await
                    .unwrap(),
            );
            let hour = Duration::from_secs(3600);
            let token = state.acquire_slot("dest:x", 1, hour).await.unwrap();
            let guard = SlotGuard::hold(state.clone(), "dest:x", token.unwrap(), hour);
            assert!(
                state
                    .acquire_slot("dest:x", 1, hour)
                    .await
                    .unwrap()
                    .is_none()
            );
            // As when the task holding it panics or is aborted.
            drop(guard);
            loop {
                if state
                    .acquire_slot("dest:x", 1, hour)
                    .await
                    .unwrap()
                    .is_some()
                {
                    break;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the slot never came back");
    }

    #[tokio::test]
    async fn a_renewed_lease_outlives_its_expiry_until_the_renewer_is_dropped() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let dir = tempfile::tempdir().unwrap();
            let config = petrel_crds::config::EmbeddedQueue {
                path: dir.path().join("q.redb"),
            };
            let queue: Arc<dyn Queue> = Arc::new(
                EmbeddedBackend::open(&config, Duration::from_secs(5))
                    .await
                    .unwrap(),
            );
            queue
                .enqueue(
                    message("m1", &["a@renewed.test", "b@idle.test"]),
                    Vec::new(),
                )
                .await
                .unwrap();
            // Long enough that a renewal every third of it is not missed
            // on a loaded machine.
            let lease_for = Duration::from_secs(3);
            let leases = queue.lease(now_millis(), 10, lease_for).await.unwrap();
            let renewed = leases
                .iter()
                .find(|l| l.unit.domain == "renewed.test")
                .unwrap();
            let idle = leases
                .iter()
                .find(|l| l.unit.domain == "idle.test")
                .unwrap();
            let renewer = Renewer::start(&queue, renewed, lease_for);

            // Past the original expiry only the unit nobody renewed is due.
            let past = renewed.expires_at + 300;
            tokio::time::sleep(Duration::from_millis(past.saturating_sub(now_millis()))).await;
            let due = queue.lease(now_millis(), 10, lease_for).await.unwrap();
            assert_eq!(due.len(), 1);
            assert_eq!(due[0].unit.id, idle.unit.id);
            queue.complete(&due[0]).await.unwrap();

            // Dropped (the delivery ended without settling): renewal stops
            // and the unit comes back once its last renewal runs out.
            drop(renewer);
            let back = loop {
                let due = queue.lease(now_millis(), 10, lease_for).await.unwrap();
                if let Some(lease) = due.into_iter().next() {
                    break lease;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            assert_eq!(back.unit.id, renewed.unit.id);
            // The first lease was taken over, so it cannot settle any more.
            assert!(matches!(
                queue.complete(renewed).await,
                Err(QueueError::LeaseLost(_))
            ));
        })
        .await
        .expect("test timed out");
    }

    fn test_context(backend: &Arc<MemoryBackend>) -> (DeliveryContext, RelayConfig) {
        let yaml = "hostname: relay.test\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:2525\n\
                    domains: []\nqueue:\n  embedded:\n    path: /nonexistent/q.redb\n";
        let cfg = RelayConfig::from_yaml(yaml).expect("test config");
        let (_registry, metrics) = RelayMetrics::standalone();
        let ctx = DeliveryContext::new(
            Reloading::fixed(cfg.clone()),
            Backend::of(backend.clone()),
            metrics,
        )
        .unwrap();
        (ctx, cfg)
    }

    fn bounce() -> RcptOutcome {
        RcptOutcome {
            result: Err(Failure::Reply(Reply::new(
                550,
                Some([5, 1, 1]),
                "no such user",
            ))),
            remote: Some("mx.dest.test".into()),
            tls: true,
        }
    }

    fn delivered() -> RcptOutcome {
        RcptOutcome {
            result: Ok(Reply::new(250, Some([2, 0, 0]), "ok")),
            remote: Some("mx.dest.test".into()),
            tls: true,
        }
    }

    /// Issue 13 item 5: the bounce, its DSN and its suppression entry are
    /// one settlement. The backend failing at that point (twice, then
    /// back) neither re-delivers the bounced recipient nor writes its
    /// suppression, metrics or events twice.
    #[tokio::test]
    async fn a_bounce_and_its_dsn_are_settled_once_through_a_backend_failure() {
        use crate::events::{BounceType, EventType};
        tokio::time::timeout(Duration::from_secs(30), async {
            let backend = Arc::new(MemoryBackend::default());
            let (ctx, cfg) = test_context(&backend);
            backend
                .enqueue(
                    message("m1", &["gone@dest.test", "ok@dest.test"]),
                    Vec::new(),
                )
                .await
                .unwrap();
            let lease = backend
                .lease(now_millis(), 10, Duration::from_secs(60))
                .await
                .unwrap()
                .remove(0);
            backend.fail_next_settles(2);
            settle(
                &ctx,
                &cfg,
                &lease,
                b"Subject: x\r\n\r\n",
                vec![bounce(), delivered()],
            )
            .await;

            assert_eq!(backend.settle_calls(), 3, "two failures, then stored");
            // The unit is gone; the only unit left is the DSN's.
            let units = backend.units();
            assert_eq!(units.len(), 1, "{units:?}");
            assert!(units[0].flags.is_dsn);
            assert_eq!(units[0].recipients, vec!["s@example.test"]);
            assert_eq!(backend.enqueued().len(), 2, "the message and one DSN");
            assert!(
                backend
                    .suppressed("gone@dest.test", "example.test", now_millis())
                    .await
                    .unwrap()
                    .is_some()
            );
            let m = &ctx.metrics;
            assert_eq!(
                m.bounced
                    .with_label_values(&["example.test", "other", "5.1"])
                    .get(),
                1
            );
            assert_eq!(
                m.delivered
                    .with_label_values(&["example.test", "other"])
                    .get(),
                1
            );
            let events = backend.events();
            let kinds: Vec<EventType> = events.iter().map(|e| e.kind).collect();
            assert_eq!(
                kinds,
                [EventType::Bounced, EventType::Delivered, EventType::Dsn]
            );
            assert_eq!(events[0].bounce_type, Some(BounceType::Hard));
            assert_eq!(events[0].enhanced_status.as_deref(), Some("5.1.1"));
            assert_eq!(
                events[0].response.as_deref(),
                Some("550 5.1.1 no such user")
            );
            assert_eq!(events[0].remote_mta.as_deref(), Some("mx.dest.test"));
            assert_eq!(events[0].tls, Some(true));
            assert_eq!(events[0].attempt, Some(1));
            assert_eq!(
                events[2].dsn_queue_id.as_deref(),
                Some(units[0].message_id.as_str())
            );
            assert_eq!(m.events.with_label_values(&["bounced"]).get(), 1);
        })
        .await
        .expect("test timed out");
    }

    /// When the settlement cannot be stored at all, nothing of it is: no
    /// suppression, no DSN, no events, no metrics. The unit comes back
    /// after its lease (at-least-once) with both recipients.
    #[tokio::test]
    async fn an_unstored_settlement_writes_nothing() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let backend = Arc::new(MemoryBackend::default());
            let (ctx, cfg) = test_context(&backend);
            backend
                .enqueue(
                    message("m1", &["gone@dest.test", "ok@dest.test"]),
                    Vec::new(),
                )
                .await
                .unwrap();
            let lease = backend
                .lease(now_millis(), 10, Duration::from_millis(1))
                .await
                .unwrap()
                .remove(0);
            backend.fail_next_settles(100);
            settle(&ctx, &cfg, &lease, b"", vec![bounce(), delivered()]).await;
            assert!(backend.events().is_empty());
            assert_eq!(backend.enqueued().len(), 1);
            assert!(
                backend
                    .suppressed("gone@dest.test", "example.test", now_millis())
                    .await
                    .unwrap()
                    .is_none()
            );
            assert_eq!(
                ctx.metrics
                    .bounced
                    .with_label_values(&["example.test", "other", "5.1"])
                    .get(),
                0
            );
            let units = backend.units();
            assert_eq!(units[0].recipients.len(), 2);
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn a_delivery_is_recorded_through_a_short_backend_outage() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("q.redb");
            let yaml = format!(
                "hostname: relay.test\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:2525\n\
                 domains: []\nqueue:\n  embedded:\n    path: \"{}\"\n",
                path.display()
            );
            let cfg = RelayConfig::from_yaml(&yaml).expect("test config");
            let flaky = Arc::new(MemoryBackend::default());
            flaky.fail_next_settles(2);
            let (_registry, metrics) = RelayMetrics::standalone();
            let ctx = DeliveryContext::new(
                Reloading::fixed(cfg.clone()),
                Backend::of(flaky.clone()),
                metrics,
            )
            .unwrap();
            flaky
                .enqueue(message("m1", &["a@dest.test"]), Vec::new())
                .await
                .unwrap();
            let leases = flaky
                .lease(now_millis(), 10, Duration::from_secs(60))
                .await
                .unwrap();
            assert_eq!(leases.len(), 1);
            let delivered = RcptOutcome {
                result: Ok(Reply::new(250, Some([2, 0, 0]), "ok")),
                remote: None,
                tls: false,
            };
            settle(&ctx, &cfg, &leases[0], b"", vec![delivered]).await;
            // Without retries the outcome is lost, the unit stays leased
            // and is delivered again once the lease runs out.
            let stats = flaky.stats(now_millis()).await.unwrap();
            assert_eq!(stats.messages, 0, "{stats:?}");
        })
        .await
        .expect("test timed out");
    }
}
