//! The relay's reputation guard as the operator sees it: `GET
//! /admin/v1/reputation` (every configured sending domain's state and rates)
//! and `POST /admin/v1/reputation/<domain>/resume`, on the relay's HTTP port
//! through its Service, with the admin bearer token from the relay's
//! generated Secret.
//!
//! Controllers depend on the [`ReputationSource`] trait, so reconcile tests
//! answer from [`FakeReputation`]; [`HttpReputation`] is tested against a
//! real HTTP server.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

/// The admin bearer token in a relay's generated Secret
/// ([`crate::names::feedback_secret_name`]).
pub fn admin_token(secret: &k8s_openapi::api::core::v1::Secret) -> Option<String> {
    let value = secret.data.as_ref()?.get(crate::names::ADMIN_TOKEN)?;
    let token = String::from_utf8(value.0.clone()).ok()?;
    let token = token.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// Where the admin API of `relay` is: its Service's HTTP port, with the
/// token of its generated Secret from the operator's cache.
pub fn relay_endpoint(
    relay: &petrel_crds::smtp_relay::SmtpRelay,
    stores: &crate::stores::Stores,
    ns: &str,
) -> RelayEndpoint {
    RelayEndpoint {
        base_url: format!(
            "http://{}.{ns}.svc:{}",
            crate::names::base_name(relay),
            crate::names::HTTP_PORT
        ),
        token: stores
            .owned_secret(ns, &crate::names::feedback_secret_name(relay))
            .and_then(|s| admin_token(&s)),
    }
}

/// Largest response body read from the relay (a list of every domain).
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// Where a relay's admin API is, and how to authenticate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayEndpoint {
    /// Base URL of the relay's HTTP port, for example `http://petrel-main.mail.svc:9090`.
    pub base_url: String,
    /// Bearer token (`http.adminTokenFile`); `None` while the relay's Secret does not exist.
    pub token: Option<String>,
}

/// A domain's state in the guard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReputationState {
    /// Rates below half of each threshold (or too little volume to count).
    Ok,
    /// A rate is above half its threshold.
    Warning,
    /// A rate exceeded its threshold: the domain's mail is held.
    Paused,
}

/// Which rate the state is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReputationReason {
    /// The hard-bounce rate.
    BounceRateExceeded,
    /// The complaint rate.
    ComplaintRateExceeded,
    /// A reason this operator does not know (a newer relay).
    #[serde(other)]
    Other,
}

/// One domain of `GET /admin/v1/reputation`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainReputation {
    /// The sending domain.
    pub domain: String,
    /// ok, warning or paused.
    pub state: ReputationState,
    /// Which rate, when not ok.
    #[serde(default)]
    pub reason: Option<ReputationReason>,
    /// For a person, e.g. `bounce rate 7.2% over 24h exceeds 5%`.
    #[serde(default)]
    pub message: Option<String>,
    /// Hard bounces / (delivered + hard bounces) in the window, as a fraction.
    #[serde(default)]
    pub bounce_rate: f64,
    /// Complaints / delivered in the window, as a fraction.
    #[serde(default)]
    pub complaint_rate: f64,
    /// Delivered + hard bounces in the window.
    #[serde(default)]
    pub volume: u64,
    /// When the current state began (RFC 3339).
    #[serde(default)]
    pub since: Option<String>,
}

#[derive(Deserialize)]
struct ReputationList {
    domains: Vec<DomainReputation>,
}

/// Why the relay's reputation could not be read or a resume failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReputationError {
    /// No answer: connection refused, DNS, timeout (no relay pod ready, or a
    /// network policy in the way).
    #[error("relay unreachable: {0}")]
    Unreachable(String),
    /// The relay answered with an error status.
    #[error("relay answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The JSON error's message, or the body.
        message: String,
    },
    /// The answer was not the documented JSON.
    #[error("unexpected answer from the relay: {0}")]
    Malformed(String),
}

/// Reads and resumes domains of a relay's reputation guard.
pub trait ReputationSource: Send + Sync {
    /// Every configured sending domain of the relay with its state.
    fn domains<'a>(
        &'a self,
        relay: &'a RelayEndpoint,
    ) -> BoxFuture<'a, Result<Vec<DomainReputation>, ReputationError>>;

    /// Resumes `domain` (unpauses it and resets its window).
    fn resume<'a>(
        &'a self,
        relay: &'a RelayEndpoint,
        domain: &'a str,
    ) -> BoxFuture<'a, Result<(), ReputationError>>;
}

