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

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, NS, TLSA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};

use crate::dnssec::{self, ZoneKey};
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
    /// Signed zones by apex (table key), see [`crate::dnssec`].
    keys: HashMap<String, Arc<ZoneKey>>,
    /// Names whose signatures are served corrupted (bogus answers).
    corrupt: HashSet<String>,
}

/// The parent of a table key (`"a.b"` -> `"b"`, `"b"` -> `""`, the root).
fn parent(name: &str) -> Option<&str> {
    if name.is_empty() {
        return None;
    }
    Some(name.split_once('.').map_or("", |(_, rest)| rest))
}

/// The key that signs answers for `name` and `qtype`: the closest signed
/// apex at or above it, unless a delegation (NS, no key) comes first. A DS
/// query at a delegation belongs to the parent side.
fn signing_key(zone: &Zone, name: &str, qtype: RecordType) -> Option<Arc<ZoneKey>> {
    let mut at = key(name);
    let mut first = true;
    loop {
        if let Some(k) = zone.keys.get(&at) {
            return Some(k.clone());
        }
        let is_cut = zone
            .names
            .get(&at)
            .is_some_and(|e| e.records.iter().any(|r| r.record_type() == RecordType::NS));
        if is_cut && !(first && qtype == RecordType::DS) {
            return None;
        }
        at = parent(&at)?.to_string();
        first = false;
    }
}

/// The types an NSEC at `name` lists for a NODATA answer: the parent side
/// of a delegation knows only its NS.
fn nsec_types(zone: &Zone, name: &str, qtype: RecordType) -> Vec<RecordType> {
    let records = zone
        .names
        .get(&key(name))
        .map(|e| e.records.as_slice())
        .unwrap_or(&[]);
    let is_cut = records.iter().any(|r| r.record_type() == RecordType::NS)
        && !zone.keys.contains_key(&key(name));
    if is_cut && qtype == RecordType::DS {
        return vec![RecordType::NS];
    }
    let mut types: Vec<RecordType> = records.iter().map(RData::record_type).collect();
    types.sort_by_key(|t| u16::from(*t));
    types.dedup();
    types
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
        let dnssec_ok = request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok);
        let (answer, ttl, signing, corrupt, types) = {
            let mut zone = self.zone.write().unwrap_or_else(PoisonError::into_inner);
            zone.queries.push((key(&qname.to_ascii()), qtype));
            let name = qname.to_ascii();
            let signing = signing_key(&zone, &name, qtype).filter(|_| dnssec_ok);
            (
                decide(&zone, &name, qtype),
                zone.ttl,
                signing,
                zone.corrupt.contains(&key(&name)),
                nsec_types(&zone, &name, qtype),
            )
        };
        let mut response_edns = Edns::new();
        response_edns.set_dnssec_ok(dnssec_ok);
        // The client's buffer size, as a real server answers (UDP replies
        // beyond it are truncated and retried over TCP).
        if let Some(e) = request.edns.as_ref() {
            response_edns.set_max_payload(e.max_payload());
        }
        let mut builder = builder;
        if request.edns.is_some() {
            builder.edns(&response_edns);
        }
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
                let mut authorities = Vec::new();
                let mut signatures = Vec::new();
                if let Some(k) = &signing {
                    if rdatas.is_empty() {
                        let proof = dnssec::nsec(&qname, ttl, types);
                        signatures.extend(k.sign(
                            &qname,
                            ttl,
                            std::slice::from_ref(&proof.data),
                            corrupt,
                        ));
                        authorities.push(proof);
                    } else {
                        let mut by_type: Vec<RecordType> =
                            rdatas.iter().map(RData::record_type).collect();
                        by_type.dedup();
                        for t in by_type {
                            let set: Vec<RData> = rdatas
                                .iter()
                                .filter(|r| r.record_type() == t)
                                .cloned()
                                .collect();
                            signatures.extend(k.sign(&qname, ttl, &set, corrupt));
                        }
                    }
                }
                let mut records: Vec<Record> = rdatas
                    .into_iter()
                    .map(|rdata| Record::from_rdata(qname.clone(), ttl, rdata))
                    .collect();
                if authorities.is_empty() {
                    records.extend(signatures);
                } else {
                    authorities.extend(signatures);
                }
                let msg = builder.build(metadata, records.iter(), authorities.iter(), [], []);
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
            keys: HashMap::new(),
            corrupt: HashSet::new(),
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

    /// Add an NS record: below a signed zone, a delegation to an unsigned
    /// child (see [`crate::dnssec`]).
    pub fn add_ns(&self, name: &str, target: &str) {
        self.add(name, RData::NS(NS(fqdn(target))));
    }

    /// Add a TLSA record (`usage selector matching data`).
    pub fn add_tlsa(&self, name: &str, usage: u8, selector: u8, matching: u8, data: Vec<u8>) {
        self.add(
            name,
            RData::TLSA(TLSA::new(
                usage.into(),
                selector.into(),
                matching.into(),
                data,
            )),
        );
    }

    /// Sign the zone at `apex` (`"dane.test"`, `"."`) with a fresh key,
    /// published as its DNSKEY: queries with the DNSSEC OK bit get RRSIGs,
    /// and NODATA answers a signed NSEC. Returns the key, whose
    /// [`ZoneKey::anchor_line`] the validating resolver must trust.
    pub fn sign_zone(&self, apex: &str) -> Result<Arc<ZoneKey>, dnssec::DnssecError> {
        let zone_key = Arc::new(ZoneKey::generate(apex)?);
        let dnskey = RData::DNSSEC(hickory_proto::dnssec::rdata::DNSSECRData::DNSKEY(
            zone_key.dnskey(),
        ));
        let k = key(apex);
        self.with_zone(|z| {
            z.names.entry(k.clone()).or_default().records.push(dnskey);
            z.keys.insert(k, zone_key.clone());
        });
        Ok(zone_key)
    }

    /// Serve `name`'s signatures with a flipped bit: validation fails
    /// (a bogus answer, as an attacker's forgery would be).
    pub fn corrupt_signatures(&self, name: &str) {
        self.with_zone(|z| z.corrupt.insert(key(name)));
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
            keys: HashMap::new(),
            corrupt: HashSet::new(),
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
