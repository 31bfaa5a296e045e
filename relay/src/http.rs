//! The relay's HTTP side: `/metrics` for Prometheus, `/healthz` and `/readyz`
//! for the kubelet, and `POST /v1/send`, a JSON send API for apps that would
//! rather not speak SMTP.
//!
//! The send API builds an RFC 5322 message with mail-builder and hands it to
//! a [`Submit`] implementation: the same accept path SMTP DATA uses (policy,
//! DKIM, durable enqueue). It is a trait here so this module does not depend
//! on the inbound code, and so the HTTP mapping is tested on its own.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use serde::{Deserialize, Serialize};

use crate::refusal::Refusal;

pub mod admin_queue;
mod slots;
pub mod tls_listener;
use crate::queue::{Queue, QueueError};
pub use slots::{Busy, RequestSlots};

/// How long `/readyz` waits for the queue backend before calling it unreachable;
/// below the kubelet's default probe timeout so the probe gets a clear answer.
pub const PING_TIMEOUT: Duration = Duration::from_millis(900);

/// Why the HTTP server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The HTTP metrics could not be registered (a name registered twice).
    #[error("cannot register HTTP metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Accepting connections failed.
    #[error("HTTP server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Process-wide health flags, shared by `main` (which sets them) and the
/// HTTP handlers (which report them). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Health {
    inner: Arc<HealthFlags>,
}

#[derive(Debug, Default)]
struct HealthFlags {
    config_loaded: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    /// Flags for a process that has not loaded its config yet.
    pub fn new() -> Health {
        Health::default()
    }

    /// Records whether a valid config is loaded (set once at start).
    pub fn set_config_loaded(&self, loaded: bool) {
        self.inner.config_loaded.store(loaded, Ordering::SeqCst);
    }

    /// Marks the relay as draining (SIGTERM received): `/readyz` fails so the
    /// Service stops sending new connections while open sessions finish.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// Whether [`Health::start_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    fn config_loaded(&self) -> bool {
        self.inner.config_loaded.load(Ordering::SeqCst)
    }
}

/// Why the relay is not ready; the text is the `/readyz` body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// No valid config loaded yet.
    #[error("config not loaded")]
    ConfigNotLoaded,
    /// SIGTERM received; finishing open sessions.
    #[error("draining")]
    Draining,
    /// The queue backend did not answer the ping.
    #[error("queue backend unreachable: {0}")]
    QueueUnreachable(String),
}

/// The readiness decision, from the flags and the result of a queue ping.
/// Draining wins over everything so a terminating pod leaves the Service at once.
pub fn readiness(
    config_loaded: bool,
    draining: bool,
    ping: &Result<(), QueueError>,
) -> Result<(), NotReady> {
    if draining {
        return Err(NotReady::Draining);
    }
    if !config_loaded {
        return Err(NotReady::ConfigNotLoaded);
    }
    match ping {
        Ok(()) => Ok(()),
        Err(err) => Err(NotReady::QueueUnreachable(err.to_string())),
    }
}

/// Metrics of the HTTP stage itself.
#[derive(Clone)]
pub struct HttpMetrics {
    /// 1 when the last `/readyz` check passed, 0 otherwise; the
    /// "relay not available" alert reads it.
    pub ready: IntGauge,
    /// Send API requests by result (`accepted`, `invalid`, `refused`,
    /// `deferred`, `unauthorized`).
    pub send_requests: IntCounterVec,
}

impl HttpMetrics {
    /// Creates and registers the HTTP metrics in `registry`.
    pub fn register(registry: &Registry) -> Result<HttpMetrics, prometheus::Error> {
        let ready = IntGauge::new(
            "petrel_relay_ready",
            "1 when the relay's last readiness check passed (config loaded, queue reachable, not draining).",
        )?;
        registry.register(Box::new(ready.clone()))?;
        let send_requests = IntCounterVec::new(
            Opts::new(
                "petrel_http_send_requests_total",
                "Requests to the HTTP send API, by result.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(send_requests.clone()))?;
        Ok(HttpMetrics {
            ready,
            send_requests,
        })
    }
}

/// Credentials from an HTTP `Authorization: Basic` header, checked by the
/// [`Submit`] implementation against the same AUTH users as SMTP.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The AUTH user name.
    pub username: String,
    /// The password as sent (never logged).
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Who is asking, known before the request body is read.
#[derive(Clone, Debug)]
pub struct HttpClient {
    /// The client address, for trusted-network checks and logs.
    pub peer: IpAddr,
    /// Basic-auth credentials, when sent.
    pub credentials: Option<Credentials>,
    /// Whether the request came over TLS.
    pub tls: bool,
}

/// A client the accept path let in: trusted, or authenticated as `user`.
/// Only [`Submit::authorize`] makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorized {
    /// The client address.
    pub peer: IpAddr,
    /// The AUTH user, when the client authenticated.
    pub user: Option<String>,
}

/// A message built from a send API request, ready for the accept path.
#[derive(Clone, Debug)]
pub struct Submission {
    /// Envelope sender (the From address).
    pub mail_from: String,
    /// Envelope recipients: to, cc and bcc, deduplicated.
    pub recipients: Vec<String>,
    /// The message, CRLF line endings, not yet DKIM-signed.
    pub data: Vec<u8>,
    /// The request's tags (validated), for every event of the message.
    pub tags: std::collections::BTreeMap<String, String>,
}

/// The accept path shared with SMTP: credentials, policy, DKIM signing,
/// durable enqueue. Refusals are [`Refusal`]s, so the HTTP status follows
/// the same decision SMTP would have made.
#[async_trait]
pub trait Submit: Send + Sync + 'static {
    /// Checks the client (trusted network, credentials, AUTH throttle)
    /// before the body is read, so an unauthorised upload costs nothing.
    async fn authorize(&self, client: HttpClient) -> Result<Authorized, Refusal>;
    /// Accepts the message or refuses it. Returns the queue id once the
    /// message is durable.
    async fn submit(&self, client: Authorized, submission: Submission) -> Result<String, Refusal>;
    /// The send API limits as the current config has them.
    fn limits(&self) -> SendLimits;
}