/// The relay's admin API over plain HTTP/1.1 (the in-cluster Service).
pub struct HttpReputation {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl HttpReputation {
    /// A client bounding each request (connect to last byte) by `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    async fn call(
        &self,
        method: Method,
        relay: &RelayEndpoint,
        path: &str,
    ) -> Result<Bytes, ReputationError> {
        let url = format!("{}{path}", relay.base_url.trim_end_matches('/'));
        let mut request = Request::builder()
            .method(method)
            .uri(&url)
            .header(header::ACCEPT, "application/json");
        if let Some(token) = &relay.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| ReputationError::Unreachable(format!("{url}: {e}")))?;
        let exchange = async {
            let response =
                self.client.request(request).await.map_err(|e| {
                    ReputationError::Unreachable(format!("{url}: {}", error_chain(&e)))
                })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| {
                    ReputationError::Unreachable(format!("{url}: reading the answer: {e}"))
                })?
                .to_bytes();
            Ok::<_, ReputationError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                ReputationError::Unreachable(format!("{url}: no answer within {:?}", self.timeout))
            })??;
        if status != StatusCode::OK {
            return Err(ReputationError::Status {
                status: status.as_u16(),
                message: error_message(&body),
            });
        }
        Ok(body)
    }
}

/// The message of a JSON error body (`{"error": ...}` or `{"message": ...}`),
/// else the body's start.
fn error_message(body: &[u8]) -> String {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |k: &str| {
        json.as_ref().and_then(|v| v.get(k)).and_then(|m| {
            m.as_str()
                .map(String::from)
                .or_else(|| m.get("message")?.as_str().map(String::from))
        })
    };
    field("message")
        .or_else(|| field("error"))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}

/// An error with its sources: hyper's own Display often says only "client error (Connect)".
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl ReputationSource for HttpReputation {
    fn domains<'a>(
        &'a self,
        relay: &'a RelayEndpoint,
    ) -> BoxFuture<'a, Result<Vec<DomainReputation>, ReputationError>> {
        Box::pin(async move {
            let body = self
                .call(Method::GET, relay, "/admin/v1/reputation")
                .await?;
            serde_json::from_slice::<ReputationList>(&body)
                .map(|l| l.domains)
                .map_err(|e| ReputationError::Malformed(e.to_string()))
        })
    }

    fn resume<'a>(
        &'a self,
        relay: &'a RelayEndpoint,
        domain: &'a str,
    ) -> BoxFuture<'a, Result<(), ReputationError>> {
        Box::pin(async move {
            let path = format!("/admin/v1/reputation/{domain}/resume");
            self.call(Method::POST, relay, &path).await.map(|_| ())
        })
    }
}

/// A [`ReputationSource`] answering from a table, for tests of the controllers.
#[derive(Default)]
pub struct FakeReputation {
    state: Mutex<FakeState>,
}

#[derive(Default)]
struct FakeState {
    /// Domains by relay base URL; a URL absent from the table is unreachable.
    relays: BTreeMap<String, Vec<DomainReputation>>,
    /// Every call: `GET <url>` or `RESUME <url> <domain>`.
    calls: Vec<String>,
    /// Tokens presented, in call order.
    tokens: Vec<Option<String>>,
}

impl FakeReputation {
    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the relay at `base_url` to report `domains`.
    pub fn set(&self, base_url: &str, domains: Vec<DomainReputation>) {
        self.lock().relays.insert(base_url.to_string(), domains);
    }

