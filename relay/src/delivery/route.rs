//! Where a destination group goes and how to connect there: the
//! smarthost, the domain's MX hosts or the Maildir tree, and the SMTP
//! connection settings (TLS policy, AUTH) for it.

use petrel_crds::config::{RelayConfig, TlsMode, Transport};

use super::classify::Fault;
use super::dane::DanePlan;
use super::mx::{self, MxHost};
use super::smtp_client::{ConnectSettings, Timeouts, TlsPolicy};
use super::{DeliveryContext, tls_policy};

/// Where a group goes.
pub(crate) enum Route {
    /// SMTP to these hosts on this port.
    Smtp(Vec<MxHost>, u16),
    /// SMTP to these hosts on this port, with these connection settings
    /// (overridden per host where DANE applies).
    Ready(Vec<MxHost>, u16, Box<ConnectSettings>, Box<DanePlan>),
    /// Nowhere, for this reason.
    Fail(Fault),
    /// The Maildir tree.
    Maildir(std::path::PathBuf),
}

pub(crate) async fn route(ctx: &DeliveryContext, cfg: &RelayConfig, domain: &str) -> Route {
    match cfg.delivery.transport {
        Transport::Maildir => match &cfg.delivery.maildir {
            Some(m) => Route::Maildir(m.path.clone()),
            None => Route::Fail(Fault::Local(
                "transport maildir without maildir.path".into(),
            )),
        },
        Transport::Smarthost => {
            let Some(sh) = &cfg.delivery.smarthost else {
                return Route::Fail(Fault::Local(
                    "transport smarthost without smarthost settings".into(),
                ));
            };
            // The system resolver: a smarthost is often a cluster service
            // name that only the pod's resolv.conf search path finds.
            match tokio::net::lookup_host((sh.host.as_str(), sh.port)).await {
                Ok(addrs) => {
                    let addrs: Vec<_> = addrs.map(|a| a.ip()).collect();
                    if addrs.is_empty() {
                        return Route::Fail(Fault::DnsTemporary(format!(
                            "smarthost {} has no address",
                            sh.host
                        )));
                    }
                    Route::Smtp(
                        vec![MxHost {
                            name: sh.host.clone(),
                            addrs,
                        }],
                        sh.port,
                    )
                }
                Err(e) => Route::Fail(Fault::DnsTemporary(format!("smarthost {}: {e}", sh.host))),
            }
        }
        Transport::Mx => {
            if domain.is_empty() {
                return Route::Fail(Fault::DnsPermanent {
                    status: "5.1.3",
                    reason: "recipient address has no domain".into(),
                });
            }
            let resolver = match ctx.resolver(&cfg.delivery.mx.nameservers) {
                Ok(r) => r,
                Err(e) => return Route::Fail(Fault::DnsTemporary(e.to_string())),
            };
            match mx::resolve(&resolver, domain).await {
                Ok(hosts) => Route::Smtp(hosts, cfg.delivery.mx.port),
                Err(fault) => Route::Fail(fault),
            }
        }
    }
}

pub(crate) async fn connect_settings(
    ctx: &DeliveryContext,
    cfg: &RelayConfig,
    domain: &str,
) -> Result<ConnectSettings, Fault> {
    let timeouts = Timeouts::from(&cfg.delivery.timeouts);
    match (cfg.delivery.transport, &cfg.delivery.smarthost) {
        (Transport::Smarthost, Some(sh)) => {
            let auth = match (&sh.username, &sh.password_file) {
                (Some(user), Some(file)) => {
                    // Read per group (a rotated Secret is picked up), off
                    // the async threads: a slow volume must not stall them.
                    let password = tokio::fs::read_to_string(file).await.map_err(|e| {
                        Fault::Local(format!("cannot read smarthost password file: {e}"))
                    })?;
                    Some((
                        user.clone(),
                        password.trim_end_matches(['\r', '\n']).to_string(),
                    ))
                }
                _ => None,
            };
            let tls = match sh.tls {
                TlsMode::None => TlsPolicy::Disabled,
                // AUTH will follow: STARTTLS must happen.
                TlsMode::Starttls => TlsPolicy::Required,
                TlsMode::Implicit => TlsPolicy::Implicit,
            };
            let tls_config = match tls {
                TlsPolicy::Disabled => ctx.unverified_tls.clone(),
                TlsPolicy::Opportunistic | TlsPolicy::Required | TlsPolicy::Implicit => {
                    ctx.verified_tls().map_err(|e| Fault::Tls(e.to_string()))?
                }
            };
            Ok(ConnectSettings {
                ehlo_name: cfg.hostname.clone(),
                timeouts,
                tls,
                tls_config,
                tls_label: if tls == TlsPolicy::Disabled {
                    "none"
                } else {
                    "verified"
                },
                auth,
                require_tls: false,
                tls_report: None,
            })
        }
        _ => {
            let mode = tls_policy::configured(cfg, domain);
            Ok(ConnectSettings {
                ehlo_name: cfg.hostname.clone(),
                timeouts,
                tls: tls_policy::client_policy(mode),
                tls_config: ctx.mx_tls_config(mode, cfg.delivery.tls.ca_file.as_deref())?,
                tls_label: mode.as_str(),
                auth: None,
                require_tls: false,
                tls_report: None,
            })
        }
    }
}