/// Limits of the send API, from the relay config.
#[derive(Clone, Copy, Debug)]
pub struct SendLimits {
    /// Largest request body accepted, in bytes; a larger one gets 413 as
    /// soon as its `Content-Length` or its bytes so far say so.
    pub max_body_bytes: usize,
    /// Most envelope recipients per request.
    pub max_recipients: usize,
    /// Requests in flight in this process; more get 429.
    pub max_requests: u32,
    /// Requests in flight from one client IP; more get 429.
    pub max_requests_per_client: u32,
    /// Longest time to receive a request body; slower clients get 408.
    pub request_timeout: Duration,
}

impl SendLimits {
    /// The send API limits of `config`: a request body up to
    /// `limits.maxMessageSize` (the message built from it is held to that
    /// size again by the accept path).
    pub fn of(config: &crate::config::RelayConfig) -> SendLimits {
        SendLimits {
            max_body_bytes: usize::try_from(config.limits.max_message_size).unwrap_or(usize::MAX),
            max_recipients: config.limits.max_recipients as usize,
            max_requests: config.http.max_concurrent_requests,
            max_requests_per_client: config.http.max_concurrent_requests_per_client,
            request_timeout: config.http.request_timeout.into(),
        }
    }
}

/// The admin API (`/admin/v1/...`): what it serves and the config its
/// guard ([`crate::admin`]) reads trusted networks and the token file from.
#[derive(Clone)]
pub struct AdminApi {
    /// The event outbox, for `GET /admin/v1/events`.
    pub events: Arc<dyn crate::events::EventLog>,
    /// The relay config.
    pub config: crate::reload::Reloading<crate::config::RelayConfig>,
}

#[derive(Clone)]
struct SendApi {
    submit: Arc<dyn Submit>,
    slots: RequestSlots,
}

/// Everything the HTTP handlers need. Cheap to clone.
#[derive(Clone)]
pub struct HttpState {
    registry: Registry,
    health: Health,
    queue: Arc<dyn Queue>,
    metrics: HttpMetrics,
    send: Option<SendApi>,
    /// More routes with their own state (the tracking endpoints).
    routes: Option<Router>,
    admin: Option<AdminApi>,
}

impl HttpState {
    /// State for the health and metrics endpoints; registers [`HttpMetrics`]
    /// in `registry`, which `/metrics` then exposes whole.
    pub fn new(
        registry: Registry,
        health: Health,
        queue: Arc<dyn Queue>,
    ) -> Result<HttpState, HttpError> {
        let metrics = HttpMetrics::register(&registry)?;
        Ok(HttpState {
            registry,
            health,
            queue,
            metrics,
            send: None,
            routes: None,
            admin: None,
        })
    }

    /// Enables the admin API (guarded: loopback, trusted networks or the
    /// admin bearer token).
    pub fn with_admin(mut self, admin: AdminApi) -> HttpState {
        self.admin = Some(admin);
        self
    }

    /// Enables `POST /v1/send`, handing messages to `submit`.
    pub fn with_send_api(mut self, submit: Arc<dyn Submit>) -> HttpState {
        self.send = Some(SendApi {
            submit,
            slots: RequestSlots::default(),
        });
        self
    }
}

impl HttpState {
    /// Serves `routes` too (the tracking endpoints, which route by Host).
    pub fn with_routes(mut self, routes: Router) -> HttpState {
        self.routes = Some(routes);
        self
    }
}

/// The routes: `/metrics`, `/healthz`, `/readyz` and, when enabled,
/// `/v1/send` and `/admin/v1/events`.
///
/// `/v1/send` takes a request slot (total and per client) before anything
/// else; the probes and `/metrics` never do, so the kubelet gets its
/// answers however busy the send API is.
pub fn router(mut state: HttpState) -> Router {
    let extra = state.routes.take();
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/send", post(send_handler))
        .route("/admin/v1/events", get(admin_events))
        .with_state(state)
        .merge(extra.unwrap_or_default())
}

