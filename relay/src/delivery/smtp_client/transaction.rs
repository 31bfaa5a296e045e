//! The transaction state machine of the outbound SMTP client: greeting,
//! EHLO (HELO fallback), AUTH, MAIL/RCPT/DATA with or without PIPELINING,
//! MAIL/RCPT/BDAT in one write when the server offers PIPELINING and
//! CHUNKING, RSET between transactions, QUIT; and what each recipient's
//! replies mean for it.

use std::time::Duration;

use base64::Engine;
use smtp_proto::EhloResponse;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::wire::{SmtpClient, address, dot_stuff, parse_reply};
use crate::delivery::classify::{Failure, Fault, Reply, Severity};

/// What the server announced in its EHLO reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// SIZE; `Some(0)` means no stated limit.
    pub size: Option<usize>,
    /// 8BITMIME (RFC 6152).
    pub eight_bit: bool,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// STARTTLS (RFC 3207).
    pub starttls: bool,
    /// AUTH PLAIN.
    pub auth_plain: bool,
    /// AUTH LOGIN.
    pub auth_login: bool,
    /// REQUIRETLS (RFC 8689).
    pub require_tls: bool,
    /// CHUNKING (RFC 3030): BDAT.
    pub chunking: bool,
}

impl Capabilities {
    pub(super) fn from_ehlo(ehlo: &EhloResponse<String>) -> Capabilities {
        Capabilities {
            pipelining: ehlo.has_capability(smtp_proto::EXT_PIPELINING),
            size: ehlo
                .has_capability(smtp_proto::EXT_SIZE)
                .then_some(ehlo.size),
            eight_bit: ehlo.has_capability(smtp_proto::EXT_8BIT_MIME),
            smtputf8: ehlo.has_capability(smtp_proto::EXT_SMTP_UTF8),
            starttls: ehlo.has_capability(smtp_proto::EXT_START_TLS),
            require_tls: ehlo.has_capability(smtp_proto::EXT_REQUIRE_TLS),
            chunking: ehlo.has_capability(smtp_proto::EXT_CHUNKING),
            auth_plain: ehlo.auth_mechanisms & smtp_proto::AUTH_PLAIN != 0,
            auth_login: ehlo.auth_mechanisms & smtp_proto::AUTH_LOGIN != 0,
        }
    }
}

/// The envelope of one transaction.
#[derive(Clone, Copy, Debug)]
pub struct Envelope<'a> {
    /// MAIL FROM (empty for `<>`).
    pub mail_from: &'a str,
    /// RCPT TO, in order.
    pub recipients: &'a [String],
    /// Declared BODY=8BITMIME.
    pub eight_bit: bool,
    /// Needs SMTPUTF8.
    pub smtputf8: bool,
    /// Sent with REQUIRETLS: `REQUIRETLS` goes on MAIL FROM (the
    /// connection checked that the server offers it).
    pub require_tls: bool,
}

/// Result for one recipient: the accepting reply, or why it failed.
pub type RcptResult = Result<Reply, Failure>;

