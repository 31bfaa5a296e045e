//! An in-process authoritative DNS server with records set at runtime.
//!
//! The relay resolves MX/A/AAAA (delivery) and the operator reads TXT
//! (DKIM/SPF/DMARC verification); tests point them at this server instead of
//! the internet. It answers on UDP and TCP at 127.0.0.1:PORT from a shared
//! table the test edits while the server runs, and can be told to fail a name
//! with NXDOMAIN, SERVFAIL, or no answer at all (a timeout for the client).
//!
//! ```no_run
//! # async fn f() -> Result<(), petrel_tests::dns::DnsError> {
//! use petrel_tests::dns::{DnsServer, Failure};
//! let dns = DnsServer::start().await?;
//! dns.add_mx("example.org", 10, "mx1.example.org");
//! dns.add_a("mx1.example.org", "127.0.0.1".parse().unwrap());
//! dns.add_txt("sel._domainkey.example.org", "v=DKIM1; k=ed25519; p=...");
//! dns.set_failure("broken.example", Failure::ServFail);
//! let addr = dns.addr(); // give this to the resolver under test
//! # Ok(()) }
//! ```
//!
//! Names are case-insensitive, with or without the trailing dot. A name with
//! no records at all gets NXDOMAIN; a name with records of other types gets
//! an empty NOERROR answer (NODATA). Records carry TTL 0 by default so a
//! caching resolver sees runtime changes; see [`DnsServer::set_ttl`].

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use hickory_proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};

use crate::ports;

/// Errors from starting the DNS server.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// Could not bind UDP and TCP on the same free port.
    #[error("binding DNS server on 127.0.0.1: {0}")]
    Bind(#[source] std::io::Error),
    /// No free port could be found.
    #[error(transparent)]
    Port(#[from] ports::PortError),
}

/// How the server fails a name, instead of answering from its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// RCODE 3: the name does not exist (a permanent failure for mail).
    NxDomain,
    /// RCODE 2: the server failed (a temporary failure for mail).
    ServFail,
    /// No reply at all: the client's query times out.
    Timeout,
}

/// What the server knows about one name.
#[derive(Debug, Default, Clone)]
struct Entry {
    records: Vec<RData>,
    failure: Option<Failure>,
}

#[derive(Debug)]
struct Zone {
    names: HashMap<String, Entry>,
    ttl: u32,
    queries: Vec<(String, RecordType)>,
}

/// Lowercase, without trailing dot: the table key for a name.
fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Split a TXT value into DNS character-strings of at most 255 bytes each,
/// as publishers must for DKIM keys longer than 255 bytes.
pub fn split_txt(value: &str) -> Vec<&[u8]> {
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return vec![bytes];
    }
    bytes.chunks(255).collect()
}

/// What to do with one query: a pure decision over the table.
#[derive(Debug, PartialEq)]
enum Answer {
    Records(Vec<RData>),
    Code(ResponseCode),
    Silence,
}

fn decide(zone: &Zone, name: &str, qtype: RecordType) -> Answer {
    let Some(entry) = zone.names.get(&key(name)) else {
        return Answer::Code(ResponseCode::NXDomain);
    };
    match entry.failure {
        Some(Failure::NxDomain) => return Answer::Code(ResponseCode::NXDomain),
        Some(Failure::ServFail) => return Answer::Code(ResponseCode::ServFail),
        Some(Failure::Timeout) => return Answer::Silence,
        None => {}
    }
    if entry.records.is_empty() {
        return Answer::Code(ResponseCode::NXDomain);
    }
    let matching: Vec<RData> = entry
        .records
        .iter()
        .filter(|r| {
            r.record_type() == qtype
                || qtype == RecordType::ANY
                || r.record_type() == RecordType::CNAME
        })
        .cloned()
        .collect();
    Answer::Records(matching)
}

/// The hickory request handler over the shared table.
struct Handler {
    zone: Arc<RwLock<Zone>>,
}