/// Serves [`router`] on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Serves [`router`] over TLS (`http.tls: true`) until `shutdown`
/// completes: every request is marked [`OverTls`].
pub async fn serve_tls(
    listener: tls_listener::TlsListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    let app = router(state)
        .layer(axum::middleware::map_request(tls_listener::mark_tls))
        .into_make_service_with_connect_info::<tls_listener::TlsPeer>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Query of `GET /admin/v1/events`.
#[derive(Debug, Deserialize)]
struct EventsQuery {
    /// Events after this position (from the oldest retained when absent).
    after: Option<String>,
    /// At most this many (default 100, at most 1000).
    limit: Option<usize>,
}

/// `GET /admin/v1/events?after=SEQ&limit=N`: a page of the outbox, for
/// `petrel-relay events tail` while the relay holds the embedded file.
async fn admin_events(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: axum::extract::Query<EventsQuery>,
) -> Response {
    let Some(admin) = &state.admin else {
        return error_response(StatusCode::NOT_FOUND, "admin API not enabled", None);
    };
    let config = admin.config.get();
    if let Err(denied) = crate::admin::check(
        peer.ip(),
        &headers,
        &config.trusted_networks,
        config.http.admin_token_file.as_deref(),
    )
    .await
    {
        let mut response = error_response(denied.status(), &denied.to_string(), None);
        if denied.status() == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        return response;
    }
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    match admin.events.read(query.after.as_ref(), limit).await {
        Ok(events) => axum::Json(crate::events::tail::EventPage {
            events: events.into_iter().map(Into::into).collect(),
        })
        .into_response(),
        Err(QueueError::Corrupt { reason, .. }) => error_response(
            StatusCode::BAD_REQUEST,
            &format!("bad after: {reason}"),
            None,
        ),
        Err(error) => error_response(StatusCode::SERVICE_UNAVAILABLE, &error.to_string(), None),
    }
}

async fn metrics_handler(State(state): State<HttpState>) -> Response {
    match TextEncoder::new().encode_to_string(&state.registry.gather()) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            text,
        )
            .into_response(),
        Err(err) => {
            tracing::error!(%err, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response()
        }
    }
}

/// Liveness: the process runs and its runtime answers. Nothing else, so a
/// Redis outage makes pods unready, never restarts them.
async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<HttpState>) -> Response {
    // Skip the round trip when the answer is already known.
    let ping = if state.health.is_draining() || !state.health.config_loaded() {
        Ok(())
    } else {
        match tokio::time::timeout(PING_TIMEOUT, state.queue.ping()).await {
            Ok(result) => result,
            Err(_) => Err(QueueError::Timeout(PING_TIMEOUT)),
        }
    };
    match readiness(
        state.health.config_loaded(),
        state.health.is_draining(),
        &ping,
    ) {
        Ok(()) => {
            state.metrics.ready.set(1);
            (StatusCode::OK, "ready\n").into_response()
        }
        Err(why) => {
            state.metrics.ready.set(0);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            )
                .into_response()
        }
    }
}

/// A mailbox in a send request: `"a@example.com"` or `{"name": .., "email": ..}`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Mailbox {
    /// A bare address.
    Address(String),
    /// A display name and an address.
    Named {
        /// Display name, encoded as needed.
        name: Option<String>,
        /// The address.
        email: String,
    },
}

impl Mailbox {
    fn email(&self) -> &str {
        match self {
            Mailbox::Address(email) | Mailbox::Named { email, .. } => email,
        }
    }

    fn to_address(&self) -> mail_builder::headers::address::Address<'static> {
        match self {
            Mailbox::Named {
                name: Some(name),
                email,
            } => (name.clone(), email.clone()).into(),
            other => other.email().to_string().into(),
        }
    }
}

/// The body of `POST /v1/send`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendRequest {
    /// Author and envelope sender; its domain must be a sending domain.
    pub from: Mailbox,
    /// Visible recipients.
    #[serde(default)]
    pub to: Vec<Mailbox>,
    /// Visible copy recipients.
    #[serde(default)]
    pub cc: Vec<Mailbox>,
    /// Hidden recipients: in the envelope only.
    #[serde(default)]
    pub bcc: Vec<Mailbox>,
    /// Reply-To mailbox.
    #[serde(default)]
    pub reply_to: Option<Mailbox>,
    /// Subject line.
    pub subject: String,
    /// Plain text body.
    #[serde(default)]
    pub text: Option<String>,
    /// HTML body.
    #[serde(default)]
    pub html: Option<String>,
    /// Extra headers, for example `X-Campaign`. Structural headers (From,
    /// To, Date, Message-ID, MIME, DKIM) cannot be set this way.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// `false` sends this message untracked even when its domain tracks
    /// opens and clicks (as the header `X-Petrel-Track: off` does).
    #[serde(default)]
    pub track: Option<bool>,
    /// The app's tags, returned in every event of the message: at most 10,
    /// keys `[A-Za-z0-9_.-]{1,64}`, values printable ASCII up to 256
    /// characters (see [`crate::events::tags`]).
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
}

/// The answer to an accepted send request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SendAccepted {
    /// Queue id, as in logs and Received headers.
    pub id: String,
    /// The Message-ID header of the built message.
    pub message_id: String,
}

/// Why a send request is malformed; the text goes back to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    /// The body is not the expected JSON.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// No to, cc or bcc.
    #[error("no recipients: set to, cc or bcc")]
    NoRecipients,
    /// More recipients than the relay accepts per message.
    #[error("too many recipients: {0} (limit {1})")]
    TooManyRecipients(usize, usize),
    /// Neither text nor html.
    #[error("no body: set text or html")]
    NoBody,
    /// An address that is not `local@domain` or carries control characters.
    #[error("invalid address {0:?}")]
    Address(String),
    /// A header name that is not a plain field name or is reserved.
    #[error("header {0:?} cannot be set")]
    Header(String),
    /// A value with a line break (header injection).
    #[error("{0} must not contain line breaks or control characters")]
    LineBreak(String),
    /// A tag that breaks the tag rules; the text names it.
    #[error("invalid tags: {0}")]
    Tags(#[from] crate::events::tags::TagError),
}

/// Headers the builder or the relay owns.
const RESERVED_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "sender",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "dkim-signature",
    "received",
    "return-path",
];

fn has_control(s: &str) -> bool {
    s.chars().any(|c| c.is_control())
}

fn check_address(address: &str) -> Result<(), InvalidRequest> {
    let ok = match address.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && domain.contains('.')
                && !address
                    .chars()
                    .any(|c| c.is_control() || c.is_whitespace() || c == '<' || c == '>')
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(InvalidRequest::Address(address.to_string()))
    }
}

