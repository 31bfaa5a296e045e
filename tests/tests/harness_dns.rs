//! Tests of the in-process DNS server, queried with hickory-resolver over
//! real UDP and TCP on 127.0.0.1.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use petrel_tests::dns::{DnsServer, Failure};

const LIMIT: Duration = Duration::from_secs(30);

/// A resolver that asks only `addr`, over one transport, without search
/// domains; short timeout and a single attempt so the timeout case is quick.
fn resolver(addr: SocketAddr, tcp: bool) -> TokioResolver {
    let mut conn = if tcp {
        ConnectionConfig::tcp()
    } else {
        ConnectionConfig::udp()
    };
    conn.port = addr.port();
    let ns = NameServerConfig::new(addr.ip(), true, vec![conn]);
    let config = ResolverConfig::from_name_servers(vec![ns]);
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_millis(500);
    opts.attempts = 1;
    opts.cache_size = 0;
    Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .expect("resolver")
}

fn response_code(err: &NetError) -> Option<ResponseCode> {
    match err {
        NetError::Dns(hickory_resolver::net::DnsError::ResponseCode(code)) => Some(*code),
        NetError::Dns(hickory_resolver::net::DnsError::NoRecordsFound(nr)) => {
            Some(nr.response_code)
        }
        _ => None,
    }
}

async fn check_records(tcp: bool) {
    let dns = DnsServer::start().await.unwrap();
    dns.add_mx("Example.org.", 10, "mx1.example.org");
    dns.add_mx("example.org", 20, "mx2.example.org");
    dns.add_a("mx1.example.org", Ipv4Addr::LOCALHOST);
    dns.add_aaaa("mx1.example.org", Ipv6Addr::LOCALHOST);
    let dkim = format!("v=DKIM1; k=rsa; p={}", "A".repeat(400));
    dns.add_txt("sel._domainkey.example.org", &dkim);
    let r = resolver(dns.addr(), tcp);

    let mx = r.mx_lookup("example.org.").await.unwrap();
    let mut got: Vec<(u16, String)> = mx
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
            _ => None,
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (10, "mx1.example.org.".into()),
            (20, "mx2.example.org.".into())
        ]
    );

    let a = r.ipv4_lookup("mx1.example.org.").await.unwrap();
    assert!(
        a.answers()
            .iter()
            .any(|rec| matches!(&rec.data, RData::A(a) if a.0 == Ipv4Addr::LOCALHOST))
    );
    let aaaa = r.ipv6_lookup("mx1.example.org.").await.unwrap();
    assert!(
        aaaa.answers()
            .iter()
            .any(|rec| matches!(&rec.data, RData::AAAA(a) if a.0 == Ipv6Addr::LOCALHOST))
    );

    let txt = r.txt_lookup("sel._domainkey.example.org.").await.unwrap();
    let parts: Vec<Vec<u8>> = txt
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::TXT(t) => Some(t.txt_data.iter().map(|s| s.to_vec()).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(parts.len() >= 2, "long TXT is split");
    assert!(parts.iter().all(|p| p.len() <= 255));
    assert_eq!(parts.concat(), dkim.as_bytes());

    assert!(
        dns.queries()
            .contains(&("example.org".to_string(), RecordType::MX))
    );
}

#[tokio::test]
async fn harness_dns_answers_mx_a_aaaa_txt_over_udp() {
    tokio::time::timeout(LIMIT, check_records(false))
        .await
        .expect("test timed out");
}

#[tokio::test]
async fn harness_dns_answers_mx_a_aaaa_txt_over_tcp() {
    tokio::time::timeout(LIMIT, check_records(true))
        .await
        .expect("test timed out");
}

#[tokio::test]
async fn harness_dns_failure_modes() {
    tokio::time::timeout(LIMIT, async {
        let dns = DnsServer::start().await.unwrap();
        let r = resolver(dns.addr(), false);

        // Unknown name: NXDOMAIN.
        let err = r.mx_lookup("nowhere.example.").await.unwrap_err();
        assert!(err.is_nx_domain(), "{err:?}");

        // Known name, other type: NODATA (NOERROR, no records).
        dns.add_a("host.example", Ipv4Addr::LOCALHOST);
        let err = r.mx_lookup("host.example.").await.unwrap_err();
        assert!(err.is_no_records_found() && !err.is_nx_domain(), "{err:?}");
        assert_eq!(response_code(&err), Some(ResponseCode::NoError));

        // Forced NXDOMAIN on a name that has records.
        dns.set_failure("host.example", Failure::NxDomain);
        let err = r.ipv4_lookup("host.example.").await.unwrap_err();
        assert!(err.is_nx_domain(), "{err:?}");

        // SERVFAIL.
        dns.set_failure("host.example", Failure::ServFail);
        let err = r.ipv4_lookup("host.example.").await.unwrap_err();
        assert_eq!(response_code(&err), Some(ResponseCode::ServFail), "{err:?}");

        // No answer: the client times out.
        dns.set_failure("host.example", Failure::Timeout);
        let err = r.ipv4_lookup("host.example.").await.unwrap_err();
        assert!(matches!(err, NetError::Timeout), "{err:?}");

        // Back to normal, then cleared entirely.
        dns.clear_failure("host.example");
        assert!(r.ipv4_lookup("host.example.").await.is_ok());
        dns.clear("host.example");
        assert!(
            r.ipv4_lookup("host.example.")
                .await
                .unwrap_err()
                .is_nx_domain()
        );
    })
    .await
    .expect("test timed out");
}
