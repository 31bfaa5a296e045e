//! A fast counting SMTP sink on 127.0.0.1 that proves delivery per message.
//!
//! It accepts anything (PIPELINING-aware: replies are flushed only when the
//! client has nothing more buffered), reads `X-Bench-Id` / `X-Bench-Sent`
//! from each message's headers, and records per id how many times it
//! arrived and for how many recipients, plus accept-to-delivered latency.
//! Fault tests switch its [`Behavior`] at runtime to make the destination
//! misbehave, then switch it back to `Accept` to let retries through.
//! With [`Sink::set_chunking`] it also offers CHUNKING (RFC 3030), as
//! Postfix and the large mailbox providers do, and each behaviour applies
//! to `BDAT ... LAST` as it does to the end of DATA.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::message::{self, BenchHeader};

/// Longest line the sink buffers; longer lines are cut (it is a test peer,
/// but must not grow without bound on a broken relay).
const MAX_LINE: usize = 1024 * 1024;

/// How the sink answers, switchable while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Behavior {
    /// 250 to everything: a healthy destination.
    Accept = 0,
    /// `421` greeting and close: a destination shedding load.
    Greeting421 = 1,
    /// Close the connection in the middle of DATA, before the final dot.
    DropMidData = 2,
    /// Read the whole message, then answer `421` and close.
    Reply421AfterData = 3,
    /// Read the whole message and never answer (the relay's data timeout
    /// must fire). The message is not recorded as delivered.
    StallAfterData = 4,
    /// Answer `451` to the end of data, keep the session.
    TempFailAfterData = 5,
}

impl Behavior {
    fn from_u8(v: u8) -> Behavior {
        match v {
            1 => Behavior::Greeting421,
            2 => Behavior::DropMidData,
            3 => Behavior::Reply421AfterData,
            4 => Behavior::StallAfterData,
            5 => Behavior::TempFailAfterData,
            _ => Behavior::Accept,
        }
    }
}

/// What arrived for one message id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Arrival {
    /// Transactions that carried it (1 = exactly once).
    pub deliveries: u32,
    /// Recipients over all those transactions.
    pub recipients: u32,
}

#[derive(Default)]
struct Records {
    by_id: HashMap<String, Arrival>,
    latencies: Vec<Duration>,
    /// Messages without an `X-Bench-Id` header (e.g. DSNs).
    anonymous: u64,
}

struct Shared {
    behavior: AtomicU8,
    chunking: AtomicBool,
    chunked: AtomicU64,
    records: Mutex<Records>,
    unique: AtomicU64,
    recipients: AtomicU64,
    transactions: AtomicU64,
    connections: AtomicU64,
    attempts: AtomicU64,
    changed: Notify,
}

impl Shared {
    fn records(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running sink; stops accepting when dropped.
pub struct Sink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Sink {
    /// Binds 127.0.0.1 on a free port and starts serving.
    pub async fn start() -> std::io::Result<Sink> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Binds `addr` (e.g. a fixed port Postfix is configured for).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Sink> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            behavior: AtomicU8::new(Behavior::Accept as u8),
            chunking: AtomicBool::new(false),
            chunked: AtomicU64::new(0),
            records: Mutex::new(Records::default()),
            unique: AtomicU64::new(0),
            recipients: AtomicU64::new(0),
            transactions: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            changed: Notify::new(),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Sink { addr, shared, task })
    }

    /// Offers CHUNKING (BDAT) to sessions that send EHLO from now on.
    pub fn set_chunking(&self, on: bool) {
        self.shared.chunking.store(on, Ordering::SeqCst);
    }

