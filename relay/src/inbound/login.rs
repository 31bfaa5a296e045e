//! The AUTH verb: PLAIN and LOGIN against the users file, with failures
//! throttled per client IP across every relay pod.

use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN};
use tokio::io::{AsyncRead, AsyncWrite};

use super::auth::{self, SaslError};
use super::envelope::bounded;
use super::reply::Reject;
use super::session::{Line, Session, State};

/// Key of the shared AUTH failure counter of a client. An IPv4 client
/// (also when seen as `::ffff:a.b.c.d` on a dual-stack listener) counts by
/// its address; an IPv6 client by its /64, the smallest block a host is
/// given: counting per /128 would let a guesser pick a fresh address from
/// its own /64 for every few attempts.
pub fn throttle_key(ip: std::net::IpAddr) -> String {
    use std::net::{IpAddr, Ipv6Addr};
    match ip {
        IpAddr::V4(v4) => format!("auth-fail:{v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("auth-fail:{v4}"),
            None => {
                let net = Ipv6Addr::from(v6.to_bits() & !((1u128 << 64) - 1));
                format!("auth-fail:{net}/64")
            }
        },
    }
}

fn sasl_reject(_: SaslError) -> Reject {
    Reject::new(501, "5.5.2", "syntax", "Invalid AUTH response")
}

/// The throttle counter could not be read or written: RFC 4954's
/// temporary authentication failure, never a silent pass.
fn auth_unavailable(_: Reject) -> Reject {
    Reject::new(
        454,
        "4.7.0",
        "auth_unavailable",
        "Temporary authentication failure, try again later",
    )
}

fn blocked() -> Reject {
    Reject::new(
        421,
        "4.7.0",
        "auth_blocked",
        "Too many failed AUTH attempts from your address, try again later",
    )
    .and_disconnect()
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// AUTH mechanism [initial-response].
    pub(super) async fn auth(&mut self, mechanism: u64, initial: String) -> Result<(), Reject> {
        match self.state.state {
            State::Greeting | State::Connected => {
                return Err(Reject::bad_sequence("Send EHLO first"));
            }
            State::Mail | State::Rcpt => {
                return Err(Reject::bad_sequence(
                    "AUTH not allowed during a mail transaction",
                ));
            }
            State::Ready => {}
        }
        if self.state.user.is_some() {
            return Err(Reject::bad_sequence("Already authenticated"));
        }
        if !self.auth_offered() {
            if self.listener.auth != crate::config::AuthMode::None
                && self.state.tls.is_none()
                && !self.listener.allow_insecure_auth
            {
                return Err(Reject::new(
                    530,
                    "5.7.0",
                    "auth_needs_tls",
                    "Must issue a STARTTLS command first",
                ));
            }
            return Err(Reject::new(
                502,
                "5.5.1",
                "not_implemented",
                "AUTH not offered here",
            ));
        }
        let limits = self.config.limits.clone();
        let timeout = self.config.queue.timeout.into();
        let key = throttle_key(self.state.peer.ip());

        let (user, password) = match mechanism {
            AUTH_PLAIN => {
                let response = if initial.is_empty() {
                    self.challenge("").await?
                } else {
                    initial
                };
                auth::decode_plain(&response).map_err(sasl_reject)?
            }
            AUTH_LOGIN => {
                let user = if initial.is_empty() {
                    self.challenge(&auth::encode_b64("Username:")).await?
                } else {
                    initial
                };
                let user = auth::decode_login(&user).map_err(sasl_reject)?;
                let password = self.challenge(&auth::encode_b64("Password:")).await?;
                (user, auth::decode_login(&password).map_err(sasl_reject)?)
            }
            _ => {
                return Err(Reject::new(
                    504,
                    "5.5.4",
                    "syntax",
                    "Mechanism not supported, use PLAIN or LOGIN",
                ));
            }
        };

        // The throttle check and the password check share one turn (not
        // held while the client types: the exchange above is outside it).
        let ctx = self.ctx.clone();
        let _turn = ctx.auth_permit(timeout).await?;
        let failures = bounded(timeout, self.ctx.state.counter(&key))
            .await
            .map_err(auth_unavailable)?;
        if failures >= u64::from(limits.max_auth_failures) {
            return Err(blocked());
        }
        let users = self.ctx.users.as_ref().map(|u| u.get());
        let check_user = user.clone();
        let ok = tokio::task::spawn_blocking(move || {
            users.is_some_and(|u| auth::verify(&u, &check_user, &password))
        })
        .await
        .unwrap_or(false);
        if ok {
            tracing::info!(peer = %self.state.peer, %user, "authenticated");
            self.state.user = Some(user);
            self.queue_reply(235, "2.7.0", "Authentication successful");
            return Ok(());
        }
        self.ctx
            .metrics
            .auth_failures
            .with_label_values(&[&self.listener.name])
            .inc();
        // Debug-escaped: a failed user name is the client's text and must
        // not forge log lines.
        tracing::warn!(peer = %self.state.peer, user = ?user, "AUTH failed");
        let window = limits.auth_block_for.into();
        let total = bounded(timeout, self.ctx.state.incr_counter(&key, 1, window))
            .await
            .map_err(auth_unavailable)?;
        if total >= u64::from(limits.max_auth_failures) {
            return Err(blocked());
        }
        Err(Reject::new(
            535,
            "5.7.8",
            "auth_failed",
            "Authentication credentials invalid",
        ))
    }

    /// Sends `334 text` and reads the client's answer; `*` cancels.
    async fn challenge(&mut self, text: &str) -> Result<String, Reject> {
        self.wbuf
            .extend_from_slice(format!("334 {text}\r\n").as_bytes());
        let line = match self.read_line(self.command_timeout(), false).await {
            Ok(Line::Ok(line)) => line,
            Ok(Line::TooLong) => {
                return Err(Reject::new(500, "5.5.6", "line_too_long", "Line too long"));
            }
            Ok(Line::Shutdown) => return Err(Reject::shutting_down()),
            Err(_) => {
                return Err(
                    Reject::new(421, "4.4.2", "timeout", "Timeout, closing").and_disconnect()
                );
            }
        };
        let text = String::from_utf8(line).map_err(|_| sasl_reject(SaslError::Utf8))?;
        let text = text.trim_end_matches(['\r', '\n']).to_string();
        if text == "*" {
            return Err(Reject::new(
                501,
                "5.0.0",
                "auth_cancelled",
                "Authentication cancelled",
            ));
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_keys_group_ipv6_by_64_and_unmap_ipv4() {
        let table = [
            ("192.0.2.9", "auth-fail:192.0.2.9"),
            ("::ffff:192.0.2.9", "auth-fail:192.0.2.9"),
            ("2001:db8:1:2::1", "auth-fail:2001:db8:1:2::/64"),
            (
                "2001:db8:1:2:ffff:ffff:ffff:ffff",
                "auth-fail:2001:db8:1:2::/64",
            ),
            ("2001:db8:1:3::1", "auth-fail:2001:db8:1:3::/64"),
            ("::1", "auth-fail:::/64"),
        ];
        for (ip, want) in table {
            assert_eq!(throttle_key(ip.parse().unwrap()), want, "{ip}");
        }
    }
}
