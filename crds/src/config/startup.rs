//! The part of a [`RelayConfig`] a running relay cannot change.
//!
//! Sockets are bound, the queue backend opened, file watchers started and
//! delivery workers spawned once, at start; everything else (listener AUTH
//! policy, limits, domains, delivery policy, trusted networks) is read
//! again for each new session or delivery. [`RelayConfig::startup`] is the
//! one place that says which is which: the relay compares it across a
//! reload to say what needs a restart, and the operator hashes it into the
//! pod template so exactly those changes roll the Deployment.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;

use super::{Duration, EmbeddedQueue, ListenerRole, RedisQueue, RelayConfig, TlsFiles, TlsMode};

/// Settings fixed for the life of a relay process.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StartupConfig {
    /// Each listener's socket and TLS mode (its AUTH policy is live).
    pub listeners: Vec<StartupListener>,
    /// Certificate files watched from start (their contents reload).
    pub tls: Option<TlsFiles>,
    /// Users file watched from start (its contents reload).
    pub auth_users_file: Option<PathBuf>,
    /// The queue backend as opened.
    pub queue: StartupQueue,
    /// The HTTP server's socket.
    pub http: StartupHttp,
    /// Delivery tasks spawned at start.
    pub delivery: StartupDelivery,
    /// Runtime threads started with the process. Left out when unset, so
    /// a config without it keeps the pod-template hash it had before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<u16>,
}

/// A listener's socket.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StartupListener {
    /// Listener name.
    pub name: String,
    /// Bound address.
    pub address: SocketAddr,
    /// TLS mode (implicit TLS is decided at accept).
    pub tls: TlsMode,
    /// Submission or feedback: which acceptor serves the socket.
    pub role: ListenerRole,
}

/// The queue backend: connection, key prefix, replication wait, and the
/// backend's own operation timeout.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StartupQueue {
    /// Redis connection, prefix and `waitReplicas`.
    pub redis: Option<RedisQueue>,
    /// Embedded database file.
    pub embedded: Option<EmbeddedQueue>,
    /// Operation timeout the backend was opened with.
    pub timeout: Duration,
}

/// The HTTP server's socket.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StartupHttp {
    /// Bound address.
    pub address: SocketAddr,
    /// Served over TLS (the listener is built at start).
    pub tls: bool,
}

/// Delivery settings fixed at start.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StartupDelivery {
    /// Delivery tasks in this pod.
    pub workers: u32,
}

impl RelayConfig {
    /// The settings that need a restart to change.
    pub fn startup(&self) -> StartupConfig {
        StartupConfig {
            listeners: self
                .listeners
                .iter()
                .map(|l| StartupListener {
                    name: l.name.clone(),
                    address: l.address,
                    tls: l.tls,
                    role: l.role,
                })
                .collect(),
            tls: self.tls.clone(),
            auth_users_file: self.auth_users_file.clone(),
            queue: StartupQueue {
                redis: self.queue.redis.clone(),
                embedded: self.queue.embedded.clone(),
                timeout: self.queue.timeout,
            },
            http: StartupHttp {
                address: self.http.address,
                tls: self.http.tls,
            },
            delivery: StartupDelivery {
                workers: self.delivery.workers,
            },
            worker_threads: self.worker_threads,
        }
    }
}

impl StartupConfig {
    /// Field paths (as in the config file) whose values differ from
    /// `other`'s, for example `queue.redis.keyPrefix`. Values are never
    /// included: a Redis URL may carry a password.
    pub fn changed_fields(&self, other: &StartupConfig) -> Vec<String> {
        let (Ok(a), Ok(b)) = (serde_json::to_value(self), serde_json::to_value(other)) else {
            // Plain data always serialises; if it did not, say so broadly.
            return vec!["(startup settings)".to_string()];
        };
        let mut out = Vec::new();
        diff("", &a, &b, &mut out);
        out
    }
}

fn diff(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let null = Value::Null;
                diff(
                    &join(key),
                    x.get(key).unwrap_or(&null),
                    y.get(key).unwrap_or(&null),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff(&format!("{path}[{i}]"), p, q, out);
            }
        }
        _ if a != b => out.push(path.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
listeners:
  - {name: smtp, address: "127.0.0.1:2525"}
  - {name: submission, address: "127.0.0.1:2587", auth: optional, allowInsecureAuth: true}
authUsersFile: /auth/users
queue: {redis: {urlFile: /redis/url, keyPrefix: petrel}}
"#;

    fn changed(edit: impl Fn(&mut RelayConfig)) -> Vec<String> {
        let before = RelayConfig::from_yaml(BASE).unwrap();
        let mut after = before.clone();
        edit(&mut after);
        before.startup().changed_fields(&after.startup())
    }

    #[test]
    fn live_settings_are_not_startup_settings() {
        use crate::config::AuthMode;
        assert!(changed(|c| c.listeners[0].auth = AuthMode::Required).is_empty());
        assert!(changed(|c| c.listeners[1].allow_insecure_auth = false).is_empty());
        assert!(changed(|c| c.limits.max_recipients = 3).is_empty());
        assert!(changed(|c| c.trusted_networks.clear()).is_empty());
        assert!(changed(|c| c.hostname = "mx.example.test".into()).is_empty());
    }

    #[test]
    fn startup_changes_name_their_fields() {
        let redis = |c: &mut RelayConfig| c.queue.redis.as_mut().unwrap().clone();
        assert_eq!(
            changed(|c| c.queue.redis.as_mut().unwrap().key_prefix = "other".into()),
            vec!["queue.redis.keyPrefix"]
        );
        assert_eq!(
            changed(|c| {
                let mut r = redis(c);
                r.wait_replicas = 1;
                c.queue.redis = Some(r);
                c.listeners[1].address = "127.0.0.1:2588".parse().unwrap();
            }),
            vec!["listeners[1].address", "queue.redis.waitReplicas"]
        );
        assert_eq!(
            changed(|c| {
                c.listeners.pop();
            }),
            vec!["listeners"]
        );
        assert_eq!(
            changed(|c| c.http.address = "127.0.0.1:1".parse().unwrap()),
            vec!["http.address"]
        );
        assert_eq!(changed(|c| c.http.tls = true), vec!["http.tls"]);
        assert_eq!(
            changed(|c| c.delivery.workers = 2),
            vec!["delivery.workers"]
        );
    }
}