    /// Transactions that ended with `BDAT ... LAST`, whatever the answer.
    pub fn chunked(&self) -> u64 {
        self.shared.chunked.load(Ordering::SeqCst)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes how new commands are answered from now on.
    pub fn set_behavior(&self, b: Behavior) {
        self.shared.behavior.store(b as u8, Ordering::SeqCst);
    }

    /// Distinct message ids received.
    pub fn unique(&self) -> u64 {
        self.shared.unique.load(Ordering::SeqCst)
    }

    /// Recipients received over all transactions.
    pub fn recipients(&self) -> u64 {
        self.shared.recipients.load(Ordering::SeqCst)
    }

    /// Transactions completed with 250 (duplicates included).
    pub fn transactions(&self) -> u64 {
        self.shared.transactions.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Messages that arrived without an `X-Bench-Id` (bounces, DSNs).
    pub fn anonymous(&self) -> u64 {
        self.shared.records().anonymous
    }

    /// What arrived, by message id.
    pub fn arrivals(&self) -> HashMap<String, Arrival> {
        self.shared.records().by_id.clone()
    }

    /// Accept-to-delivered latencies recorded so far (first arrival of each
    /// message), draining them.
    pub fn take_latencies(&self) -> Vec<Duration> {
        std::mem::take(&mut self.shared.records().latencies)
    }

    /// Forgets everything received (between bench runs).
    pub fn reset(&self) {
        *self.shared.records() = Records::default();
        self.shared.unique.store(0, Ordering::SeqCst);
        self.shared.recipients.store(0, Ordering::SeqCst);
        self.shared.transactions.store(0, Ordering::SeqCst);
    }

    /// Waits until every one of `ids` has arrived at least once; false on
    /// timeout. Counts alone are not enough after a crash: a message the
    /// client never saw accepted may arrive too and make up the number
    /// while an accepted one is still waiting for its lease to expire.
    pub async fn wait_for_ids(&self, ids: &[String], timeout: Duration) -> bool {
        let check = || {
            let records = self.shared.records();
            ids.iter().all(|id| records.by_id.contains_key(id))
        };
        tokio::time::timeout(timeout, async {
            loop {
                let notified = self.shared.changed.notified();
                if check() {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok()
    }

    /// Waits until at least `unique` distinct ids and `recipients` recipients
    /// have arrived; false on timeout.
    pub async fn wait_for(&self, unique: u64, recipients: u64, timeout: Duration) -> bool {
        let check = || self.unique() >= unique && self.recipients() >= recipients;
        tokio::time::timeout(timeout, async {
            loop {
                let notified = self.shared.changed.notified();
                if check() {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok()
    }
}

impl Sink {
    /// Delivery attempts so far: every MAIL command, and every connection
    /// turned away by a 421 greeting. (Connections alone do not count
    /// attempts: a relay may send several transactions over one.)
    pub fn attempts(&self) -> u64 {
        self.shared.attempts.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` delivery attempts (see
    /// [`attempts`](Self::attempts)) were made, whatever their outcome;
    /// false on timeout.
    pub async fn wait_attempts(&self, n: u64, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, async {
            loop {
                let notified = self.shared.changed.notified();
                if self.attempts() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                shared.changed.notify_waiters();
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, &shared).await;
                });
            }
            // EMFILE and the like: back off briefly instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The message being received in the current transaction.
#[derive(Default)]
struct Txn {
    rcpts: u32,
    id: Option<String>,
    sent: Option<u64>,
    /// BDAT chunks so far.
    chunks: Vec<u8>,
}

/// What a transaction's end (end of DATA, or `BDAT ... LAST`) gets.
enum Ending {
    Reply(&'static [u8]),
    /// Reply, then close.
    Close(&'static [u8]),
    /// Close without a reply.
    Drop,
    /// Never reply; read until the client goes.
    Stall,
}

fn ending(shared: &Shared, txn: &mut Txn, behavior: Behavior) -> Ending {
    match behavior {
        Behavior::Reply421AfterData => Ending::Close(b"421 4.3.0 sink.test closing, try later\r\n"),
        Behavior::StallAfterData => Ending::Stall,
        Behavior::TempFailAfterData => Ending::Reply(b"451 4.3.0 temporary failure\r\n"),
        Behavior::DropMidData => Ending::Drop,
        Behavior::Accept | Behavior::Greeting421 => {
            record(shared, std::mem::take(txn));
            Ending::Reply(b"250 2.0.0 queued\r\n")
        }
    }
}

/// Carries out a transaction's end: the reply to send and go on with, or
/// `None` when the session is over.
async fn finish<R, W>(
    end: Ending,
    reader: &mut R,
    writer: &mut W,
) -> std::io::Result<Option<&'static [u8]>>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    match end {
        Ending::Reply(reply) => Ok(Some(reply)),
        Ending::Close(reply) => {
            writer.write_all(reply).await?;
            writer.flush().await?;
            Ok(None)
        }
        Ending::Drop => Ok(None),
        Ending::Stall => {
            // Never answer; hold the socket until the relay gives up.
            let _ = tokio::io::copy(reader, &mut tokio::io::sink()).await;
            Ok(None)
        }
    }
}

/// Reads the bench headers from a whole message (BDAT).
fn scan_headers(message: &[u8], txn: &mut Txn) {
    for line in message.split(|b| *b == b'\n') {
        let content = line.strip_suffix(b"\r").unwrap_or(line);
        if content.is_empty() {
            return;
        }
        match message::parse_header(content) {
            Some(BenchHeader::Id(id)) => txn.id = Some(id.to_string()),
            Some(BenchHeader::Sent(t)) => txn.sent = Some(t),
            None => {}
        }
    }
}

/// `BDAT <size> [LAST]`: the size and whether it is the last chunk.
fn bdat_args(line: &[u8]) -> Option<(usize, bool)> {
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut words = line.split_ascii_whitespace().skip(1);
    let size = words.next()?.parse().ok()?;
    match (words.next(), words.next()) {
        (None, None) => Some((size, false)),
        (Some(last), None) if last.eq_ignore_ascii_case("LAST") => Some((size, true)),
        _ => None,
    }
}

async fn serve(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let mut reader = BufReader::with_capacity(64 * 1024, r);
    let mut writer = BufWriter::with_capacity(4096, w);
    let behavior = || Behavior::from_u8(shared.behavior.load(Ordering::SeqCst));
    if behavior() == Behavior::Greeting421 {
        shared.attempts.fetch_add(1, Ordering::SeqCst);
        shared.changed.notify_waiters();
        writer
            .write_all(b"421 4.3.2 sink.test busy, try later\r\n")
            .await?;
        return writer.flush().await;
    }
    writer
        .write_all(b"220 sink.test ESMTP bench sink\r\n")
        .await?;
    writer.flush().await?;
    let mut line = Vec::with_capacity(1024);
    let mut txn = Txn::default();
    loop {
        line.clear();
        if read_line(&mut reader, &mut line).await? == 0 {
            return Ok(());
        }
        let verb: Vec<u8> = line
            .iter()
            .take(4)
            .map(|b| b.to_ascii_uppercase())
            .collect();
        let reply: &[u8] = match verb.as_slice() {
            b"EHLO" if shared.chunking.load(Ordering::SeqCst) => b"250-sink.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250 ENHANCEDSTATUSCODES\r\n",
            b"EHLO" => b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250 ENHANCEDSTATUSCODES\r\n",
            b"HELO" => b"250 sink.test\r\n",
            b"MAIL" => {
                shared.attempts.fetch_add(1, Ordering::SeqCst);
                shared.changed.notify_waiters();
                txn = Txn::default();
                b"250 2.1.0 ok\r\n"
            }
            b"RCPT" => {
                txn.rcpts += 1;
                b"250 2.1.5 ok\r\n"
            }
            b"DATA" => {
                writer.write_all(b"354 go ahead\r\n").await?;
                writer.flush().await?;
                match receive_data(&mut reader, &mut txn, behavior()).await? {
                    DataEnd::Complete => {}
                    DataEnd::Dropped => return Ok(()),
                }
                let end = ending(shared, &mut txn, behavior());
                match finish(end, &mut reader, &mut writer).await? {
                    Some(reply) => reply,
                    None => return Ok(()),
                }
            }
            b"BDAT" => {
                let Some((size, last)) = bdat_args(&line) else {
                    writer.write_all(b"501 5.5.4 BDAT size [LAST]\r\n").await?;
                    writer.flush().await?;
                    continue;
                };
                let start = txn.chunks.len();
                txn.chunks.resize(start + size, 0);
                reader.read_exact(&mut txn.chunks[start..]).await?;
                if !last {
                    b"250 2.0.0 chunk ok\r\n"
                } else {
                    shared.chunked.fetch_add(1, Ordering::SeqCst);
                    let message = std::mem::take(&mut txn.chunks);
                    scan_headers(&message, &mut txn);
                    let end = ending(shared, &mut txn, behavior());
                    match finish(end, &mut reader, &mut writer).await? {
                        Some(reply) => reply,
                        None => return Ok(()),
                    }
                }
            }
            b"RSET" => {
                txn = Txn::default();
                b"250 2.0.0 ok\r\n"
            }
            b"NOOP" => b"250 2.0.0 ok\r\n",
            b"QUIT" => {
                writer.write_all(b"221 2.0.0 bye\r\n").await?;
                return writer.flush().await;
            }
            _ => b"502 5.5.2 command not recognized\r\n",
        };
        writer.write_all(reply).await?;
        // Pipelining: answer a batch of commands in one write.
        if reader.buffer().is_empty() {
            writer.flush().await?;
        }
    }
}

enum DataEnd {
    Complete,
    Dropped,
}

async fn receive_data<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    txn: &mut Txn,
    behavior: Behavior,
) -> std::io::Result<DataEnd> {
    let mut in_headers = true;
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        if read_line(reader, &mut line).await? == 0 {
            return Ok(DataEnd::Dropped);
        }
        let content = line.strip_suffix(b"\n").unwrap_or(&line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if content == b"." {
            return Ok(DataEnd::Complete);
        }
        if in_headers {
            if content.is_empty() {
                in_headers = false;
                if behavior == Behavior::DropMidData {
                    return Ok(DataEnd::Dropped);
                }
            } else {
                match message::parse_header(content) {
                    Some(BenchHeader::Id(id)) => txn.id = Some(id.to_string()),
                    Some(BenchHeader::Sent(t)) => txn.sent = Some(t),
                    None => {}
                }
            }
        }
    }
}

fn record(shared: &Shared, txn: Txn) {
    shared.transactions.fetch_add(1, Ordering::SeqCst);
    {
        let mut records = shared.records();
        match txn.id {
            Some(id) => {
                let arrival = records.by_id.entry(id).or_default();
                let first = arrival.deliveries == 0;
                arrival.deliveries += 1;
                arrival.recipients += txn.rcpts;
                if first {
                    shared.unique.fetch_add(1, Ordering::SeqCst);
                    if let Some(sent) = txn.sent {
                        records.latencies.push(message::since_micros(sent));
                    }
                }
            }
            None => records.anonymous += 1,
        }
    }
    shared
        .recipients
        .fetch_add(u64::from(txn.rcpts), Ordering::SeqCst);
    shared.changed.notify_waiters();
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
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
        let room = MAX_LINE.saturating_sub(out.len());
        out.extend_from_slice(&buf[..take.min(room)]);
        reader.consume(take);
        total += take;
        if done {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::client::Client;
    use super::*;

    #[tokio::test]
    async fn records_messages_and_duplicates() {
        tokio::time::timeout(Duration::from_secs(20), async {
            let sink = Sink::start().await.unwrap();
            let to = vec!["a@example.net".to_string(), "b@example.net".to_string()];
            let body = message::build("m-1", "s@example.test", &to, 1024, message::now_micros());
            let (mut c, greeting) = Client::connect(sink.addr(), Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(greeting.code, 220);
            assert_eq!(c.command("EHLO me").await.unwrap().code, 250);
            for _ in 0..2 {
                let r = c.send_mail("s@example.test", &to, &body).await.unwrap();
                assert_eq!(r.code, 250, "{r}");
            }
            c.quit().await;
            assert!(sink.wait_for(1, 4, Duration::from_secs(5)).await);
            let arrivals = sink.arrivals();
            assert_eq!(
                arrivals["m-1"],
                Arrival {
                    deliveries: 2,
                    recipients: 4
                }
            );
            assert_eq!(sink.take_latencies().len(), 1);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn misbehaves_on_request() {
        tokio::time::timeout(Duration::from_secs(20), async {
            let sink = Sink::start().await.unwrap();
            let to = vec!["a@example.net".to_string()];
            let body = message::build("m-2", "s@example.test", &to, 512, 0);

            sink.set_behavior(Behavior::Greeting421);
            let (_, greeting) = Client::connect(sink.addr(), Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(greeting.code, 421);

            sink.set_behavior(Behavior::Reply421AfterData);
            let (mut c, _) = Client::connect(sink.addr(), Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(
                c.send_mail("s@example.test", &to, &body)
                    .await
                    .unwrap()
                    .code,
                421
            );

            sink.set_behavior(Behavior::DropMidData);
            let (mut c, _) = Client::connect(sink.addr(), Duration::from_secs(5))
                .await
                .unwrap();
            assert!(c.send_mail("s@example.test", &to, &body).await.is_err());

            sink.set_behavior(Behavior::StallAfterData);
            let (mut c, _) = Client::connect(sink.addr(), Duration::from_millis(300))
                .await
                .unwrap();
            assert!(c.send_mail("s@example.test", &to, &body).await.is_err());

            assert_eq!(sink.unique(), 0);
            sink.set_behavior(Behavior::Accept);
            let (mut c, _) = Client::connect(sink.addr(), Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(
                c.send_mail("s@example.test", &to, &body)
                    .await
                    .unwrap()
                    .code,
                250
            );
            assert_eq!(sink.unique(), 1);
        })
        .await
        .unwrap();
    }
}
