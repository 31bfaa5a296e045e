//! One destination's leased units, delivered together: reputation holds,
//! the destination's connection slot, rate limits, the route, a pooled or
//! new connection, and one unit after another over it (each unit's lease
//! kept renewed), then the connection back to the pool.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use petrel_crds::config::{RelayConfig, Transport as TransportKind};
use tokio::sync::OwnedSemaphorePermit;

use super::classify::Fault;
use super::leases::{Renewer, SlotGuard};
use super::record::settle;
use super::retry::{policy, throttle_delay};
use super::route::{Route, connect_settings, route};
use super::scheduler::Prefetched;
use super::tls_policy::MessageTls;
use super::transport::pool::{Pool, Session};
use super::transport::{Transport, Unroutable, maildir::Maildir, smtp::Smtp};
use super::{DeliveryContext, dane, limits, millis, pacing, tls_policy};
use crate::metrics::destination_group;
use crate::queue::{Lease, Millis, Reschedule, SettleOp, Settlement, now_millis};

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

fn jitter() -> u64 {
    rand::random::<u64>() % 1000
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
        deliver_unit(ctx, cfg, &unit.domain, &route, &mut None, lease, None).await;
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

/// Takes the destination's rate (`limit` per second) for the units that
/// may go now and postpones the rest, each to its own place in the
/// destination's line ([`pacing`]), so a throttled backlog is leased once
/// per unit rather than once a second. Returns the units that may go.
async fn pace(
    ctx: &DeliveryContext,
    cfg: &RelayConfig,
    domain: &str,
    limit: u32,
    leases: Vec<Lease>,
) -> Vec<Lease> {
    let window = [limits::destination_window(domain, limit)];
    let mut ready = Vec::with_capacity(leases.len());
    let mut surplus = Vec::new();
    for lease in leases {
        // Once the window is full the rest of the group is over it too:
        // no need to count each of them.
        if !surplus.is_empty() {
            surplus.push(lease);
            continue;
        }
        match limits::take_rate(ctx.state.as_ref(), &window).await {
            Ok(None) => ready.push(lease),
            Ok(Some(_)) => surplus.push(lease),
            Err(error) => {
                tracing::warn!(%error, "rate limit check failed; delivering anyway");
                ready.push(lease);
            }
        }
    }
    if surplus.is_empty() {
        return ready;
    }
    let keep = cfg.delivery.max_queue_lifetime.get();
    match pacing::reserve(
        ctx.state.as_ref(),
        domain,
        limit,
        surplus.len(),
        keep,
        now_millis(),
    )
    .await
    {
        Ok(times) => {
            for (lease, until) in surplus.iter().zip(times) {
                postpone(ctx, cfg, lease, until).await;
            }
        }
        Err(error) => {
            tracing::warn!(%error, destination = %domain, "cannot reserve send times; handing the units back");
            for lease in &surplus {
                throttle(ctx, cfg, lease, Duration::from_secs(1), "rate limit").await;
            }
        }
    }
    ready
}

/// Postpones a unit over the destination's rate to `until`, its place in
/// the line; not an attempt. Past the maximum queue lifetime it expires
/// instead, with a DSN, as [`throttle`] does.
async fn postpone(ctx: &DeliveryContext, cfg: &RelayConfig, lease: &Lease, until: Millis) {
    let unit = &lease.unit;
    if now_millis() >= policy(cfg).expires_at(unit.lifetime_start()) {
        let route = Route::Fail(Fault::Throttled("rate limit".to_string()));
        deliver_unit(ctx, cfg, &unit.domain, &route, &mut None, lease, None).await;
        return;
    }
    let op = Settlement::only(SettleOp::Postpone { until });
    match ctx.queue.settle(lease, op).await {
        Ok(()) => {
            tracing::debug!(unit = %unit.id, destination = %unit.domain, until, "paced: postponed to its send time")
        }
        Err(error) => {
            tracing::warn!(%error, unit = %unit.id, "cannot postpone a paced unit; its lease will expire")
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
    let mut held_back = Vec::new();
    for lease in leases {
        let sending = lease.unit.sending_domain.to_ascii_lowercase();
        let held = match paused.get(&sending) {
            Some(p) => *p,
            None => {
                let p = match ctx.reputation.recently_paused(&sending, now_millis()).await {
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
        held_back.push((lease, op));
    }
    // All of them in one queue call.
    let results = ctx.queue.settle_many(&held_back).await;
    for ((lease, _), result) in held_back.iter().zip(results) {
        let sending = lease.unit.sending_domain.to_ascii_lowercase();
        match result {
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
pub(crate) async fn deliver_group(
    ctx: Arc<DeliveryContext>,
    cfg: Arc<RelayConfig>,
    domain: String,
    leases: Vec<Lease>,
    data: Prefetched,
    _permit: OwnedSemaphorePermit,
) {
    let leases = hold_paused(&ctx, leases).await;
    if leases.is_empty() {
        return;
    }
    let is_smtp = cfg.delivery.transport != TransportKind::Maildir;
    // The destination's rate first, before a slot is taken: the units over
    // it wait for their own send times and need no connection.
    let dest_rate = cfg.delivery.per_destination_rate.filter(|_| is_smtp);
    let leases = match dest_rate {
        Some(rate) => pace(&ctx, &cfg, &domain, rate, leases).await,
        None => leases,
    };
    if leases.is_empty() {
        return;
    }
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

    // The sending domains' rate limits, per unit (the destination's was
    // taken by `pace`).
    let mut ready = Vec::with_capacity(leases.len());
    for lease in leases {
        let unit = &lease.unit;
        let windows = limits::rate_windows(
            &unit.sending_domain,
            cfg.domain(&unit.sending_domain).map(|d| &d.rate_limits),
            &domain,
            None,
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

    // Mail that asks for REQUIRETLS or says `TLS-Required: No` gets
    // settings of its own and connections of its own (never pooled: a
    // pooled connection did not check what such mail needs).
    for (class, ready) in by_message_tls(ready) {
        let route = match route(&ctx, &cfg, &domain).await {
            Route::Smtp(hosts, port) => match connect_settings(&ctx, &cfg, &domain).await {
                Ok(settings) => {
                    match tls_policy::apply_message_tls(&ctx, &cfg, &domain, class, hosts, settings)
                        .await
                    {
                        // DANE after MTA-STS: per host, it wins over it.
                        Ok((hosts, settings)) => {
                            match dane::plan(&ctx, &cfg, &domain, class, &hosts).await {
                                Ok(plan) => {
                                    Route::Ready(hosts, port, Box::new(settings), Box::new(plan))
                                }
                                Err(fault) => Route::Fail(fault),
                            }
                        }
                        Err(fault) => Route::Fail(fault),
                    }
                }
                Err(fault) => Route::Fail(fault),
            },
            other => other,
        };
        let key = match &route {
            Route::Ready(_, port, settings, plan) if class == MessageTls::Default => {
                let key = Pool::key(&domain, *port, settings);
                // A connection opened under DANE is never reused under
                // another policy, nor the other way round.
                Some(if plan.any() { key + "|dane" } else { key })
            }
            Route::Ready(..) | Route::Smtp(..) | Route::Fail(_) | Route::Maildir(_) => None,
        };
        let mut session = match pooled.take() {
            Some(p) if key.is_none() => {
                // Not for this class: kept for the default one, if any.
                pooled = Some(p);
                None
            }
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
            let bytes = data.get(&lease.unit.message_id).cloned();
            deliver_unit(&ctx, &cfg, &domain, &route, &mut session, lease, bytes).await;
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
    }
    if let Some(p) = pooled {
        p.session.conn.client.quit().await;
    }

    if let Some(slot) = slot {
        slot.release().await;
    }
}

/// The leases split by what their messages ask of TLS, default first,
/// each part in lease order.
fn by_message_tls(leases: Vec<Lease>) -> BTreeMap<MessageTls, Vec<Lease>> {
    let mut parts: BTreeMap<MessageTls, Vec<Lease>> = BTreeMap::new();
    for lease in leases {
        parts
            .entry(MessageTls::of(&lease.unit.flags))
            .or_default()
            .push(lease);
    }
    parts
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

async fn deliver_unit(
    ctx: &DeliveryContext,
    cfg: &RelayConfig,
    domain: &str,
    route: &Route,
    session: &mut Option<Session>,
    lease: &Lease,
    prefetched: Option<Arc<Vec<u8>>>,
) {
    let unit = &lease.unit;
    if unit.recipients.is_empty() {
        if let Err(error) = ctx.queue.complete(lease).await {
            tracing::warn!(%error, unit = %unit.id, "cannot complete an empty unit");
        }
        return;
    }
    // Read with the lease (`Queue::lease_with_data`) unless it was left out.
    let fetched = match prefetched {
        Some(bytes) => Ok(bytes),
        None => ctx.queue.message_data(&unit.message_id).await.map(Arc::new),
    };
    let data = match fetched {
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
    let outcomes = match route {
        Route::Fail(fault) => Unroutable(fault).deliver(unit, &data).await,
        Route::Maildir(root) => Maildir { cfg, root }.deliver(unit, &data).await,
        Route::Ready(hosts, port, settings, dane) => {
            Smtp {
                ctx,
                settings,
                dane,
                hosts,
                port: *port,
                session,
                domain,
            }
            .deliver(unit, &data)
            .await
        }
        // `deliver_group` turns every Smtp route into Ready or Fail.
        Route::Smtp(..) => {
            Unroutable(&Fault::Local("no connection settings".into()))
                .deliver(unit, &data)
                .await
        }
    };
    ctx.metrics
        .attempt_duration
        .with_label_values(&[destination_group(domain)])
        .observe(started.elapsed().as_secs_f64());
    settle(ctx, cfg, lease, &data, outcomes).await;
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
