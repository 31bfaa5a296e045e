//! The AUTH verb: PLAIN and LOGIN against the users file, with failures
//! throttled per client IP across every relay pod.

use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN};
use tokio::io::{AsyncRead, AsyncWrite};

use super::auth::{self, SaslError};
use super::session::{Line, Session, State};
use crate::refusal::Refusal;

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

fn sasl_reject(_: SaslError) -> Refusal {
    Refusal::InvalidAuthResponse
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// AUTH mechanism [initial-response].
    pub(super) async fn auth(&mut self, mechanism: u64, initial: String) -> Result<(), Refusal> {
        match self.state.state {
            State::Greeting | State::Connected => {
                return Err(Refusal::BadSequence("Send EHLO first"));
            }
            State::Mail | State::Rcpt => {
                return Err(Refusal::BadSequence(
                    "AUTH not allowed during a mail transaction",
                ));
            }
            State::Ready => {}
        }
        if self.state.user.is_some() {
            return Err(Refusal::BadSequence("Already authenticated"));
        }
        if !self.auth_offered() {
            if self.listener.auth != crate::config::AuthMode::None
                && self.state.tls.is_none()
                && !self.listener.allow_insecure_auth
            {
                return Err(Refusal::AuthNeedsTls);
            }
            return Err(Refusal::NotImplemented("AUTH not offered here"));
        }

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
                return Err(Refusal::MechanismNotSupported);
            }
        };

        super::credentials::check(
            &self.ctx,
            self.state.peer.ip(),
            &user,
            password,
            &self.listener.name,
        )
        .await?;
        tracing::info!(peer = %self.state.peer, %user, "authenticated");
        self.state.user = Some(user);
        self.queue_reply(235, "2.7.0", "Authentication successful");
        Ok(())
    }

    /// Sends `334 text` and reads the client's answer; `*` cancels.
    async fn challenge(&mut self, text: &str) -> Result<String, Refusal> {
        self.wbuf
            .extend_from_slice(format!("334 {text}\r\n").as_bytes());
        let line = match self.read_line(self.command_timeout(), false).await {
            Ok(Line::Ok(line)) => line,
            Ok(Line::TooLong) => {
                return Err(Refusal::LineTooLong);
            }
            Ok(Line::Shutdown) => return Err(Refusal::ShuttingDown),
            Err(_) => {
                return Err(Refusal::Timeout("Timeout, closing"));
            }
        };
        let text = String::from_utf8(line).map_err(|_| sasl_reject(SaslError::Utf8))?;
        let text = text.trim_end_matches(['\r', '\n']).to_string();
        if text == "*" {
            return Err(Refusal::AuthCancelled);
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
