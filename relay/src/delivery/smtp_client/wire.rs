//! Wire framing of the outbound SMTP client: reading whole replies
//! (bounded, under the stage's timeout), writing command lines, parsing
//! replies with smtp-proto, and dot-stuffing the message for DATA.

use std::time::Duration;

use smtp_proto::response::parser::ResponseReceiver;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::super::classify::{Fault, Reply};
use super::Capabilities;

/// Longest reply accepted (all lines together).
const MAX_REPLY: usize = 64 * 1024;

/// RFC 5321 timeouts for each stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect and TLS handshake.
    pub connect: Duration,
    /// The greeting.
    pub greeting: Duration,
    /// Each command's reply, and each write.
    pub command: Duration,
    /// The reply to the end of DATA.
    pub data: Duration,
}

impl From<&petrel_crds::config::OutboundTimeouts> for Timeouts {
    fn from(t: &petrel_crds::config::OutboundTimeouts) -> Self {
        Timeouts {
            connect: t.connect.get(),
            greeting: t.greeting.get(),
            command: t.command.get(),
            data: t.data.get(),
        }
    }
}

/// One SMTP connection.
pub struct SmtpClient<S> {
    pub(super) stream: S,
    pub(super) buf: Vec<u8>,
    pub(super) timeouts: Timeouts,
    /// What the server offers (after the last EHLO).
    pub caps: Capabilities,
    /// The next transaction starts with RSET: the last one may have left
    /// state at the server, or the session waited idle (the RSET's answer
    /// then also shows the server is still there).
    pub(super) reset_due: bool,
}

fn io_fault(e: std::io::Error) -> Fault {
    Fault::Io(e.to_string())
}

/// Length of the first complete reply in `buf`, if there is one: lines up
/// to one whose fourth byte is not `-`.
pub(super) fn complete_reply_len(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
        let line = &buf[start..start + nl + 1];
        start += nl + 1;
        if line.get(3) != Some(&b'-') {
            return Some(start);
        }
    }
    None
}

/// Parses one complete reply with smtp-proto.
pub fn parse_reply(raw: &[u8]) -> Result<Reply, Fault> {
    let mut receiver = ResponseReceiver::default();
    match receiver.parse(&mut raw.iter()) {
        Ok(r) => {
            let esc = (r.esc != [0, 0, 0]).then_some(r.esc);
            Ok(Reply {
                code: r.code,
                esc,
                message: r.message,
            })
        }
        Err(e) => Err(Fault::Protocol(format!(
            "bad reply {:?}: {e:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(80)])
        ))),
    }
}

/// `data` dot-stuffed for DATA (RFC 5321 4.5.2) with the final `.`, as
/// the pieces to write one after another: runs of `data` between
/// line-initial dots (found with `memmem`; a byte-at-a-time loop here was
/// a tenth of the relay's CPU on 100 KB messages), the added dots, a CRLF
/// when the message does not end with one, and `.` CRLF. Nothing is
/// copied: at 100 KB the copy into one buffer was 2% of the relay's CPU.
pub fn dot_stuff(data: &[u8]) -> Vec<&[u8]> {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(4);
    if data.first() == Some(&b'.') {
        parts.push(b".");
    }
    let mut start = 0;
    for lf in memchr::memmem::find_iter(data, b"\n.") {
        parts.push(&data[start..=lf]);
        parts.push(b".");
        start = lf + 1;
    }
    let last = &data[start..];
    // The stuffed message ends as `data` does: an added dot is always
    // followed by the dot it doubles.
    if data.ends_with(b"\r\n") || data.is_empty() {
        parts.push(last);
    } else if data.ends_with(b"\n") {
        // A bare LF at the end becomes CRLF. It is in `last`: a match
        // needs a dot after its LF.
        parts.push(&last[..last.len() - 1]);
        parts.push(b"\r\n");
    } else if data.ends_with(b"\r") {
        // A trailing CR gets its LF, not a second CR (no bare CR on the wire).
        parts.push(last);
        parts.push(b"\n");
    } else {
        parts.push(last);
        parts.push(b"\r\n");
    }
    parts.push(b".\r\n");
    parts.retain(|p| !p.is_empty());
    parts
}

/// Removes CR, LF and angle brackets from an address put on a command line.
pub(super) fn address(a: &str) -> String {
    a.chars()
        .filter(|c| !matches!(c, '\r' | '\n' | '<' | '>'))
        .collect()
}

impl<S: AsyncRead + AsyncWrite + Unpin> SmtpClient<S> {
    /// Wraps a connected stream (the greeting not yet read).
    pub fn new(stream: S, timeouts: Timeouts) -> SmtpClient<S> {
        SmtpClient {
            stream,
            buf: Vec::new(),
            timeouts,
            caps: Capabilities::default(),
            reset_due: false,
        }
    }

