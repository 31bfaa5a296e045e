//! Where mail for a domain goes: MX records in preference order, or the
//! domain's own address when it has no MX (RFC 5321 5.1).
//!
//! DNS answers map to delivery outcomes here: NXDOMAIN and null MX (RFC
//! 7505) are permanent (the domain cannot receive mail), SERVFAIL and
//! timeouts are temporary (DNS trouble must never bounce mail).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::config::{LookupIpStrategy, ResolveHosts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use rand::seq::SliceRandom;

use super::classify::Fault;

/// A server to try, with its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MxHost {
    /// Host name (for logs, TLS SNI, DSN `Remote-MTA`), without the final dot.
    pub name: String,
    /// Addresses, IPv4 first then IPv6 (the order the resolver returned).
    pub addrs: Vec<IpAddr>,
}

/// Why a resolver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MxError {
    /// The resolver rejected its configuration.
    #[error("cannot build DNS resolver: {0}")]
    Resolver(String),
    /// No nameserver configured and none in /etc/resolv.conf.
    #[error("no nameservers configured and none found in /etc/resolv.conf")]
    NoNameservers,
}

/// Per-query timeout and attempts: short enough that a dead nameserver
/// defers a unit in seconds, not minutes.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
const DNS_ATTEMPTS: usize = 2;

/// Nameservers from `/etc/resolv.conf` (port 53), for when the config
/// names none. Read by hand: hickory's system-config feature pulls more
/// than this needs.
fn system_nameservers() -> Vec<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(ip)) => {
                    // Drop an IPv6 zone (`fe80::1%eth0`), which IpAddr cannot parse.
                    let ip = ip.split('%').next().unwrap_or(ip);
                    ip.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
                }
                _ => None,
            }
        })
        .collect()
}

/// A resolver asking `nameservers` (the system's when empty), over UDP
/// with TCP fallback, ignoring /etc/hosts (mail routing is DNS only).
pub fn build_resolver(nameservers: &[SocketAddr]) -> Result<TokioResolver, MxError> {
    builder(nameservers)?
        .build()
        .map_err(|e| MxError::Resolver(e.to_string()))
}

/// As [`build_resolver`], validating answers with DNSSEC from `anchors`
/// (DANE's resolver: every record carries its proof).
pub fn build_validating_resolver(
    nameservers: &[SocketAddr],
    anchors: std::sync::Arc<hickory_resolver::proto::dnssec::TrustAnchors>,
) -> Result<TokioResolver, MxError> {
    let mut builder = builder(nameservers)?.with_trust_anchor(anchors);
    builder.options_mut().validate = true;
    builder
        .build()
        .map_err(|e| MxError::Resolver(e.to_string()))
}

fn builder(
    nameservers: &[SocketAddr],
) -> Result<hickory_resolver::ResolverBuilder<TokioRuntimeProvider>, MxError> {
    let servers = if nameservers.is_empty() {
        system_nameservers()
    } else {
        nameservers.to_vec()
    };
    if servers.is_empty() {
        return Err(MxError::NoNameservers);
    }
    let configs = servers
        .iter()
        .map(|addr| {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
        })
        .collect();
    let config = ResolverConfig::from_parts(None, vec![], configs);
    let mut opts = ResolverOpts::default();
    opts.timeout = DNS_TIMEOUT;
    opts.attempts = DNS_ATTEMPTS;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.ndots = 0;
    Ok(
        TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts),
    )
}

/// MX records in delivery order: lowest preference first, equal
/// preferences shuffled so load spreads over them (RFC 5321 5.1).
pub fn order_mx<R: rand::Rng + ?Sized>(
    mut records: Vec<(u16, String)>,
    rng: &mut R,
) -> Vec<String> {
    records.sort_by_key(|(pref, _)| *pref);
    // A host listed twice keeps its best preference only.
    let mut seen = std::collections::HashSet::new();
    records.retain(|(_, name)| seen.insert(name.clone()));
    let mut out = Vec::with_capacity(records.len());
    let mut i = 0;
    while i < records.len() {
        let pref = records[i].0;
        let mut j = i;
        while j < records.len() && records[j].0 == pref {
            j += 1;
        }
        let mut group: Vec<String> = records[i..j].iter().map(|(_, n)| n.clone()).collect();
        group.shuffle(rng);
        out.extend(group);
        i = j;
    }
    out
}

/// What the MX records say, before any address lookups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MxAnswer {
    /// Exchanges in delivery order.
    Hosts(Vec<String>),
    /// A single `.` exchange: the domain accepts no mail (RFC 7505).
    NullMx,
    /// No MX records: deliver to the domain itself.
    Implicit,
}

/// Interprets MX records (preference, exchange; root as `""`).
pub fn interpret_mx<R: rand::Rng + ?Sized>(records: Vec<(u16, String)>, rng: &mut R) -> MxAnswer {
    if records.is_empty() {
        return MxAnswer::Implicit;
    }
    // RFC 7505 3: a null MX is the only record; if a domain mixes one with
    // real MXes, the real ones are used.
    let real: Vec<(u16, String)> = records.into_iter().filter(|(_, n)| !n.is_empty()).collect();
    if real.is_empty() {
        return MxAnswer::NullMx;
    }
    MxAnswer::Hosts(order_mx(real, rng))
}