/// Results of one transaction, one per recipient in envelope order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// Per recipient.
    pub results: Vec<RcptResult>,
    /// The failure was about the server, not the recipients (connection
    /// lost, 421, MAIL FROM refused temporarily): recipients that failed
    /// temporarily are worth trying at the next MX. The connection must not
    /// be reused when `connection_lost`.
    pub host_failure: bool,
    /// The connection is gone or in an unknown state.
    pub connection_lost: bool,
    /// The transaction is over at the server too (its end of data was
    /// answered, MAIL was refused, or nothing was sent): the next MAIL may
    /// follow at once, without an RSET round trip first.
    pub ended: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> SmtpClient<S> {
    /// Reads the greeting.
    pub async fn greeting(&mut self) -> Result<Reply, Fault> {
        self.read_reply(self.timeouts.greeting, "greeting").await
    }

    /// EHLO, falling back to HELO when EHLO is refused. `Ok(Err(reply))`
    /// when both are refused.
    pub async fn ehlo(&mut self, hostname: &str) -> Result<Result<Capabilities, Reply>, Fault> {
        self.write(format!("EHLO {hostname}\r\n").as_bytes(), "EHLO")
            .await?;
        let raw = self.read_raw(self.timeouts.command, "EHLO").await?;
        let reply = parse_reply(&raw)?;
        if reply.severity() == Severity::Positive {
            let caps = match EhloResponse::parse(&mut raw.iter()) {
                Ok(ehlo) => Capabilities::from_ehlo(&ehlo),
                // A server whose extension list smtp-proto cannot read is
                // treated as offering none: still a working server.
                Err(_) => Capabilities::default(),
            };
            self.caps = caps;
            return Ok(Ok(caps));
        }
        let helo = self.command(&format!("HELO {hostname}"), "HELO").await?;
        if helo.severity() == Severity::Positive {
            self.caps = Capabilities::default();
            Ok(Ok(self.caps))
        } else {
            Ok(Err(reply))
        }
    }

    /// AUTH PLAIN or LOGIN (whichever is offered, PLAIN first).
    pub async fn auth(&mut self, user: &str, password: &str) -> Result<Result<(), Reply>, Fault> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let reply = if self.caps.auth_plain || !self.caps.auth_login {
            let token = b64.encode(format!("\0{user}\0{password}"));
            self.command(&format!("AUTH PLAIN {token}"), "AUTH").await?
        } else {
            let r = self.command("AUTH LOGIN", "AUTH").await?;
            if r.code != 334 {
                return Ok(Err(r));
            }
            let r = self.command(&b64.encode(user), "AUTH").await?;
            if r.code != 334 {
                return Ok(Err(r));
            }
            self.command(&b64.encode(password), "AUTH").await?
        };
        if reply.severity() == Severity::Positive {
            Ok(Ok(()))
        } else {
            Ok(Err(reply))
        }
    }

    /// Starts the next transaction with RSET: a session taken from the
    /// idle pool, whose server may have dropped it meanwhile. With
    /// PIPELINING the RSET goes in the transaction's first write (RFC 2920
    /// allows it anywhere in a group), so the check costs no round trip.
    pub fn reset_before_next(&mut self) {
        self.reset_due = true;
    }

    /// QUIT, best effort.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.write(b"QUIT\r\n", "QUIT").await;
            let _ = self.read_reply(Duration::from_secs(5), "QUIT").await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }

    fn mail_command(&self, env: &Envelope<'_>, size: usize) -> String {
        let mut line = format!("MAIL FROM:<{}>", address(env.mail_from));
        if self.caps.size.is_some() {
            line.push_str(&format!(" SIZE={size}"));
        }
        // Without 8BITMIME the body goes as it is: nearly every server
        // accepts 8-bit text, and downgrading would break DKIM signatures.
        if env.eight_bit && self.caps.eight_bit {
            line.push_str(" BODY=8BITMIME");
        }
        if env.smtputf8 && self.caps.smtputf8 {
            line.push_str(" SMTPUTF8");
        }
        if env.require_tls {
            line.push_str(" REQUIRETLS");
        }
        line
    }

    /// One mail transaction: MAIL, RCPT for each recipient, DATA, with
    /// PIPELINING when offered, after an RSET when one is due (the last
    /// transaction was left open, or [`reset_before_next`](Self::reset_before_next)).
    /// Faults before any result become temporary failures of every
    /// recipient with `connection_lost` set.
    pub async fn send(&mut self, env: &Envelope<'_>, data: &[u8]) -> Transaction {
        let n = env.recipients.len();
        let all = |f: Failure| vec![Err(f); n];
        if env.smtputf8 && !self.caps.smtputf8 {
            return Transaction {
                results: all(Failure::Fault(Fault::Unsendable {
                    status: "5.6.7",
                    reason: "the message needs SMTPUTF8 and the server does not offer it".into(),
                })),
                host_failure: false,
                connection_lost: false,
                ended: true,
            };
        }
        if let Some(limit) = self.caps.size
            && limit > 0
            && data.len() > limit
        {
            return Transaction {
                results: all(Failure::Fault(Fault::Unsendable {
                    status: "5.3.4",
                    reason: format!(
                        "message of {} bytes exceeds the server's limit of {limit}",
                        data.len()
                    ),
                })),
                host_failure: false,
                connection_lost: false,
                ended: true,
            };
        }
        let reset = std::mem::take(&mut self.reset_due);
        let t = match self.send_inner(env, data, reset).await {
            Ok(t) => t,
            Err((fault, partial)) => {
                let mut results = partial;
                results.resize(n, Err(Failure::Fault(fault.clone())));
                // Recipients refused for good before the fault keep their
                // answers; everything else is retried.
                let results = results
                    .into_iter()
                    .map(|r| match r {
                        Err(Failure::Reply(reply)) if reply.severity() == Severity::Permanent => {
                            Err(Failure::Reply(reply))
                        }
                        _ => Err(Failure::Fault(fault.clone())),
                    })
                    .collect();
                Transaction {
                    results,
                    host_failure: true,
                    connection_lost: true,
                    ended: false,
                }
            }
        };
        self.reset_due = !t.ended;
        t
    }

    async fn send_inner(
        &mut self,
        env: &Envelope<'_>,
        data: &[u8],
        reset: bool,
    ) -> Result<Transaction, (Fault, Vec<RcptResult>)> {
        let n = env.recipients.len();
        let pipelining = self.caps.pipelining;
        if reset && !pipelining {
            let reply = self
                .command("RSET", "RSET")
                .await
                .map_err(|f| (f, vec![]))?;
            if reply.severity() != Severity::Positive {
                return Ok(Transaction {
                    results: vec![Err(Failure::Fault(refused_reset(&reply))); n],
                    host_failure: true,
                    connection_lost: reply.code == 421,
                    ended: false,
                });
            }
        }
        let reset = reset && pipelining;
        let mail = self.mail_command(env, data.len());
        let rcpts: Vec<String> = env
            .recipients
            .iter()
            .map(|r| format!("RCPT TO:<{}>", address(r)))
            .collect();
        let mut reset_reply = None;
        let t = if pipelining && self.caps.chunking {
            self.send_chunked(reset, &mut reset_reply, &mail, &rcpts, data)
                .await?
        } else {
            self.send_data(reset, &mut reset_reply, &mail, &rcpts, data)
                .await?
        };
        Ok(match reset_reply {
            Some(reply) if reply.severity() != Severity::Positive => after_refused_reset(t, &reply),
            _ => t,
        })
    }

    /// MAIL, RCPT and DATA, pipelined when offered, then the dot-stuffed
    /// body; with `reset` (pipelining only) an RSET first, whose reply
    /// lands in `reset_reply`.
    async fn send_data(
        &mut self,
        reset: bool,
        reset_reply: &mut Option<Reply>,
        mail: &str,
        rcpts: &[String],
        data: &[u8],
    ) -> Result<Transaction, (Fault, Vec<RcptResult>)> {
        let n = rcpts.len();
        let cmd = self.timeouts.command;
        let pipelining = self.caps.pipelining;
        let mail_reply;
        let mut rcpt_replies: Vec<Reply> = Vec::with_capacity(n);
        let mut data_reply: Option<Reply> = None;
        if pipelining {
            let mut batch = String::new();
            if reset {
                batch.push_str("RSET\r\n");
            }
            batch.push_str(mail);
            batch.push_str("\r\n");
            for r in rcpts {
                batch.push_str(r);
                batch.push_str("\r\n");
            }
            batch.push_str("DATA\r\n");
            self.write(batch.as_bytes(), "MAIL")
                .await
                .map_err(|f| (f, vec![]))?;
            if reset {
                *reset_reply = Some(
                    self.read_reply(cmd, "RSET")
                        .await
                        .map_err(|f| (f, vec![]))?,
                );
            }
            mail_reply = self
                .read_reply(cmd, "MAIL")
                .await
                .map_err(|f| (f, vec![]))?;
            for _ in 0..n {
                match self.read_reply(cmd, "RCPT").await {
                    Ok(r) => rcpt_replies.push(r),
                    Err(f) => return Err((f, rcpt_errors(&mail_reply, &rcpt_replies))),
                }
            }
            data_reply = Some(
                self.read_reply(cmd, "DATA")
                    .await
                    .map_err(|f| (f, rcpt_errors(&mail_reply, &rcpt_replies)))?,
            );
        } else {
            mail_reply = self.command(mail, "MAIL").await.map_err(|f| (f, vec![]))?;
            if mail_reply.severity() == Severity::Positive {
                for r in rcpts {
                    match self.command(r, "RCPT").await {
                        Ok(reply) => rcpt_replies.push(reply),
                        Err(f) => return Err((f, rcpt_errors(&mail_reply, &rcpt_replies))),
                    }
                }
            }
        }

        // MAIL refused: every recipient shares that answer.
        if mail_reply.severity() != Severity::Positive {
            if let Some(d) = &data_reply
                && d.code == 354
            {
                // A confused server accepted DATA anyway: end it empty.
                self.write(b".\r\n", "DATA")
                    .await
                    .map_err(|f| (f, vec![]))?;
                let _ = self.read_reply(self.timeouts.data, "end of DATA").await;
            }
            let host_failure =
                mail_reply.severity() != Severity::Permanent || mail_reply.code == 421;
            return Ok(Transaction {
                results: vec![Err(Failure::Session(mail_reply.clone())); n],
                host_failure,
                connection_lost: mail_reply.code == 421,
                ended: true,
            });
        }

        let accepted = rcpt_replies
            .iter()
            .filter(|r| r.severity() == Severity::Positive)
            .count();
        let lost_421 = rcpt_replies.iter().any(|r| r.code == 421);

        if !pipelining && accepted > 0 {
            data_reply = Some(
                self.command("DATA", "DATA")
                    .await
                    .map_err(|f| (f, rcpt_errors(&mail_reply, &rcpt_replies)))?,
            );
        }

        // Open until the end of data is answered: a refused DATA (or none
        // sent, every recipient refused) leaves MAIL in effect at the server.
        let mut ended = false;
        let final_reply = match data_reply {
            Some(d) if d.code == 354 => {
                if accepted == 0 {
                    // RFC 2920 3.1: DATA accepted with no recipient; send
                    // an empty message and ignore the outcome.
                    self.write(b".\r\n", "DATA")
                        .await
                        .map_err(|f| (f, vec![]))?;
                    ended = self
                        .read_reply(self.timeouts.data, "end of DATA")
                        .await
                        .is_ok();
                    None
                } else {
                    self.write_parts(&dot_stuff(data), "DATA")
                        .await
                        .map_err(|f| (f, rcpt_errors(&mail_reply, &rcpt_replies)))?;
                    let reply = self
                        .read_reply(self.timeouts.data, "end of DATA")
                        .await
                        .map_err(|f| (f, rcpt_errors(&mail_reply, &rcpt_replies)))?;
                    ended = true;
                    Some(reply)
                }
            }
            // DATA must be answered 354 or refused: a 2xx means the body
            // was never sent, so it cannot count as a delivery.
            Some(d) if d.severity() == Severity::Positive => {
                return Err((
                    Fault::Protocol(format!("DATA answered {d} instead of 354")),
                    rcpt_errors(&mail_reply, &rcpt_replies),
                ));
            }
            Some(d) => Some(d),
            None => None,
        };

        let results = rcpt_replies
            .into_iter()
            .map(|r| {
                if r.severity() != Severity::Positive {
                    return Err(Failure::Reply(r));
                }
                match &final_reply {
                    Some(f) if f.severity() == Severity::Positive => Ok(f.clone()),
                    Some(f) => Err(Failure::Session(f.clone())),
                    None => Err(Failure::Fault(Fault::Protocol("no reply to DATA".into()))),
                }
            })
            .collect();
        let lost = lost_421 || final_reply.as_ref().is_some_and(|r| r.code == 421);
        Ok(Transaction {
            results,
            host_failure: lost,
            connection_lost: lost,
            ended,
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> SmtpClient<S> {
    /// MAIL, RCPT and `BDAT n LAST` with the whole message, in one write
    /// (RFC 3030 with RFC 2920): one round trip per message instead of
    /// two, and no dot-stuffing. A server that offers both must read and
    /// answer the BDAT even when MAIL or every RCPT failed (RFC 3030 4.2).
    async fn send_chunked(
        &mut self,
        reset: bool,
        reset_reply: &mut Option<Reply>,
        mail: &str,
        rcpts: &[String],
        data: &[u8],
    ) -> Result<Transaction, (Fault, Vec<RcptResult>)> {
        let n = rcpts.len();
        let body = chunk_body(data);
        let mut batch = Vec::with_capacity(mail.len() + 64 * (n + 2) + body.len());
        if reset {
            batch.extend_from_slice(b"RSET\r\n");
        }
        batch.extend_from_slice(mail.as_bytes());
        batch.extend_from_slice(b"\r\n");
        for r in rcpts {
            batch.extend_from_slice(r.as_bytes());
            batch.extend_from_slice(b"\r\n");
        }
        batch.extend_from_slice(format!("BDAT {} LAST\r\n", body.len()).as_bytes());
        batch.extend_from_slice(&body);
        self.write(&batch, "MAIL").await.map_err(|f| (f, vec![]))?;

        let cmd = self.timeouts.command;
        if reset {
            *reset_reply = Some(
                self.read_reply(cmd, "RSET")
                    .await
                    .map_err(|f| (f, vec![]))?,
            );
        }
        let mail_reply = self
            .read_reply(cmd, "MAIL")
            .await
            .map_err(|f| (f, vec![]))?;
        let mut rcpt_replies: Vec<Reply> = Vec::with_capacity(n);
        for _ in 0..n {
            match self.read_reply(cmd, "RCPT").await {
                Ok(r) => rcpt_replies.push(r),
                Err(f) => return Err((f, rcpt_errors(&mail_reply, &rcpt_replies))),
            }
        }
        let bdat_reply = self
            .read_reply(self.timeouts.data, "BDAT")
            .await
            .map_err(|f| (f, rcpt_errors(&mail_reply, &rcpt_replies)))?;
        // Only an accepted BDAT LAST is known to end the transaction; after
        // a refused one the caller resets before the next MAIL.
        let ended = bdat_reply.severity() == Severity::Positive;

        if mail_reply.severity() != Severity::Positive {
            let host_failure =
                mail_reply.severity() != Severity::Permanent || mail_reply.code == 421;
            let lost = mail_reply.code == 421 || bdat_reply.code == 421;
            return Ok(Transaction {
                results: vec![Err(Failure::Session(mail_reply)); n],
                host_failure: host_failure || lost,
                connection_lost: lost,
                ended: ended && !lost,
            });
        }
        let lost = rcpt_replies
            .iter()
            .chain(std::iter::once(&bdat_reply))
            .any(|r| r.code == 421);
        let results = rcpt_replies
            .into_iter()
            .map(|r| {
                if r.severity() != Severity::Positive {
                    Err(Failure::Reply(r))
                } else if bdat_reply.severity() == Severity::Positive {
                    Ok(bdat_reply.clone())
                } else {
                    Err(Failure::Session(bdat_reply.clone()))
                }
            })
            .collect();
        Ok(Transaction {
            results,
            host_failure: lost,
            connection_lost: lost,
            ended: ended && !lost,
        })
    }
}

/// Why recipients are retried when the RSET before their transaction was
/// refused.
fn refused_reset(reply: &Reply) -> Fault {
    Fault::Protocol(format!("RSET answered {reply}"))
}

/// A pipelined transaction after a refused RSET: the server may still
/// hold the state the RSET was to clear, so its refusals are not trusted
/// as final (a stale transaction's `503` must not bounce mail); what it
/// accepted stands. The session is not used again.
fn after_refused_reset(t: Transaction, reply: &Reply) -> Transaction {
    let results = t
        .results
        .into_iter()
        .map(|r| r.map_err(|_| Failure::Fault(refused_reset(reply))))
        .collect();
    Transaction {
        results,
        host_failure: true,
        connection_lost: t.connection_lost || reply.code == 421,
        ended: false,
    }
}

/// The message as BDAT sends it: as stored, ending with CRLF like the
/// DATA path makes it, so both put the same bytes in the mailbox.
fn chunk_body(data: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if data.is_empty() || data.ends_with(b"\r\n") {
        return std::borrow::Cow::Borrowed(data);
    }
    let mut out = data.to_vec();
    if out.ends_with(b"\n") {
        out.pop();
    }
    if !out.ends_with(b"\r") {
        out.push(b'\r');
    }
    out.push(b'\n');
    std::borrow::Cow::Owned(out)
}

/// Results known so far when a fault interrupts the RCPT phase.
fn rcpt_errors(mail: &Reply, rcpts: &[Reply]) -> Vec<RcptResult> {
    if mail.severity() != Severity::Positive {
        return Vec::new();
    }
    rcpts
        .iter()
        .map(|r| match r.severity() {
            Severity::Permanent => Err(Failure::Reply(r.clone())),
            Severity::Positive
            | Severity::Intermediate
            | Severity::Transient
            | Severity::Invalid => Err(Failure::Fault(Fault::Io("interrupted".into()))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::wire::Timeouts;
    use super::*;
    use crate::delivery::classify::Outcome;
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream};

    fn timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(5),
            greeting: Duration::from_secs(5),
            command: Duration::from_secs(5),
            data: Duration::from_secs(5),
        }
    }

    /// A scripted server on the other end of a duplex: answers each line
    /// with the next scripted reply, records what it received.
    /// The plain envelope the tests send: from `s@a.test` to `rcpts`.
    fn envelope(rcpts: &[String]) -> Envelope<'_> {
        Envelope {
            mail_from: "s@a.test",
            recipients: rcpts,
            eight_bit: false,
            smtputf8: false,
            require_tls: false,
        }
    }

    /// A client on `io`, past the greeting and EHLO.
    async fn ready_client(io: DuplexStream) -> SmtpClient<DuplexStream> {
        let mut c = SmtpClient::new(io, timeouts());
        c.greeting().await.unwrap();
        c.ehlo("relay.test").await.unwrap().unwrap();
        c
    }

    async fn server(io: DuplexStream, script: Vec<(&'static str, &'static str)>) -> Vec<String> {
        let (r, mut w) = tokio::io::split(io);
        let mut r = BufReader::new(r);
        let mut seen = Vec::new();
        w.write_all(b"220 hi\r\n").await.unwrap();
        let mut in_data = false;
        let mut script = script.into_iter();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap() == 0 {
                return seen;
            }
            if in_data {
                if line == ".\r\n" {
                    in_data = false;
                    seen.push("<data end>".into());
                } else {
                    seen.push(format!("data:{}", line.trim_end()));
                    continue;
                }
            } else {
                seen.push(line.trim_end().to_string());
            }
            let Some((expect, reply)) = script.next() else {
                return seen;
            };
            assert!(
                seen.last().unwrap().starts_with(expect),
                "{seen:?} vs {expect}"
            );
            if expect == "DATA" && reply.starts_with("354") {
                in_data = true;
            }
            w.write_all(reply.as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn per_recipient_results_without_pipelining() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(server(
            b,
            vec![
                ("EHLO", "250-mx\r\n250-8BITMIME\r\n250 SIZE 1000\r\n"),
                ("MAIL FROM:<s@a.test> SIZE=", "250 ok\r\n"),
                ("RCPT TO:<x@b.test>", "250 ok\r\n"),
                ("RCPT TO:<y@b.test>", "550 5.1.1 no such user\r\n"),
                ("RCPT TO:<z@b.test>", "451 4.3.0 try later\r\n"),
                ("DATA", "354 go\r\n"),
                ("<data end>", "250 2.0.0 queued\r\n"),
                ("RSET", "250 ok\r\n"),
            ],
        ));
        let mut c = SmtpClient::new(a, timeouts());
        assert_eq!(c.greeting().await.unwrap().code, 220);
        let caps = c.ehlo("relay.test").await.unwrap().unwrap();
        assert!(caps.eight_bit && !caps.pipelining && caps.size == Some(1000));
        let rcpts = vec!["x@b.test".to_string(), "y@b.test".into(), "z@b.test".into()];
        let env = Envelope {
            mail_from: "s@a.test",
            recipients: &rcpts,
            eight_bit: true,
            smtputf8: false,
            require_tls: false,
        };
        let t = c.send(&env, b"Subject: x\r\n\r\n.dot\r\n").await;
        assert!(!t.host_failure && !t.connection_lost && t.ended);
        assert_eq!(t.results[0].as_ref().unwrap().code, 250);
        assert_eq!(
            t.results[1].as_ref().unwrap_err().reply().unwrap().code,
            550
        );
        assert_eq!(
            t.results[2].as_ref().unwrap_err().reply().unwrap().code,
            451
        );
        let reset = c.command("RSET", "RSET").await.unwrap();
        assert_eq!(reset.severity(), Severity::Positive);
        drop(c);
        let seen = srv.await.unwrap();
        assert!(
            seen.contains(&"MAIL FROM:<s@a.test> SIZE=20 BODY=8BITMIME".to_string()),
            "{seen:?}"
        );
        assert!(seen.contains(&"data:..dot".to_string()), "{seen:?}");
    }

    /// Messages back to back over one pipelining connection: after a
    /// transaction whose end of data was answered the next MAIL follows at
    /// once; one left open (every recipient refused, DATA refused) is not
    /// `ended`, so the next transaction resets it first. The script checks
    /// the order.
    #[tokio::test]
    async fn only_a_transaction_left_open_needs_a_reset() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(server(
            b,
            vec![
                ("EHLO", "250-mx\r\n250 PIPELINING\r\n"),
                ("MAIL FROM:<s@a.test>", "250 ok\r\n"),
                ("RCPT TO:<x@b.test>", "550 5.1.1 no such user\r\n"),
                ("DATA", "554 5.5.1 no valid recipients\r\n"),
                ("RSET", "250 ok\r\n"),
                ("MAIL FROM:<s@a.test>", "250 ok\r\n"),
                ("RCPT TO:<x@b.test>", "250 ok\r\n"),
                ("DATA", "354 go\r\n"),
                ("<data end>", "250 2.0.0 queued\r\n"),
                ("MAIL FROM:<s@a.test>", "250 ok\r\n"),
                ("RCPT TO:<x@b.test>", "250 ok\r\n"),
                ("DATA", "354 go\r\n"),
                ("<data end>", "451 4.3.0 try later\r\n"),
            ],
        ));
        let mut c = SmtpClient::new(a, timeouts());
        c.greeting().await.unwrap();
        assert!(c.ehlo("relay.test").await.unwrap().unwrap().pipelining);
        let rcpts = vec!["x@b.test".to_string()];
        let env = envelope(&rcpts);
        let mut ended = Vec::new();
        for _ in 0..3 {
            let t = c.send(&env, b"x\r\n").await;
            assert!(!t.connection_lost, "{t:?}");
            ended.push(t.ended);
        }
        assert_eq!(ended, vec![false, true, true]);
        drop(c);
        let seen = srv.await.unwrap();
        assert_eq!(seen.iter().filter(|l| *l == "RSET").count(), 1, "{seen:?}");
    }

    #[tokio::test]
    async fn a_refused_sender_is_not_a_bad_recipient() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(server(
            b,
            vec![
                ("EHLO", "250 mx\r\n"),
                ("MAIL FROM:<s@a.test>", "550 sender rejected\r\n"),
            ],
        ));
        let mut c = ready_client(a).await;
        let rcpts = vec!["x@b.test".to_string(), "y@b.test".into()];
        let env = envelope(&rcpts);
        let t = c.send(&env, b"x\r\n").await;
        // MAIL refused: no transaction is left open at the server.
        assert!(t.ended);
        drop(c);
        srv.await.unwrap();
        for r in &t.results {
            let failure = r.as_ref().unwrap_err();
            assert_eq!(
                failure.outcome(),
                crate::delivery::classify::Outcome::Permanent
            );
            assert!(
                !crate::delivery::classify::is_hard_bounce(failure),
                "a MAIL FROM refusal must not suppress recipients: {failure:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_2xx_reply_to_data_is_not_a_delivery() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(server(
            b,
            vec![
                ("EHLO", "250 mx\r\n"),
                ("MAIL FROM:<s@a.test>", "250 ok\r\n"),
                ("RCPT TO:<x@b.test>", "250 ok\r\n"),
                ("DATA", "250 ok\r\n"),
            ],
        ));
        let mut c = ready_client(a).await;
        let rcpts = vec!["x@b.test".to_string()];
        let env = envelope(&rcpts);
        let t = c.send(&env, b"x\r\n").await;
        drop(c);
        srv.await.unwrap();
        let failure = t.results[0].as_ref().expect_err("the body was never sent");
        assert_eq!(
            failure.outcome(),
            crate::delivery::classify::Outcome::Temporary
        );
        assert!(t.connection_lost);
    }

    #[tokio::test]
    async fn auth_login_and_plain() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(server(
            b,
            vec![
                ("EHLO", "250-mx\r\n250 AUTH LOGIN\r\n"),
                ("AUTH LOGIN", "334 VXNlcm5hbWU6\r\n"),
                ("dXNlcg==", "334 UGFzc3dvcmQ6\r\n"),
                ("c2VjcmV0", "235 2.7.0 ok\r\n"),
            ],
        ));
        let mut c = SmtpClient::new(a, timeouts());
        c.greeting().await.unwrap();
        let caps = c.ehlo("relay.test").await.unwrap().unwrap();
        assert!(caps.auth_login && !caps.auth_plain);
        assert!(c.auth("user", "secret").await.unwrap().is_ok());
        drop(c);
        srv.await.unwrap();

        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(server(
            b,
            vec![
                ("EHLO", "250-mx\r\n250 AUTH PLAIN LOGIN\r\n"),
                // base64("\0user\0secret")
                (
                    "AUTH PLAIN AHVzZXIAc2VjcmV0",
                    "535 5.7.8 bad credentials\r\n",
                ),
            ],
        ));
        let mut c = ready_client(a).await;
        assert_eq!(
            c.auth("user", "secret").await.unwrap().unwrap_err().code,
            535
        );
        drop(c);
        srv.await.unwrap();
    }

    #[tokio::test]
    async fn pipelined_transaction_and_smtputf8_refusal() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(b);
            let mut r = BufReader::new(r);
            w.write_all(b"220 hi\r\n").await.unwrap();
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            w.write_all(b"250-mx\r\n250 PIPELINING\r\n").await.unwrap();
            // MAIL, RCPT, DATA arrive together; answer all at once.
            let mut lines = Vec::new();
            for _ in 0..3 {
                let mut l = String::new();
                r.read_line(&mut l).await.unwrap();
                lines.push(l);
            }
            w.write_all(b"250 ok\r\n250 ok\r\n354 go\r\n")
                .await
                .unwrap();
            loop {
                let mut l = String::new();
                r.read_line(&mut l).await.unwrap();
                if l == ".\r\n" {
                    break;
                }
            }
            w.write_all(b"250 done\r\n").await.unwrap();
            lines
        });
        let mut c = SmtpClient::new(a, timeouts());
        c.greeting().await.unwrap();
        assert!(c.ehlo("relay.test").await.unwrap().unwrap().pipelining);
        let rcpts = vec!["x@b.test".to_string()];
        let mut env = Envelope {
            mail_from: "",
            recipients: &rcpts,
            eight_bit: false,
            smtputf8: true,
            require_tls: false,
        };
        let t = c.send(&env, b"x\r\n").await;
        let failure = t.results[0].as_ref().unwrap_err();
        assert_eq!(failure.dsn_status(), "5.6.7");
        env.smtputf8 = false;
        let t = c.send(&env, b"x\r\n").await;
        assert_eq!(t.results[0].as_ref().unwrap().message, "done");
        let lines = srv.await.unwrap();
        assert_eq!(lines[0], "MAIL FROM:<>\r\n");
    }

    /// A CHUNKING server: reads MAIL, the RCPTs and `BDAT n LAST` with its
    /// n bytes, checks they came in one write, answers with `replies`, and
    /// returns the body it got.
    async fn chunking_server(io: DuplexStream, rcpts: usize, replies: &'static str) -> Vec<u8> {
        let (r, mut w) = tokio::io::split(io);
        let mut r = BufReader::new(r);
        w.write_all(b"220 hi\r\n").await.unwrap();
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        w.write_all(b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
            .await
            .unwrap();
        let mut lines = Vec::new();
        while lines.len() < rcpts + 2 {
            let mut l = String::new();
            r.read_line(&mut l).await.unwrap();
            if lines.is_empty() && l == "RSET\r\n" {
                // A reset due: the test's replies answer it first.
                continue;
            }
            lines.push(l);
        }
        assert!(lines[0].starts_with("MAIL FROM:"), "{lines:?}");
        assert!(lines[1..=rcpts].iter().all(|l| l.starts_with("RCPT TO:")));
        let size: usize = lines[rcpts + 1]
            .strip_prefix("BDAT ")
            .and_then(|l| l.strip_suffix(" LAST\r\n"))
            .unwrap_or_else(|| panic!("{lines:?}"))
            .parse()
            .unwrap();
        let mut body = vec![0; size];
        tokio::io::AsyncReadExt::read_exact(&mut r, &mut body)
            .await
            .unwrap();
        w.write_all(replies.as_bytes()).await.unwrap();
        body
    }

    /// One transaction from `s@a.test` to `rcpts` with `data`, against a
    /// [`chunking_server`] answering `replies`: the result and the body
    /// the server got.
    async fn send_chunked(
        rcpts: &[&str],
        data: &[u8],
        replies: &'static str,
    ) -> (Transaction, Vec<u8>) {
        send_chunked_after(false, rcpts, data, replies).await
    }

    /// [`send_chunked`], after [`SmtpClient::reset_before_next`] when
    /// `reset` (`replies` then starts with the RSET's).
    async fn send_chunked_after(
        reset: bool,
        rcpts: &[&str],
        data: &[u8],
        replies: &'static str,
    ) -> (Transaction, Vec<u8>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(chunking_server(b, rcpts.len(), replies));
        let mut c = SmtpClient::new(a, timeouts());
        c.greeting().await.unwrap();
        let caps = c.ehlo("relay.test").await.unwrap().unwrap();
        assert!(caps.chunking && caps.pipelining);
        if reset {
            c.reset_before_next();
        }
        let rcpts: Vec<String> = rcpts.iter().map(|r| r.to_string()).collect();
        let env = envelope(&rcpts);
        let t = c.send(&env, data).await;
        (t, srv.await.unwrap())
    }

    #[tokio::test]
    async fn chunking_sends_the_message_unstuffed_after_the_envelope() {
        // No trailing CRLF: BDAT adds it as DATA would.
        let (t, body) = send_chunked(
            &["x@b.test", "y@b.test"],
            b"Subject: x\r\n\r\n.dot\r\n.",
            "250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n250 2.0.0 queued as X\r\n",
        )
        .await;
        assert!(t.ended && !t.connection_lost && !t.host_failure, "{t:?}");
        assert_eq!(t.results[0].as_ref().unwrap().message, "queued as X");
        assert_eq!(
            t.results[1].as_ref().unwrap_err().reply().unwrap().code,
            550
        );
        assert_eq!(body, b"Subject: x\r\n\r\n.dot\r\n.\r\n");
    }

    #[tokio::test]
    async fn a_refused_bdat_fails_the_accepted_recipients_and_leaves_a_reset_due() {
        let (t, body) = send_chunked(
            &["x@b.test"],
            b"x\r\n",
            "250 ok\r\n250 ok\r\n452 4.3.1 insufficient storage\r\n",
        )
        .await;
        assert!(!t.ended && !t.connection_lost, "{t:?}");
        let failure = t.results[0].as_ref().unwrap_err();
        assert_eq!(
            failure.outcome(),
            crate::delivery::classify::Outcome::Temporary
        );
        assert_eq!(body, b"x\r\n");
    }

    #[tokio::test]
    async fn a_refused_sender_over_chunking_shares_its_answer() {
        let (t, _) = send_chunked(
            &["x@b.test"],
            b"x\r\n",
            "550 5.7.1 sender rejected\r\n503 5.5.1 no sender\r\n503 5.5.1 no recipients\r\n",
        )
        .await;
        let failure = t.results[0].as_ref().unwrap_err();
        assert!(
            matches!(failure, Failure::Session(r) if r.code == 550),
            "{failure:?}"
        );
        assert!(!crate::delivery::classify::is_hard_bounce(failure));
        assert!(!t.ended && !t.host_failure);
    }

    #[tokio::test]
    async fn dropped_connection_keeps_permanent_answers_and_retries_the_rest() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(b);
            let mut r = BufReader::new(r);
            w.write_all(b"220 hi\r\n").await.unwrap();
            for reply in ["250 mx\r\n", "250 ok\r\n", "550 5.1.1 unknown\r\n"] {
                let mut l = String::new();
                r.read_line(&mut l).await.unwrap();
                w.write_all(reply.as_bytes()).await.unwrap();
            }
            // Drop the connection at the second RCPT.
        });
        let mut c = ready_client(a).await;
        let rcpts = vec!["x@b.test".to_string(), "y@b.test".into()];
        let env = envelope(&rcpts);
        let t = c.send(&env, b"x\r\n").await;
        srv.await.unwrap();
        assert!(t.connection_lost && t.host_failure);
        assert_eq!(
            t.results[0].as_ref().unwrap_err().reply().unwrap().code,
            550
        );
        assert!(matches!(t.results[1], Err(Failure::Fault(Fault::Io(_)))));
    }

    /// A session from the idle pool: its RSET goes in the transaction's
    /// first write and is answered before MAIL; the next transaction, after
    /// one that ended, sends none.
    #[tokio::test]
    async fn a_pooled_session_is_reset_within_its_first_pipelined_write() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(server(
            b,
            vec![
                ("EHLO", "250-mx\r\n250 PIPELINING\r\n"),
                ("RSET", "250 ok\r\n"),
                ("MAIL FROM:<s@a.test>", "250 ok\r\n"),
                ("RCPT TO:<x@b.test>", "250 ok\r\n"),
                ("DATA", "354 go\r\n"),
                ("<data end>", "250 2.0.0 queued\r\n"),
                ("MAIL FROM:<s@a.test>", "250 ok\r\n"),
                ("RCPT TO:<x@b.test>", "250 ok\r\n"),
                ("DATA", "354 go\r\n"),
                ("<data end>", "250 2.0.0 queued\r\n"),
            ],
        ));
        let mut c = ready_client(a).await;
        c.reset_before_next();
        let rcpts = vec!["x@b.test".to_string()];
        let env = envelope(&rcpts);
        for _ in 0..2 {
            let t = c.send(&env, b"x\r\n").await;
            assert!(t.ended && !t.host_failure, "{t:?}");
            assert_eq!(t.results[0].as_ref().unwrap().code, 250);
        }
        drop(c);
        let seen = srv.await.unwrap();
        assert_eq!(seen.iter().filter(|l| *l == "RSET").count(), 1, "{seen:?}");
    }

    /// Over CHUNKING too, and a server gone while the session sat idle
    /// (no answer to the RSET) costs the recipients nothing: they are
    /// retried, on a new connection.
    #[tokio::test]
    async fn a_pooled_session_over_chunking_and_one_the_server_dropped() {
        let (t, body) = send_chunked_after(
            true,
            &["x@b.test"],
            b"x\r\n",
            "250 2.0.0 reset\r\n250 ok\r\n250 ok\r\n250 2.0.0 queued\r\n",
        )
        .await;
        assert_eq!(body, b"x\r\n");
        assert!(t.ended && !t.host_failure, "{t:?}");
        assert_eq!(t.results[0].as_ref().unwrap().code, 250);

        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(server(
            b,
            vec![("EHLO", "250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n")],
        ));
        let mut c = ready_client(a).await;
        c.reset_before_next();
        let rcpts = vec!["x@b.test".to_string()];
        let env = envelope(&rcpts);
        let t = c.send(&env, b"x\r\n").await;
        srv.await.unwrap();
        assert!(t.connection_lost && t.host_failure, "{t:?}");
        let failure = t.results[0].as_ref().unwrap_err();
        assert_eq!(failure.outcome(), Outcome::Temporary, "{failure:?}");
    }

    /// A refused RSET: the server may still hold the old transaction, so
    /// its refusals of this one (a stale `503`) are retried, not bounced,
    /// and the session is given up.
    #[tokio::test]
    async fn after_a_refused_reset_refusals_are_not_final() {
        for pipelining in [true, false] {
            let ehlo = if pipelining {
                "250-mx\r\n250 PIPELINING\r\n"
            } else {
                "250 mx\r\n"
            };
            let mut script = vec![("EHLO", ehlo), ("RSET", "502 5.5.2 no RSET here\r\n")];
            if pipelining {
                script.extend([
                    ("MAIL FROM:<s@a.test>", "503 5.5.1 nested MAIL\r\n"),
                    ("RCPT TO:<x@b.test>", "503 5.5.1 no sender\r\n"),
                    ("DATA", "503 5.5.1 no recipients\r\n"),
                ]);
            }
            let (a, b) = tokio::io::duplex(64 * 1024);
            let srv = tokio::spawn(server(b, script));
            let mut c = ready_client(a).await;
            c.reset_before_next();
            let rcpts = vec!["x@b.test".to_string()];
            let env = envelope(&rcpts);
            let t = c.send(&env, b"x\r\n").await;
            drop(c);
            let seen = srv.await.unwrap();
            assert!(t.host_failure && !t.ended, "{pipelining}: {t:?}");
            let failure = t.results[0].as_ref().unwrap_err();
            assert!(
                matches!(failure, Failure::Fault(Fault::Protocol(m)) if m.contains("502")),
                "{pipelining}: {failure:?}"
            );
            assert_eq!(failure.outcome(), Outcome::Temporary);
            // Without pipelining nothing follows the refused RSET.
            let mails = seen.iter().filter(|l| l.starts_with("MAIL")).count();
            assert_eq!(mails, usize::from(pipelining), "{seen:?}");
        }
    }
}