fn check_mailbox(mailbox: &Mailbox) -> Result<(), InvalidRequest> {
    check_address(mailbox.email())?;
    if let Mailbox::Named {
        name: Some(name), ..
    } = mailbox
        && has_control(name)
    {
        return Err(InvalidRequest::LineBreak("a display name".into()));
    }
    Ok(())
}

/// A send request turned into an envelope and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltMessage {
    /// Envelope sender: the From address.
    pub mail_from: String,
    /// Envelope recipients: to, cc and bcc, deduplicated case-insensitively.
    pub recipients: Vec<String>,
    /// The Message-ID header value, without angle brackets.
    pub message_id: String,
    /// The message bytes, CRLF line endings.
    pub data: Vec<u8>,
    /// The request's tags, validated.
    pub tags: std::collections::BTreeMap<String, String>,
}

/// Validates a send request and builds its message.
/// Pure apart from the Date header and the generated Message-ID.
pub fn build_message(
    request: &SendRequest,
    max_recipients: usize,
) -> Result<BuiltMessage, InvalidRequest> {
    check_mailbox(&request.from)?;
    crate::events::tags::validate(&request.tags)?;
    let mut recipients: Vec<String> = Vec::new();
    for mailbox in request.to.iter().chain(&request.cc).chain(&request.bcc) {
        check_mailbox(mailbox)?;
        let email = mailbox.email().to_string();
        if !recipients.iter().any(|r| r.eq_ignore_ascii_case(&email)) {
            recipients.push(email);
        }
    }
    if let Some(reply_to) = &request.reply_to {
        check_mailbox(reply_to)?;
    }
    if recipients.is_empty() {
        return Err(InvalidRequest::NoRecipients);
    }
    if recipients.len() > max_recipients {
        return Err(InvalidRequest::TooManyRecipients(
            recipients.len(),
            max_recipients,
        ));
    }
    if request.text.is_none() && request.html.is_none() {
        return Err(InvalidRequest::NoBody);
    }
    if has_control(&request.subject) {
        return Err(InvalidRequest::LineBreak("subject".into()));
    }
    for (name, value) in &request.headers {
        let plain = !name.is_empty()
            && name.len() <= 76
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !plain || RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(InvalidRequest::Header(name.clone()));
        }
        if has_control(value) {
            return Err(InvalidRequest::LineBreak(format!("header {name}")));
        }
    }

    let mail_from = request.from.email().to_string();
    let domain = mail_from
        .rsplit_once('@')
        .map(|(_, d)| d)
        .unwrap_or("localhost");
    let message_id = format!("{}@{}", uuid::Uuid::new_v4().simple(), domain);

    let mut builder = mail_builder::MessageBuilder::new()
        .from(request.from.to_address())
        .subject(request.subject.clone())
        .message_id(message_id.clone());
    if !request.to.is_empty() {
        builder = builder.to(request
            .to
            .iter()
            .map(Mailbox::to_address)
            .collect::<Vec<_>>());
    }
    if !request.cc.is_empty() {
        builder = builder.cc(request
            .cc
            .iter()
            .map(Mailbox::to_address)
            .collect::<Vec<_>>());
    }
    if let Some(reply_to) = &request.reply_to {
        builder = builder.reply_to(reply_to.to_address());
    }
    for (name, value) in &request.headers {
        builder = builder.header(
            name.clone(),
            mail_builder::headers::text::Text::new(value.clone()),
        );
    }
    if request.track == Some(false) {
        builder = builder.header(
            crate::tracking::OPT_OUT_HEADER,
            mail_builder::headers::raw::Raw::new("off"),
        );
    }
    if let Some(text) = &request.text {
        builder = builder.text_body(text.clone());
    }
    if let Some(html) = &request.html {
        builder = builder.html_body(html.clone());
    }
    // Writing into a Vec cannot fail.
    let data = builder.write_to_vec().unwrap_or_default();
    Ok(BuiltMessage {
        mail_from,
        recipients,
        message_id,
        data,
        tags: request.tags.clone(),
    })
}

/// The label of a refusal in `petrel_http_send_requests_total`.
fn refusal_result(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "unauthorized",
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => "deferred",
        _ => "refused",
    }
}

/// `Authorization: Basic` credentials; `Err` when the header is present but unusable.
fn basic_credentials(headers: &HeaderMap) -> Result<Option<Credentials>, ()> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| ())?;
    let (scheme, encoded) = value.split_once(' ').ok_or(())?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| ())?;
    let decoded = String::from_utf8(decoded).map_err(|_| ())?;
    let (username, password) = decoded.split_once(':').ok_or(())?;
    Ok(Some(Credentials {
        username: username.to_string(),
        password: password.to_string(),
    }))
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    enhanced: Option<&'a str>,
}

fn error_response(status: StatusCode, message: &str, refusal: Option<&Refusal>) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            message,
            code: refusal.map(Refusal::code),
            enhanced: refusal.map(Refusal::esc),
        },
    };
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"petrel\""),
        );
    }
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
    }
    response
}

