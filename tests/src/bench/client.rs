//! A small SMTP client for load and fault tests: plain TCP, one command at a
//! time, every read and write under a timeout, replies parsed leniently so a
//! broken server shows up as a [`Reply`] or a [`ClientError`], never a panic.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Longest reply line we accept; RFC 5321 allows 512.
const MAX_REPLY_LINE: usize = 8 * 1024;
/// Most lines in one multi-line reply.
const MAX_REPLY_LINES: usize = 100;

/// Why an SMTP exchange failed below the level of a reply code.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect, read or write failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The server did not answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The server closed the connection.
    #[error("connection closed by server")]
    Closed,
    /// The server sent something that is not an SMTP reply.
    #[error("malformed reply: {0:?}")]
    Malformed(String),
}

/// One SMTP reply: code and the text of every line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit code.
    pub code: u16,
    /// Text of each line after the code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
    /// 4xx: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    /// 5xx: refused for good.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }
    /// All lines joined, for messages.
    pub fn text(&self) -> String {
        self.lines.join(" / ")
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text())
    }
}

/// An open SMTP connection.
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
}

impl Client {
    /// Connects and reads the greeting (returned, whatever its code).
    pub async fn connect(
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<(Client, Reply), ClientError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout("connect"))??;
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let mut client = Client {
            reader: BufReader::with_capacity(16 * 1024, r),
            writer: w,
            timeout,
        };
        let greeting = client.read_reply().await?;
        Ok((client, greeting))
    }

    /// Sends raw bytes as they are (for malformed input tests).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        tokio::time::timeout(self.timeout, self.writer.write_all(bytes))
            .await
            .map_err(|_| ClientError::Timeout("write"))??;
        Ok(())
    }

    /// Sends `line` + CRLF and reads the reply.
    pub async fn command(&mut self, line: &str) -> Result<Reply, ClientError> {
        let mut buf = Vec::with_capacity(line.len() + 2);
        buf.extend_from_slice(line.as_bytes());
        buf.extend_from_slice(b"\r\n");
        self.send_raw(&buf).await?;
        self.read_reply().await
    }

    /// Reads one (possibly multi-line) reply.
    pub async fn read_reply(&mut self) -> Result<Reply, ClientError> {
        let mut lines = Vec::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = tokio::time::timeout(self.timeout, read_line(&mut self.reader, &mut line))
                .await
                .map_err(|_| ClientError::Timeout("reply"))??;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\r', '\n']);
            let code: u16 = text
                .get(..3)
                .and_then(|c| c.parse().ok())
                .filter(|c| (200..600).contains(c))
                .ok_or_else(|| ClientError::Malformed(text.to_string()))?;
            let sep = text.as_bytes().get(3).copied();
            lines.push(text.get(4..).unwrap_or("").to_string());
            if sep != Some(b'-') || lines.len() >= MAX_REPLY_LINES {
                return Ok(Reply { code, lines });
            }
        }
    }

    /// Sends the message body (already dot-safe, CRLF lines) and the final
    /// `.` line, and reads the reply to it.
    pub async fn data_body(&mut self, body: &[u8]) -> Result<Reply, ClientError> {
        self.send_raw(body).await?;
        if !body.ends_with(b"\r\n") && !body.is_empty() {
            self.send_raw(b"\r\n").await?;
        }
        self.send_raw(b".\r\n").await?;
        self.read_reply().await
    }

    /// One whole transaction: MAIL, RCPT for each, DATA, body. Returns the
    /// first refusing reply or the reply to the end of data.
    pub async fn send_mail(
        &mut self,
        from: &str,
        to: &[String],
        body: &[u8],
    ) -> Result<Reply, ClientError> {
        let r = self.command(&format!("MAIL FROM:<{from}>")).await?;
        if !r.is_positive() {
            return Ok(r);
        }
        let mut any = false;
        let mut refused = None;
        for rcpt in to {
            let r = self.command(&format!("RCPT TO:<{rcpt}>")).await?;
            if r.is_positive() {
                any = true;
            } else {
                refused.get_or_insert(r);
            }
        }
        if !any {
            let _ = self.command("RSET").await;
            return Ok(refused.unwrap_or(Reply {
                code: 554,
                lines: vec!["no recipients".into()],
            }));
        }
        let r = self.command("DATA").await?;
        if r.code != 354 {
            return Ok(r);
        }
        self.data_body(body).await
    }

    /// `QUIT`, ignoring what happens: the transaction is over either way.
    pub async fn quit(mut self) {
        let _ = self.command("QUIT").await;
    }
}

/// Reads up to LF, bounded: a longer line is cut at [`MAX_REPLY_LINE`].
async fn read_line(
    reader: &mut BufReader<OwnedReadHalf>,
    out: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(total);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = MAX_REPLY_LINE.saturating_sub(out.len());
        out.extend_from_slice(&buf[..take.min(room)]);
        reader.consume(take);
        total += take;
        if done {
            return Ok(total);
        }
    }
}