/// The header we report back to hickory when we send nothing.
fn silent_info(request: &Request) -> ResponseInfo {
    ResponseInfo::from(Header {
        metadata: Metadata::response_from_request(&request.metadata),
        counts: HeaderCounts::default(),
    })
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let Some(query) = request.queries.queries().first() else {
            let msg = builder.error_msg(&request.metadata, ResponseCode::FormErr);
            return match response_handle.send_response(msg).await {
                Ok(info) => info,
                Err(_) => silent_info(request),
            };
        };
        let qname: Name = query.name().into();
        let qtype = query.query_type();
        let (answer, ttl) = {
            let mut zone = self.zone.write().unwrap_or_else(PoisonError::into_inner);
            zone.queries.push((key(&qname.to_ascii()), qtype));
            (decide(&zone, &qname.to_ascii(), qtype), zone.ttl)
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let result = match answer {
            Answer::Silence => return silent_info(request),
            Answer::Code(code) => {
                let mut msg = builder.error_msg(&request.metadata, code);
                msg.metadata_mut().authoritative = true;
                response_handle.send_response(msg).await
            }
            Answer::Records(rdatas) => {
                let records: Vec<Record> = rdatas
                    .into_iter()
                    .map(|rdata| Record::from_rdata(qname.clone(), ttl, rdata))
                    .collect();
                let msg = builder.build(metadata, records.iter(), [], [], []);
                response_handle.send_response(msg).await
            }
        };
        result.unwrap_or_else(|_| silent_info(request))
    }
}

/// A running DNS server; stops when dropped.
pub struct DnsServer {
    addr: SocketAddr,
    zone: Arc<RwLock<Zone>>,
    _server: Server<Handler>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl DnsServer {
    /// Bind UDP and TCP on one free port of 127.0.0.1 and start serving an
    /// empty table. Must be called inside a tokio runtime.
    pub async fn start() -> Result<Self, DnsError> {
        let (udp, tcp) = bind_pair().await?;
        let addr = udp.local_addr().map_err(DnsError::Bind)?;
        let zone = Arc::new(RwLock::new(Zone {
            names: HashMap::new(),
            ttl: 0,
            queries: Vec::new(),
        }));
        let mut server = Server::new(Handler { zone: zone.clone() });
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(10), 32);
        Ok(Self {
            addr,
            zone,
            _server: server,
        })
    }

    /// `127.0.0.1:PORT`, the same port for UDP and TCP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TTL for answers from now on (default 0: never cached).
    pub fn set_ttl(&self, ttl: u32) {
        self.with_zone(|z| z.ttl = ttl);
    }

    /// Add an MX record: `add_mx("example.org", 10, "mx1.example.org")`.
    /// An invalid exchange name is a bug in the test and panics.
    pub fn add_mx(&self, domain: &str, preference: u16, exchange: &str) {
        let exchange = fqdn(exchange);
        self.add(domain, RData::MX(MX::new(preference, exchange)));
    }

    /// Add an A record.
    pub fn add_a(&self, name: &str, ip: Ipv4Addr) {
        self.add(name, RData::A(A(ip)));
    }

    /// Add an AAAA record.
    pub fn add_aaaa(&self, name: &str, ip: Ipv6Addr) {
        self.add(name, RData::AAAA(AAAA(ip)));
    }

    /// Add a TXT record; values over 255 bytes are split into several
    /// character-strings (clients concatenate them back).
    pub fn add_txt(&self, name: &str, value: &str) {
        self.add(name, RData::TXT(TXT::from_bytes(split_txt(value))));
    }

    /// Add a CNAME record (returned for every query type of `name`).
    pub fn add_cname(&self, name: &str, target: &str) {
        self.add(name, RData::CNAME(CNAME(fqdn(target))));
    }

    /// Add any record data, for types without a helper.
    pub fn add(&self, name: &str, rdata: RData) {
        self.with_zone(|z| z.names.entry(key(name)).or_default().records.push(rdata));
    }

