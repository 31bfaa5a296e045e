//! TXT lookups for record verification, through hickory-resolver against
//! configurable nameservers (`--dns-server`), or the system's resolv.conf.
//!
//! Controllers depend on the [`TxtLookup`] trait so reconcile tests can answer
//! from a table, while DNS tests run [`HickoryTxtLookup`] against a real
//! in-process DNS server.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::future::BoxFuture;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};

use crate::dns_record::TxtAnswer;

/// Looks up the TXT records at a name.
pub trait TxtLookup: Send + Sync {
    /// The TXT records at `name` (each record's strings concatenated), or why there are none.
    fn lookup_txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, TxtAnswer>;

    /// The CNAME target at `name` (without trailing dot), as a one-record answer.
    fn lookup_cname<'a>(&'a self, name: &'a str) -> BoxFuture<'a, TxtAnswer> {
        let _ = name;
        Box::pin(async { TxtAnswer::Failed("CNAME lookups not supported".into()) })
    }

    /// The MX records at `name`, each as `<preference> <exchange>` (exchange
    /// without trailing dot).
    fn lookup_mx<'a>(&'a self, name: &'a str) -> BoxFuture<'a, TxtAnswer> {
        let _ = name;
        Box::pin(async { TxtAnswer::Failed("MX lookups not supported".into()) })
    }
}

/// Errors building a resolver.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// No nameserver given and none in /etc/resolv.conf.
    #[error("no DNS nameservers: pass --dns-server or provide /etc/resolv.conf")]
    NoNameservers,
    /// The resolver could not be built.
    #[error("building resolver: {0}")]
    Build(String),
}

/// hickory-resolver with caching off, so a record published a minute ago is seen.
pub struct HickoryTxtLookup {
    resolver: TokioResolver,
}

impl HickoryTxtLookup {
    /// A resolver asking `servers` (ip:port), or the system nameservers when empty.
    pub fn new(servers: &[SocketAddr], timeout: Duration) -> Result<Self, DnsError> {
        let servers = if servers.is_empty() {
            let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            parse_resolv_conf(&text)
        } else {
            servers.to_vec()
        };
        if servers.is_empty() {
            return Err(DnsError::NoNameservers);
        }
        let name_servers = servers
            .iter()
            .map(|addr| {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
            })
            .collect();
        let mut opts = ResolverOpts::default();
        opts.timeout = timeout;
        opts.attempts = 1;
        opts.cache_size = 0;
        let resolver = Resolver::builder_with_config(
            ResolverConfig::from_name_servers(name_servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()
        .map_err(|e| DnsError::Build(e.to_string()))?;
        Ok(Self { resolver })
    }
}

impl TxtLookup for HickoryTxtLookup {
    fn lookup_txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, TxtAnswer> {
        Box::pin(async move {
            // Fully qualified, so no search domain is tried.
            let fqdn = format!("{}.", name.trim_end_matches('.'));
            match self.resolver.lookup(fqdn.as_str(), RecordType::TXT).await {
                Ok(lookup) => {
                    let records: Vec<String> = lookup
                        .answers()
                        .iter()
                        .filter_map(|record| match &record.data {
                            RData::TXT(txt) => Some(
                                txt.txt_data
                                    .iter()
                                    .map(|s| String::from_utf8_lossy(s))
                                    .collect::<String>(),
                            ),
                            _ => None,
                        })
                        .collect();
                    if records.is_empty() {
                        TxtAnswer::NotFound
                    } else {
                        TxtAnswer::Records(records)
                    }
                }
                Err(err) if err.is_nx_domain() || err.is_no_records_found() => TxtAnswer::NotFound,
                Err(err) => TxtAnswer::Failed(err.to_string()),
            }
        })
    }

    fn lookup_cname<'a>(&'a self, name: &'a str) -> BoxFuture<'a, TxtAnswer> {
        Box::pin(self.cname(name))
    }

    fn lookup_mx<'a>(&'a self, name: &'a str) -> BoxFuture<'a, TxtAnswer> {
        Box::pin(self.mx(name))
    }
}

impl HickoryTxtLookup {
    async fn mx(&self, name: &str) -> TxtAnswer {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.resolver.lookup(fqdn.as_str(), RecordType::MX).await {
            Ok(lookup) => {
                let records: Vec<String> = lookup
                    .answers()
                    .iter()
                    .filter_map(|record| match &record.data {
                        RData::MX(mx) => Some(format!(
                            "{} {}",
                            mx.preference,
                            mx.exchange.to_ascii().trim_end_matches('.')
                        )),
                        _ => None,
                    })
                    .collect();
                if records.is_empty() {
                    TxtAnswer::NotFound
                } else {
                    TxtAnswer::Records(records)
                }
            }
            Err(err) if err.is_nx_domain() || err.is_no_records_found() => TxtAnswer::NotFound,
            Err(err) => TxtAnswer::Failed(err.to_string()),
        }
    }

    async fn cname(&self, name: &str) -> TxtAnswer {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.resolver.lookup(fqdn.as_str(), RecordType::CNAME).await {
            Ok(lookup) => {
                let targets: Vec<String> = lookup
                    .answers()
                    .iter()
                    .filter_map(|record| match &record.data {
                        RData::CNAME(target) => {
                            Some(target.0.to_ascii().trim_end_matches('.').to_string())
                        }
                        _ => None,
                    })
                    .collect();
                if targets.is_empty() {
                    TxtAnswer::NotFound
                } else {
                    TxtAnswer::Records(targets)
                }
            }
            Err(err) if err.is_nx_domain() || err.is_no_records_found() => TxtAnswer::NotFound,
            Err(err) => TxtAnswer::Failed(err.to_string()),
        }
    }
}

/// The `nameserver` entries of a resolv.conf, on port 53.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|ip| ip.split('%').next()?.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

/// A [`TxtLookup`] answering from a fixed table, for tests of the controllers.
#[derive(Default)]
pub struct StaticTxt(pub std::sync::Mutex<std::collections::BTreeMap<String, TxtAnswer>>);

impl StaticTxt {
    /// Serve `answer` at `name`.
    pub fn set(&self, name: &str, answer: TxtAnswer) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.trim_end_matches('.').to_string(), answer);
    }

    /// Serve `answer` as the MX records at `name`.
    pub fn set_mx(&self, name: &str, answer: TxtAnswer) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(mx_key(name), answer);
    }
}

fn mx_key(name: &str) -> String {
    format!("MX {}", name.trim_end_matches('.'))
}

impl TxtLookup for StaticTxt {
    fn lookup_txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, TxtAnswer> {
        let answer = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name.trim_end_matches('.'))
            .cloned()
            .unwrap_or(TxtAnswer::NotFound);
        Box::pin(async move { answer })
    }

    /// The same table: a test sets the CNAME target as the one record.
    fn lookup_cname<'a>(&'a self, name: &'a str) -> BoxFuture<'a, TxtAnswer> {
        self.lookup_txt(name)
    }

    /// The same table, under `MX <name>` (a return-path domain has both SPF and MX).
    fn lookup_mx<'a>(&'a self, name: &'a str) -> BoxFuture<'a, TxtAnswer> {
        let answer = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&mx_key(name))
            .cloned()
            .unwrap_or(TxtAnswer::NotFound);
        Box::pin(async move { answer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# comment\nsearch svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\noptions ndots:5\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "10.96.0.10:53".parse::<SocketAddr>().expect("addr"),
                "[fe80::1]:53".parse().expect("addr")
            ]
        );
    }
}
