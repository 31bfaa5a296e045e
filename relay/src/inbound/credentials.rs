//! The one AUTH credential check, shared by SMTP AUTH and the HTTP send
//! API's Basic credentials: same users file, same per-client failure
//! throttle across every relay pod, same bound on concurrent password
//! checks.

use std::net::IpAddr;

use super::InboundContext;
use super::auth;
use super::envelope::bounded;
use super::login::throttle_key;
use crate::refusal::Refusal;

/// Checks `user`/`password` for the client at `ip`. `channel` labels
/// `petrel_auth_failures_total` (the listener name, or `http`).
///
/// The throttle check and the password check share one turn of
/// [`InboundContext::auth_permit`], so concurrent guesses from one client
/// cannot all pass the throttle before any failure is counted. A counter
/// that cannot be read or written is RFC 4954's temporary failure, never
/// a silent pass.
pub async fn check(
    ctx: &InboundContext,
    ip: IpAddr,
    user: &str,
    password: String,
    channel: &str,
) -> Result<(), Refusal> {
    let config = ctx.config.get();
    let limits = &config.limits;
    let timeout = config.queue.timeout.into();
    let key = throttle_key(ip);
    let _turn = ctx.auth_permit(timeout).await?;
    let failures = bounded(timeout, ctx.state.counter(&key))
        .await
        .map_err(|_| Refusal::AuthUnavailable)?;
    if failures >= u64::from(limits.max_auth_failures) {
        return Err(Refusal::AuthBlocked);
    }
    let users = ctx.users.as_ref().map(|u| u.get());
    let check_user = user.to_string();
    let ok = tokio::task::spawn_blocking(move || {
        users.is_some_and(|u| auth::verify(&u, &check_user, &password))
    })
    .await
    .unwrap_or(false);
    if ok {
        return Ok(());
    }
    ctx.metrics
        .auth_failures
        .with_label_values(&[channel])
        .inc();
    // Debug-escaped: a failed user name is the client's text and must
    // not forge log lines.
    tracing::warn!(peer = %ip, user = ?user, %channel, "AUTH failed");
    let window = limits.auth_block_for.into();
    let total = bounded(timeout, ctx.state.incr_counter(&key, 1, window))
        .await
        .map_err(|_| Refusal::AuthUnavailable)?;
    if total >= u64::from(limits.max_auth_failures) {
        return Err(Refusal::AuthBlocked);
    }
    Err(Refusal::AuthFailed)
}