    /// Fail every query for `name` (records stay, and come back after [`clear_failure`](Self::clear_failure)).
    pub fn set_failure(&self, name: &str, failure: Failure) {
        self.with_zone(|z| z.names.entry(key(name)).or_default().failure = Some(failure));
    }

    /// Answer `name` from its records again.
    pub fn clear_failure(&self, name: &str) {
        self.with_zone(|z| {
            if let Some(e) = z.names.get_mut(&key(name)) {
                e.failure = None;
            }
        });
    }

    /// Forget `name` entirely (records and failure): it becomes NXDOMAIN.
    pub fn clear(&self, name: &str) {
        self.with_zone(|z| {
            z.names.remove(&key(name));
        });
    }

    /// Remove `name`'s records of one type, e.g. to replace a TXT record.
    pub fn remove(&self, name: &str, rtype: RecordType) {
        self.with_zone(|z| {
            if let Some(e) = z.names.get_mut(&key(name)) {
                e.records.retain(|r| r.record_type() != rtype);
            }
        });
    }

    /// Every query received so far, as (lowercase name without dot, type).
    pub fn queries(&self) -> Vec<(String, RecordType)> {
        self.with_zone(|z| z.queries.clone())
    }

    fn with_zone<T>(&self, f: impl FnOnce(&mut Zone) -> T) -> T {
        let mut zone = self.zone.write().unwrap_or_else(PoisonError::into_inner);
        f(&mut zone)
    }
}

/// A fully qualified name from test input; panics on a malformed name
/// because that is a mistake in the test, not a runtime condition.
fn fqdn(name: &str) -> Name {
    let mut n = Name::from_ascii(name).unwrap_or_else(|e| panic!("bad DNS name {name:?}: {e}"));
    n.set_fqdn(true);
    n
}

/// UDP and TCP on the same port; retried because another process may take
/// the UDP or TCP side of a "free" port in between.
async fn bind_pair() -> Result<(UdpSocket, TcpListener), DnsError> {
    let mut last = None;
    for _ in 0..20 {
        let port = ports::try_free_port()?;
        match (
            UdpSocket::bind(("127.0.0.1", port)).await,
            TcpListener::bind(("127.0.0.1", port)).await,
        ) {
            (Ok(u), Ok(t)) => return Ok((u, t)),
            (Err(e), _) | (_, Err(e)) => last = Some(e),
        }
    }
    Err(DnsError::Bind(
        last.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Zone {
        Zone {
            names: HashMap::new(),
            ttl: 0,
            queries: Vec::new(),
        }
    }

    #[test]
    fn splits_long_txt_into_255_byte_strings() {
        let long = "a".repeat(600);
        let parts = split_txt(&long);
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            vec![255, 255, 90]
        );
        assert_eq!(split_txt("short"), vec![b"short".as_slice()]);
        assert_eq!(split_txt("").len(), 1);
    }

    #[test]
    fn decides_nxdomain_nodata_and_failures() {
        let mut z = zone();
        assert_eq!(
            decide(&z, "a.test", RecordType::A),
            Answer::Code(ResponseCode::NXDomain)
        );
        z.names
            .entry(key("A.Test."))
            .or_default()
            .records
            .push(RData::A(A([127, 0, 0, 1].into())));
        assert_eq!(
            decide(&z, "a.test.", RecordType::A),
            Answer::Records(vec![RData::A(A([127, 0, 0, 1].into()))])
        );
        assert_eq!(
            decide(&z, "a.test", RecordType::MX),
            Answer::Records(vec![])
        );
        z.names.get_mut("a.test").unwrap().failure = Some(Failure::Timeout);
        assert_eq!(decide(&z, "a.test", RecordType::A), Answer::Silence);
        z.names.get_mut("a.test").unwrap().failure = Some(Failure::ServFail);
        assert_eq!(
            decide(&z, "a.test", RecordType::A),
            Answer::Code(ResponseCode::ServFail)
        );
    }
}