    /// The raw bytes of the next reply.
    pub(super) async fn read_raw(
        &mut self,
        timeout: Duration,
        stage: &'static str,
    ) -> Result<Vec<u8>, Fault> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(len) = complete_reply_len(&self.buf) {
                return Ok(self.buf.drain(..len).collect());
            }
            if self.buf.len() > MAX_REPLY {
                return Err(Fault::Protocol(format!("reply to {stage} too long")));
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .map_err(|_| Fault::Timeout(stage))?
                .map_err(io_fault)?;
            if n == 0 {
                return Err(Fault::Io(format!(
                    "connection closed while waiting for {stage}"
                )));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next reply.
    pub async fn read_reply(
        &mut self,
        timeout: Duration,
        stage: &'static str,
    ) -> Result<Reply, Fault> {
        let raw = self.read_raw(timeout, stage).await?;
        parse_reply(&raw)
    }

    /// Writes `parts` back to back, in as few system calls as the stream
    /// allows (vectored where it can), under the write timeout.
    pub(super) async fn write_parts(
        &mut self,
        parts: &[&[u8]],
        stage: &'static str,
    ) -> Result<(), Fault> {
        let timeout = self.timeouts.command.max(self.timeouts.data);
        let mut slices: Vec<std::io::IoSlice<'_>> =
            parts.iter().map(|p| std::io::IoSlice::new(p)).collect();
        tokio::time::timeout(timeout, async {
            let mut rest = &mut slices[..];
            while !rest.is_empty() {
                let n = self.stream.write_vectored(rest).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                std::io::IoSlice::advance_slices(&mut rest, n);
            }
            self.stream.flush().await
        })
        .await
        .map_err(|_| Fault::Timeout(stage))?
        .map_err(io_fault)
    }

    pub(super) async fn write(&mut self, bytes: &[u8], stage: &'static str) -> Result<(), Fault> {
        let timeout = self.timeouts.command.max(self.timeouts.data);
        tokio::time::timeout(timeout, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        .map_err(|_| Fault::Timeout(stage))?
        .map_err(io_fault)
    }

    /// Sends one command line and reads its reply.
    pub async fn command(&mut self, line: &str, stage: &'static str) -> Result<Reply, Fault> {
        self.write(format!("{line}\r\n").as_bytes(), stage).await?;
        self.read_reply(self.timeouts.command, stage).await
    }

    /// The stream and any bytes already read past the last reply.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.stream, self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stuffed(data: &[u8]) -> Vec<u8> {
        dot_stuff(data).concat()
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(stuffed(b"a\r\n.b\r\n..c\r\n"), b"a\r\n..b\r\n...c\r\n.\r\n");
        assert_eq!(stuffed(b".\r\nx"), b"..\r\nx\r\n.\r\n");
        assert_eq!(stuffed(b"x\n"), b"x\r\n.\r\n");
        assert_eq!(stuffed(b""), b".\r\n");
        assert_eq!(stuffed(b"x\r"), b"x\r\n.\r\n");
        assert_eq!(stuffed(b"x\r\n."), b"x\r\n..\r\n.\r\n");
        // Without a line-initial dot the message itself is written, not
        // a copy of it.
        let body = b"Subject: x\r\n\r\nno dots\r\n";
        let parts = dot_stuff(body);
        assert_eq!(parts.len(), 2);
        assert!(std::ptr::eq(parts[0], &body[..]));
    }

    /// The run-copying version stuffs exactly like the byte-at-a-time
    /// definition, on dots after bare LFs, runs of dotted lines and ends.
    #[test]
    fn dot_stuffing_matches_the_byte_at_a_time_definition() {
        fn reference(data: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            let mut at_line_start = true;
            for &b in data {
                if at_line_start && b == b'.' {
                    out.push(b'.');
                }
                out.push(b);
                at_line_start = b == b'\n';
            }
            if !out.is_empty() && !out.ends_with(b"\r\n") {
                if out.ends_with(b"\n") {
                    out.pop();
                }
                if !out.ends_with(b"\r") {
                    out.push(b'\r');
                }
                out.push(b'\n');
            }
            out.extend_from_slice(b".\r\n");
            out
        }
        let inputs: [&[u8]; 13] = [
            b"",
            b".",
            b"\n",
            b"\r",
            b".\n",
            b"a\n.\n",
            b"..\n.\n.",
            b"a\n.b\r\n.\r\n..\r\nc",
            b"\n\n.\n",
            b"x.y\r\n z.\r\n",
            b"no dots at all\r\n",
            b"\r\n.\r\n.\r\n",
            b"tail\r",
        ];
        for input in inputs {
            assert_eq!(stuffed(input), reference(input), "{input:?}");
        }
    }

    #[test]
    fn replies_split_and_parse() {
        assert_eq!(complete_reply_len(b"250-a\r\n250 b\r\nrest"), Some(14));
        assert_eq!(complete_reply_len(b"250-a\r\n250"), None);
        assert_eq!(complete_reply_len(b"250\r\n"), Some(5));
        let r = parse_reply(b"550-5.1.1 no such\r\n550 5.1.1 user\r\n").unwrap();
        assert_eq!((r.code, r.esc), (550, Some([5, 1, 1])));
        assert_eq!(r.message, "no such\nuser");
        let r = parse_reply(b"250 ok\r\n").unwrap();
        assert_eq!(r.esc, None);
        assert!(parse_reply(b"hello\r\n").is_err());
    }

    /// Stand-in for a fuzz target: the reply reader and parser take
    /// whatever a hostile server sends without panicking.
    #[test]
    fn garbage_replies_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = b"0123456789 -.\r\n5abc\xff";
        for _ in 0..20_000 {
            let len = rng.random_range(0..40);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            if let Some(n) = complete_reply_len(&bytes) {
                let _ = parse_reply(&bytes[..n]);
            }
            let _ = parse_reply(&bytes);
        }
    }
}