/// The one place a send API refusal becomes a response: status and JSON
/// body from the [`Refusal`], counted by result.
fn refusal_response(metrics: &HttpMetrics, refusal: &Refusal) -> Response {
    let status =
        StatusCode::from_u16(refusal.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    metrics
        .send_requests
        .with_label_values(&[refusal_result(status)])
        .inc();
    error_response(status, &refusal.text(), Some(refusal))
}

async fn send_handler(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: axum::extract::Request,
) -> Response {
    let Some(api) = &state.send else {
        return error_response(
            StatusCode::NOT_FOUND,
            "the send API is not enabled on this relay",
            None,
        );
    };
    let counter = |result: &str| {
        state
            .metrics
            .send_requests
            .with_label_values(&[result])
            .inc()
    };
    if state.health.is_draining() {
        counter("deferred");
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "relay is shutting down; retry",
            None,
        );
    }
    let limits = api.submit.limits();
    // Everything below happens before a byte of the body is read: the
    // slot, the credentials, the size the client announces.
    let _slot = match api.slots.try_take(
        peer.ip(),
        limits.max_requests,
        limits.max_requests_per_client,
    ) {
        Ok(slot) => slot,
        Err(busy) => {
            counter("deferred");
            let why = match busy {
                Busy::Total => "too many requests in flight; retry",
                Busy::Client => "too many requests in flight from your address; retry",
            };
            return error_response(StatusCode::TOO_MANY_REQUESTS, why, None);
        }
    };
    let (parts, body) = request.into_parts();
    let Ok(credentials) = basic_credentials(&parts.headers) else {
        counter("unauthorized");
        return error_response(
            StatusCode::UNAUTHORIZED,
            "malformed Authorization header (expected Basic)",
            None,
        );
    };
    let client = HttpClient {
        peer: peer.ip(),
        credentials,
        tls: parts.extensions.get::<OverTls>().is_some(),
    };
    let authorized = match api.submit.authorize(client).await {
        Ok(authorized) => authorized,
        Err(refusal) => return refusal_response(&state.metrics, &refusal),
    };
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limits.max_body_bytes as u64) {
        counter("invalid");
        return too_large(limits.max_body_bytes);
    }
    let read =
        http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limits.max_body_bytes));
    let body = match tokio::time::timeout(limits.request_timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) => {
            counter("invalid");
            if error
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return too_large(limits.max_body_bytes);
            }
            return error_response(
                StatusCode::BAD_REQUEST,
                "cannot read the request body",
                None,
            );
        }
        Err(_) => {
            counter("invalid");
            return error_response(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
                None,
            );
        }
    };
    let parsed = serde_json::from_slice::<SendRequest>(&body)
        .map_err(|e| InvalidRequest::Json(e.to_string()));
    // The raw body is not needed once parsed: hold one copy, not two.
    drop(body);
    let built = parsed.and_then(|request| build_message(&request, limits.max_recipients));
    let BuiltMessage {
        mail_from,
        recipients,
        message_id,
        data,
        tags,
    } = match built {
        Ok(built) => built,
        Err(invalid) => {
            counter("invalid");
            return error_response(StatusCode::BAD_REQUEST, &invalid.to_string(), None);
        }
    };
    let submission = Submission {
        mail_from,
        recipients,
        data,
        tags,
    };
    match api.submit.submit(authorized, submission).await {
        Ok(id) => {
            counter("accepted");
            (
                StatusCode::ACCEPTED,
                axum::Json(SendAccepted { id, message_id }),
            )
                .into_response()
        }
        Err(refusal) => refusal_response(&state.metrics, &refusal),
    }
}

fn too_large(max: usize) -> Response {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("request body over the limit of {max} bytes"),
        None,
    )
}