fn is_timeout(e: &NetError) -> bool {
    matches!(e, NetError::Timeout)
}

fn temporary(what: &str, e: &NetError) -> Fault {
    if is_timeout(e) {
        Fault::DnsTemporary(format!("{what}: timed out"))
    } else {
        Fault::DnsTemporary(format!("{what}: {e}"))
    }
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

/// Addresses of `host`, or `Ok(empty)` when it has none.
async fn addresses(resolver: &TokioResolver, host: &str) -> Result<Vec<IpAddr>, Fault> {
    match resolver.lookup_ip(fqdn(host).as_str()).await {
        Ok(ips) => Ok(ips.iter().collect()),
        Err(e) if e.is_nx_domain() => Err(Fault::DnsPermanent {
            status: "5.1.2",
            reason: format!("host {host} not found (NXDOMAIN)"),
        }),
        Err(e) if e.is_no_records_found() => Ok(Vec::new()),
        Err(e) => Err(temporary(&format!("address of {host}"), &e)),
    }
}

/// The servers to try for `domain`, in order.
pub async fn resolve(resolver: &TokioResolver, domain: &str) -> Result<Vec<MxHost>, Fault> {
    let answer = match resolver.mx_lookup(fqdn(domain).as_str()).await {
        Ok(lookup) => {
            let records: Vec<(u16, String)> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => {
                        let name = mx.exchange.to_ascii();
                        Some((
                            mx.preference,
                            name.trim_end_matches('.').to_ascii_lowercase(),
                        ))
                    }
                    _ => None,
                })
                .collect();
            interpret_mx(records, &mut rand::rng())
        }
        Err(e) if e.is_nx_domain() => {
            return Err(Fault::DnsPermanent {
                status: "5.1.2",
                reason: format!("domain {domain} not found (NXDOMAIN)"),
            });
        }
        Err(e) if e.is_no_records_found() => MxAnswer::Implicit,
        Err(e) => return Err(temporary(&format!("MX of {domain}"), &e)),
    };
    match answer {
        MxAnswer::NullMx => Err(Fault::DnsPermanent {
            status: "5.1.10",
            reason: format!("domain {domain} accepts no mail (null MX)"),
        }),
        MxAnswer::Implicit => {
            let addrs = addresses(resolver, domain).await?;
            if addrs.is_empty() {
                return Err(Fault::DnsPermanent {
                    status: "5.1.2",
                    reason: format!("domain {domain} has no MX and no address"),
                });
            }
            Ok(vec![MxHost {
                name: domain.trim_end_matches('.').to_string(),
                addrs,
            }])
        }
        MxAnswer::Hosts(names) => {
            let mut hosts = Vec::with_capacity(names.len());
            let mut last_error = None;
            for name in names {
                match addresses(resolver, &name).await {
                    Ok(addrs) if !addrs.is_empty() => hosts.push(MxHost { name, addrs }),
                    Ok(_) => {
                        last_error = Some(Fault::DnsTemporary(format!(
                            "MX host {name} has no address"
                        )))
                    }
                    // An MX pointing nowhere is a misconfiguration the
                    // domain may fix: skip the host, and if none is left,
                    // defer rather than bounce.
                    Err(Fault::DnsPermanent { reason, .. }) => {
                        last_error = Some(Fault::DnsTemporary(reason))
                    }
                    Err(e) => last_error = Some(e),
                }
            }
            if hosts.is_empty() {
                return Err(last_error.unwrap_or_else(|| {
                    Fault::DnsTemporary(format!("no usable MX host for {domain}"))
                }));
            }
            Ok(hosts)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn recs(list: &[(u16, &str)]) -> Vec<(u16, String)> {
        list.iter().map(|(p, n)| (*p, n.to_string())).collect()
    }

    #[test]
    fn mx_in_preference_order_shuffled_among_equals() {
        let records = recs(&[(20, "c"), (10, "a"), (10, "b"), (30, "d"), (10, "a")]);
        let mut seen_first = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let order = order_mx(records.clone(), &mut rng);
            // a and b (preference 10) first, in some order; then c; then d.
            assert_eq!(order.len(), 4, "{order:?}");
            assert!(order[..2].contains(&"a".to_string()) && order[..2].contains(&"b".to_string()));
            assert_eq!(&order[2..], ["c", "d"]);
            seen_first.insert(order[0].clone());
        }
        assert_eq!(seen_first.len(), 2, "equal preferences must be randomised");
    }

    #[test]
    fn null_mx_and_implicit_mx() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(interpret_mx(vec![], &mut rng), MxAnswer::Implicit);
        assert_eq!(interpret_mx(recs(&[(0, "")]), &mut rng), MxAnswer::NullMx);
        assert_eq!(
            interpret_mx(recs(&[(0, ""), (10, "mx")]), &mut rng),
            MxAnswer::Hosts(vec!["mx".into()])
        );
    }

    #[test]
    fn resolver_builds_with_explicit_nameservers() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let ns: SocketAddr = "127.0.0.1:5353".parse().unwrap();
            assert!(build_resolver(&[ns]).is_ok());
        });
    }
}