    /// Makes the relay at `base_url` unreachable.
    pub fn unreachable(&self, base_url: &str) {
        self.lock().relays.remove(base_url);
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// The bearer tokens presented so far.
    pub fn tokens(&self) -> Vec<Option<String>> {
        self.lock().tokens.clone()
    }
}

impl ReputationSource for FakeReputation {
    fn domains<'a>(
        &'a self,
        relay: &'a RelayEndpoint,
    ) -> BoxFuture<'a, Result<Vec<DomainReputation>, ReputationError>> {
        let mut state = self.lock();
        state.calls.push(format!("GET {}", relay.base_url));
        state.tokens.push(relay.token.clone());
        let answer = state.relays.get(&relay.base_url).cloned().ok_or_else(|| {
            ReputationError::Unreachable(format!("{}: connection refused", relay.base_url))
        });
        Box::pin(async move { answer })
    }

    /// Resuming sets the domain back to ok, as the relay does.
    fn resume<'a>(
        &'a self,
        relay: &'a RelayEndpoint,
        domain: &'a str,
    ) -> BoxFuture<'a, Result<(), ReputationError>> {
        let mut state = self.lock();
        state
            .calls
            .push(format!("RESUME {} {domain}", relay.base_url));
        state.tokens.push(relay.token.clone());
        let answer = match state.relays.get_mut(&relay.base_url) {
            None => Err(ReputationError::Unreachable(format!(
                "{}: connection refused",
                relay.base_url
            ))),
            Some(domains) => match domains.iter_mut().find(|d| d.domain == domain) {
                None => Err(ReputationError::Status {
                    status: 404,
                    message: format!("unknown sending domain {domain}"),
                }),
                Some(d) => {
                    d.state = ReputationState::Ok;
                    d.reason = None;
                    d.message = None;
                    Ok(())
                }
            },
        };
        Box::pin(async move { answer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::Path;
    use axum::http::HeaderMap;
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use serde_json::json;

    const TOKEN: &str = "s3cret-token";

    fn authorised(headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {TOKEN}"))
    }

    /// A relay-shaped admin API on 127.0.0.1 (the JSON of the contract).
    async fn relay() -> String {
        let app = Router::new()
            .route(
                "/admin/v1/reputation",
                get(|headers: HeaderMap| async move {
                    if !authorised(&headers) {
                        return (
                            StatusCode::UNAUTHORIZED,
                            Json(json!({"error": "admin API: missing or wrong bearer token"})),
                        );
                    }
                    (
                        StatusCode::OK,
                        Json(json!({"domains": [
                            {"domain": "example.com", "state": "paused", "reason": "BounceRateExceeded",
                             "message": "bounce rate 7.2% over 24h exceeds 5%",
                             "bounceRate": 0.072, "complaintRate": 0.0, "volume": 1234,
                             "since": "2026-12-02T01:00:00Z"},
                            {"domain": "example.org", "state": "ok", "reason": null, "message": null,
                             "bounceRate": 0.0, "complaintRate": 0.0, "volume": 3, "since": null},
                            {"domain": "example.net", "state": "warning", "reason": "SomethingNew",
                             "message": "x", "bounceRate": 0.03, "complaintRate": 0.0, "volume": 900,
                             "since": null}
                        ]})),
                    )
                }),
            )
            .route(
                "/admin/v1/reputation/{domain}/resume",
                post(|Path(domain): Path<String>, headers: HeaderMap| async move {
                    if !authorised(&headers) {
                        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "no"})));
                    }
                    if domain != "example.com" {
                        return (
                            StatusCode::NOT_FOUND,
                            // The relay's error shape.
                            Json(json!({"error": {"message": format!("unknown sending domain {domain}")}})),
                        );
                    }
                    (StatusCode::OK, Json(json!({"domain": domain, "state": "ok"})))
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    fn endpoint(base_url: &str, token: Option<&str>) -> RelayEndpoint {
        RelayEndpoint {
            base_url: base_url.into(),
            token: token.map(String::from),
        }
    }

    #[tokio::test]
    async fn reads_the_documented_json_with_the_bearer_token() {
        let base = relay().await;
        let source = HttpReputation::new(Duration::from_secs(5));
        let domains = source
            .domains(&endpoint(&base, Some(TOKEN)))
            .await
            .expect("reads");
        assert_eq!(domains.len(), 3);
        let paused = &domains[0];
        assert_eq!(paused.domain, "example.com");
        assert_eq!(paused.state, ReputationState::Paused);
        assert_eq!(paused.reason, Some(ReputationReason::BounceRateExceeded));
        assert_eq!(
            paused.message.as_deref(),
            Some("bounce rate 7.2% over 24h exceeds 5%")
        );
        assert_eq!((paused.bounce_rate, paused.volume), (0.072, 1234));
        assert_eq!(paused.since.as_deref(), Some("2026-12-02T01:00:00Z"));
        assert_eq!(domains[1].state, ReputationState::Ok);
        assert_eq!(domains[1].reason, None);
        // A reason from a newer relay does not fail the whole answer.
        assert_eq!(domains[2].reason, Some(ReputationReason::Other));

        source
            .resume(&endpoint(&base, Some(TOKEN)), "example.com")
            .await
            .expect("resumes");
        let err = source
            .resume(&endpoint(&base, Some(TOKEN)), "unknown.example")
            .await
            .expect_err("unknown domain");
        assert_eq!(
            err,
            ReputationError::Status {
                status: 404,
                message: "unknown sending domain unknown.example".into()
            }
        );
        let err = source
            .domains(&endpoint(&base, Some("wrong")))
            .await
            .expect_err("wrong token");
        assert!(
            matches!(&err, ReputationError::Status { status: 401, message } if message.contains("bearer token")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_relay_and_a_foreign_answer_are_errors() {
        // A port nobody listens on: bind, note it, close.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let source = HttpReputation::new(Duration::from_secs(5));
        let err = source
            .domains(&endpoint(&format!("http://{addr}"), Some(TOKEN)))
            .await
            .expect_err("refused");
        assert!(matches!(err, ReputationError::Unreachable(_)), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");

        let app = Router::new().route("/admin/v1/reputation", get(|| async { "not json" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let err = source
            .domains(&endpoint(&base, None))
            .await
            .expect_err("not the JSON shape");
        assert!(matches!(err, ReputationError::Malformed(_)), "{err}");
    }
}