/// Request extension marking a request that arrived over TLS.
#[derive(Clone, Copy, Debug)]
pub struct OverTls;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use crate::metrics::RelayMetrics;
    use crate::queue::{MessageFlags, NewMessage, Reschedule, SettleOp, Settlement, now_millis};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The shared in-memory backend: reachability is switched with
    /// `set_down`, stats come from real queue state.
    type FakeQueue = crate::queue::memory::MemoryBackend;

    /// Records submissions and answers with a scripted result. Only
    /// `app:s3cret` authenticates; anyone else without credentials is
    /// refused with 530 5.7.0, as from an untrusted network. `hold`
    /// keeps `authorize` waiting until the test releases it.
    struct RecordingSubmit {
        seen: Mutex<Vec<(Authorized, Submission)>>,
        answer: Result<String, Refusal>,
        anonymous_ok: bool,
        limits: SendLimits,
        hold: Option<Arc<tokio::sync::Semaphore>>,
        authorizing: tokio::sync::Semaphore,
    }

    impl RecordingSubmit {
        fn new(answer: Result<String, Refusal>) -> RecordingSubmit {
            RecordingSubmit {
                seen: Mutex::default(),
                answer,
                anonymous_ok: true,
                limits: SendLimits {
                    max_body_bytes: 4096,
                    max_recipients: 3,
                    max_requests: 8,
                    max_requests_per_client: 4,
                    request_timeout: Duration::from_secs(30),
                },
                hold: None,
                authorizing: tokio::sync::Semaphore::new(0),
            }
        }
    }

    #[async_trait]
    impl Submit for RecordingSubmit {
        async fn authorize(&self, client: HttpClient) -> Result<Authorized, Refusal> {
            self.authorizing.add_permits(1);
            if let Some(hold) = &self.hold {
                let _ = hold.acquire().await;
            }
            let user = match client.credentials {
                Some(c) if c.username == "app" && c.password == "s3cret" => Some(c.username),
                Some(_) => return Err(Refusal::AuthFailed),
                None if self.anonymous_ok => None,
                None => return Err(Refusal::Denied(crate::policy::Denied::AuthRequired)),
            };
            Ok(Authorized {
                peer: client.peer,
                user,
            })
        }
        async fn submit(&self, who: Authorized, submission: Submission) -> Result<String, Refusal> {
            self.seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((who, submission));
            self.answer.clone()
        }
        fn limits(&self) -> SendLimits {
            self.limits
        }
    }

    struct Server {
        addr: SocketAddr,
        health: Health,
        queue: Arc<FakeQueue>,
        metrics: RelayMetrics,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
        }
    }

    async fn start(submit: Option<Arc<dyn Submit>>) -> Server {
        let (registry, metrics) = RelayMetrics::standalone();
        let health = Health::new();
        let queue = Arc::new(FakeQueue::default());
        let mut state = HttpState::new(registry, health.clone(), queue.clone()).unwrap();
        if let Some(submit) = submit {
            state = state.with_send_api(submit);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, state, async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            health,
            queue,
            metrics,
            stop: Some(stop),
        }
    }

    /// One HTTP/1.1 request over a fresh TCP connection; (status, headers, body).
    async fn request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        extra: &str,
        body: &str,
    ) -> (u16, String, String) {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!(
                "{method} {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(req.as_bytes()).await.unwrap();
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.unwrap();
            String::from_utf8(raw).unwrap()
        };
        let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("HTTP exchange timed out");
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .expect("HTTP response has a head");
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_string(), body.to_string())
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let (status, _, body) = request(addr, "GET", path, "", "").await;
        (status, body)
    }

    #[test]
    fn readiness_decisions() {
        let up = Ok(());
        let down = Err(QueueError::Unavailable("refused".into()));
        assert_eq!(readiness(true, false, &up), Ok(()));
        assert_eq!(readiness(false, false, &up), Err(NotReady::ConfigNotLoaded));
        assert_eq!(readiness(true, true, &up), Err(NotReady::Draining));
        assert_eq!(readiness(false, true, &down), Err(NotReady::Draining));
        assert!(
            matches!(readiness(true, false, &down), Err(NotReady::QueueUnreachable(m)) if m.contains("refused"))
        );
    }

    #[tokio::test]
    async fn health_endpoints_follow_config_queue_and_draining() {
        let server = start(None).await;
        assert_eq!(get(server.addr, "/healthz").await, (200, "ok\n".into()));
        let (status, body) = get(server.addr, "/readyz").await;
        assert_eq!(
            (status, body.as_str()),
            (503, "not ready: config not loaded\n")
        );

        server.health.set_config_loaded(true);
        assert_eq!(get(server.addr, "/readyz").await.0, 200);
        let (_, metrics) = get(server.addr, "/metrics").await;
        assert!(metrics.contains("petrel_relay_ready 1"), "{metrics}");

        server.queue.set_down(true);
        let (status, body) = get(server.addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("queue backend unreachable"), "{body}");
        // Liveness ignores the queue: an outage must not restart pods.
        assert_eq!(get(server.addr, "/healthz").await.0, 200);

        server.queue.set_down(false);
        server.health.start_draining();
        assert_eq!(
            get(server.addr, "/readyz").await,
            (503, "not ready: draining\n".into())
        );
        let (_, metrics) = get(server.addr, "/metrics").await;
        assert!(metrics.contains("petrel_relay_ready 0"), "{metrics}");
        assert_eq!(get(server.addr, "/nope").await.0, 404);
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text_with_counter_values() {
        let server = start(None).await;
        server
            .metrics
            .received
            .with_label_values(&["example.com"])
            .inc_by(3);
        server
            .metrics
            .bounced
            .with_label_values(&["example.com", "gmail", "5.1"])
            .inc();
        let (status, head, body) = request(server.addr, "GET", "/metrics", "", "").await;
        assert_eq!(status, 200);
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(
            body.contains("# TYPE petrel_messages_received_total counter"),
            "{body}"
        );
        assert!(
            body.contains("petrel_messages_received_total{domain=\"example.com\"} 3"),
            "{body}"
        );
        assert!(
            body.contains("petrel_recipients_bounced_total{class=\"5.1\",destination=\"gmail\",domain=\"example.com\"} 1"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn queue_gauges_follow_stats() {
        let server = start(None).await;
        let now = now_millis();
        // 5 messages, 7 units: 3 leased of which 2 are rescheduled for
        // later, so 4 due, 2 deferred, 1 leased.
        let q = &server.queue;
        for (i, rcpts) in [
            vec!["a@x.test", "b@y.test", "c@z.test"],
            vec!["d@x.test"],
            vec!["e@x.test"],
            vec!["f@x.test"],
            vec!["g@x.test"],
        ]
        .into_iter()
        .enumerate()
        {
            let message = NewMessage {
                id: format!("m{i}"),
                mail_from: "s@example.test".into(),
                recipients: rcpts.into_iter().map(String::from).collect(),
                data: b"Subject: x\r\n\r\nbody\r\n".to_vec(),
                sending_domain: "example.test".into(),
                received_at: now - 90_000 + i as u64,
                flags: MessageFlags::default(),
                tags: Default::default(),
                header_message_id: None,
            };
            q.enqueue(message, Vec::new()).await.unwrap();
        }
        let leased = q.lease(now, 3, Duration::from_secs(3600)).await.unwrap();
        for lease in &leased[..2] {
            let later = Reschedule {
                recipients: lease.unit.recipients.clone(),
                next_attempt_at: now + 3_600_000,
                last_error: "451 later".into(),
                delay_notified: false,
            };
            q.settle(lease, Settlement::only(SettleOp::Retry(later)))
                .await
                .unwrap();
        }
        let task = crate::queue_gauges::spawn(
            server.queue.clone(),
            server.queue.clone(),
            server.metrics.clone(),
            Duration::from_millis(20),
        );
        // The first tick fires at once; wait until it has been recorded.
        let gauges = &server.metrics;
        tokio::time::timeout(Duration::from_secs(10), async {
            while gauges.queue_units.with_label_values(&["due"]).get() != 4 {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("gauges updated");
        task.abort();
        let (_, body) = get(server.addr, "/metrics").await;
        assert!(
            body.contains("petrel_queue_units{state=\"deferred\"} 2"),
            "{body}"
        );
        assert!(
            body.contains("petrel_queue_units{state=\"leased\"} 1"),
            "{body}"
        );
        let age = gauges.oldest_message_age.get();
        assert!((90..=100).contains(&age), "oldest age {age}");
    }

    const SEND: &str = r#"{"from":{"name":"Shop","email":"shop@example.com"},"to":["a@x.org"],"cc":["b@y.org"],"bcc":["A@x.org","c@z.org"],"subject":"Your receipt","text":"Thanks!","headers":{"X-Campaign":"receipts"}}"#;

    #[tokio::test]
    async fn send_api_builds_the_message_and_hands_it_to_the_accept_path() {
        let submit = Arc::new(RecordingSubmit::new(Ok("q-1".into())));
        let server = start(Some(submit.clone())).await;
        let auth = format!(
            "Authorization: Basic {}\r\nContent-Type: application/json\r\n",
            base64::engine::general_purpose::STANDARD.encode("app:s3cret")
        );
        let (status, _, body) = request(server.addr, "POST", "/v1/send", &auth, SEND).await;
        assert_eq!(status, 202, "{body}");
        let accepted: SendAccepted = serde_json::from_str(&body).unwrap();
        assert_eq!(accepted.id, "q-1");
        assert!(accepted.message_id.ends_with("@example.com"));

        let (who, sub) = submit.seen.lock().unwrap()[0].clone();
        assert_eq!(sub.mail_from, "shop@example.com");
        assert_eq!(sub.recipients, vec!["a@x.org", "b@y.org", "c@z.org"]);
        assert_eq!(who.user.as_deref(), Some("app"));
        assert_eq!(who.peer, IpAddr::from([127, 0, 0, 1]));
        let parsed = mail_parser::MessageParser::default()
            .parse(&sub.data)
            .expect("message parses");
        assert_eq!(parsed.subject(), Some("Your receipt"));
        assert_eq!(parsed.body_text(0).as_deref(), Some("Thanks!"));
        assert_eq!(parsed.message_id(), Some(accepted.message_id.as_str()));
        assert_eq!(
            parsed.header_raw("X-Campaign").map(str::trim),
            Some("receipts")
        );
        let text = String::from_utf8_lossy(&sub.data);
        assert!(
            !text.to_ascii_lowercase().contains("c@z.org"),
            "bcc must stay out of the headers"
        );

        let (_, metrics) = get(server.addr, "/metrics").await;
        assert!(
            metrics.contains("petrel_http_send_requests_total{result=\"accepted\"} 1"),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn send_api_maps_refusals_and_bad_requests() {
        let refusal = Refusal::Denied(crate::policy::Denied::UnknownDomain("bank.test".into()));
        let submit = Arc::new(RecordingSubmit::new(Err(refusal)));
        let server = start(Some(submit.clone())).await;
        let (status, _, body) = request(server.addr, "POST", "/v1/send", "", SEND).await;
        assert_eq!(status, 403);
        assert!(
            body.contains("\"enhanced\":\"5.7.1\"") && body.contains("not a sending domain"),
            "{body}"
        );

        let injected = SEND.replace("Your receipt", "hi\\r\\nBcc: evil@x.org");
        let (status, _, body) = request(server.addr, "POST", "/v1/send", "", &injected).await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("line breaks"), "{body}");

        let (status, _, body) = request(
            server.addr,
            "POST",
            "/v1/send",
            "",
            r#"{"from":"a@b.c","subject":"x","txt":"typo"}"#,
        )
        .await;
        assert_eq!(status, 400);
        assert!(body.contains("unknown field"), "{body}");

        let (status, _, _) = request(
            server.addr,
            "POST",
            "/v1/send",
            "Authorization: Bearer x\r\n",
            SEND,
        )
        .await;
        assert_eq!(status, 401);

        let big = format!(
            r#"{{"from":"a@b.c","to":["d@e.f"],"subject":"x","text":"{}"}}"#,
            "a".repeat(5000)
        );
        assert_eq!(
            request(server.addr, "POST", "/v1/send", "", &big).await.0,
            413
        );
        // Only the one well-formed request reached the accept path.
        assert_eq!(submit.seen.lock().unwrap().len(), 1);
    }

    /// Sends a request head announcing `length` body bytes, then `sent`
    /// of them, and reads the answer without sending the rest: the server
    /// must decide on what it has. (status, head, body).
    async fn partial(
        addr: SocketAddr,
        extra: &str,
        length: &str,
        sent: &[u8],
    ) -> (u16, String, String) {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("POST /v1/send HTTP/1.1\r\nHost: relay\r\n{extra}{length}\r\n");
            stream.write_all(req.as_bytes()).await.unwrap();
            stream.write_all(sent).await.unwrap();
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            // Until the head and the whole JSON body are in.
            loop {
                let n = stream.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                raw.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&raw).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let want = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    if body.len() >= want {
                        break;
                    }
                }
            }
            String::from_utf8(raw).unwrap()
        };
        let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("the server answered without the rest of the body");
        let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_string(), body.to_string())
    }

    #[tokio::test]
    async fn send_api_answers_credentials_and_size_before_reading_the_body() {
        let mut submit = RecordingSubmit::new(Ok("q-1".into()));
        submit.anonymous_ok = false;
        let submit = Arc::new(submit);
        let server = start(Some(submit.clone())).await;
        let basic = |creds: &str| {
            format!(
                "Authorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(creds)
            )
        };
        // 20 MB announced, nothing sent: the answer cannot depend on it.
        let big = "Content-Length: 20000000\r\n";
        let (status, head, body) = partial(server.addr, "", big, b"").await;
        assert_eq!(status, 401, "{head}");
        assert!(body.contains("\"enhanced\":\"5.7.0\""), "{body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: basic"),
            "{head}"
        );
        let (status, _, body) = partial(server.addr, &basic("app:wrong"), big, b"{").await;
        assert_eq!(status, 401);
        assert!(body.contains("\"enhanced\":\"5.7.8\""), "{body}");
        // Authenticated, but announcing more than the limit: 413 at once.
        let (status, _, _) = partial(server.addr, &basic("app:s3cret"), big, b"").await;
        assert_eq!(status, 413);
        // Chunked, no length announced: cut off when the bytes cross the
        // limit, not after buffering all of them.
        let chunk = format!("{:x}\r\n{}\r\n", 5000, "a".repeat(5000));
        let (status, _, _) = partial(
            server.addr,
            &basic("app:s3cret"),
            "Transfer-Encoding: chunked\r\n",
            chunk.as_bytes(),
        )
        .await;
        assert_eq!(status, 413);
        assert!(submit.seen.lock().unwrap().is_empty());
        let (_, metrics) = get(server.addr, "/metrics").await;
        assert!(
            metrics.contains("petrel_http_send_requests_total{result=\"unauthorized\"} 2"),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn send_api_times_out_a_body_that_does_not_arrive() {
        let mut submit = RecordingSubmit::new(Ok("q-1".into()));
        submit.limits.request_timeout = Duration::from_millis(300);
        let server = start(Some(Arc::new(submit))).await;
        let (status, _, body) =
            partial(server.addr, "", "Content-Length: 100\r\n", b"{\"from\":").await;
        assert_eq!(status, 408, "{body}");
    }

    #[tokio::test]
    async fn send_api_bounds_requests_in_flight_and_probes_keep_answering() {
        let hold = Arc::new(tokio::sync::Semaphore::new(0));
        let mut submit = RecordingSubmit::new(Ok("q-1".into()));
        submit.hold = Some(hold.clone());
        let submit = Arc::new(submit);
        let server = start(Some(submit.clone())).await;
        server.health.set_config_loaded(true);
        let per_client = submit.limits.max_requests_per_client as usize;
        let mut waiting = Vec::new();
        for _ in 0..per_client {
            let addr = server.addr;
            waiting.push(tokio::spawn(async move {
                request(addr, "POST", "/v1/send", "", SEND).await.0
            }));
        }
        // Every slot of this client is taken by a request inside authorize.
        let _all_in = tokio::time::timeout(
            Duration::from_secs(10),
            submit.authorizing.acquire_many(per_client as u32),
        )
        .await
        .expect("requests reached authorize")
        .unwrap();
        let (status, head, body) = request(server.addr, "POST", "/v1/send", "", SEND).await;
        assert_eq!(status, 429, "{body}");
        assert!(head.to_ascii_lowercase().contains("retry-after"), "{head}");
        assert!(body.contains("from your address"), "{body}");
        // The probes have their own budget.
        assert_eq!(get(server.addr, "/healthz").await.0, 200);
        assert_eq!(get(server.addr, "/readyz").await.0, 200);
        hold.add_permits(per_client);
        for w in waiting {
            assert_eq!(w.await.unwrap(), 202);
        }
        // Slots were given back.
        assert_eq!(
            request(server.addr, "POST", "/v1/send", "", SEND).await.0,
            202
        );
    }

    #[tokio::test]
    async fn send_api_is_off_unless_enabled() {
        let server = start(None).await;
        assert_eq!(
            request(server.addr, "POST", "/v1/send", "", SEND).await.0,
            404
        );
    }

    #[test]
    fn build_message_validates() {
        let base: SendRequest = serde_json::from_str(SEND).unwrap();
        let mut no_rcpt = base.clone();
        (no_rcpt.to, no_rcpt.cc, no_rcpt.bcc) = (vec![], vec![], vec![]);
        assert_eq!(
            build_message(&no_rcpt, 10).unwrap_err(),
            InvalidRequest::NoRecipients
        );
        assert_eq!(
            build_message(&base, 2).unwrap_err(),
            InvalidRequest::TooManyRecipients(3, 2)
        );
        let mut no_body = base.clone();
        no_body.text = None;
        assert_eq!(
            build_message(&no_body, 10).unwrap_err(),
            InvalidRequest::NoBody
        );
        let mut reserved = base.clone();
        reserved.headers.insert("DKIM-Signature".into(), "x".into());
        assert!(matches!(
            build_message(&reserved, 10),
            Err(InvalidRequest::Header(_))
        ));
        let mut bad_from = base.clone();
        bad_from.from = Mailbox::Address("no-at-sign".into());
        assert!(matches!(
            build_message(&bad_from, 10),
            Err(InvalidRequest::Address(_))
        ));
        let mut bad_rcpt = base;
        bad_rcpt.to = vec![Mailbox::Address("a@x.org>\r\nRCPT TO:<b@y.org".into())];
        assert!(matches!(
            build_message(&bad_rcpt, 10),
            Err(InvalidRequest::Address(_))
        ));
    }
}
