//! The queue admin API (`/admin/v1/queue/...`, table in
//! [`crate::queue_ctl::remote`]): what `petrel-relay queue` uses while this
//! relay holds the embedded queue file. Behind the admin guard
//! ([`crate::admin`]): loopback, `trustedNetworks`, or the bearer token of
//! `http.adminTokenFile`; anything else is refused before any work.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;

use crate::config::RelayConfig;
use crate::queue::{Backend, UnitState, now_millis};
use crate::queue_ctl::{ActionContext, Command, CtlError, ExitStatus, ListFilter, RetryTarget};
use crate::reload::Reloading;

/// What the queue admin API serves from.
#[derive(Clone)]
pub struct AdminQueue {
    /// The relay's backend.
    pub backend: Backend,
    /// The relay config (guard settings, hostname for DSNs).
    pub config: Reloading<RelayConfig>,
}

/// The routes, with their state.
pub fn router(state: AdminQueue) -> Router {
    const BASE: &str = "/admin/v1/queue";
    Router::new()
        .route(&format!("{BASE}/stats"), get(stats))
        .route(&format!("{BASE}/messages"), get(list))
        .route(&format!("{BASE}/messages/{{id}}"), get(show).delete(delete))
        .route(&format!("{BASE}/messages/{{id}}/retry"), post(retry_id))
        .route(&format!("{BASE}/messages/{{id}}/bounce"), post(bounce))
        .route(&format!("{BASE}/retry"), post(retry_domain))
        .route(
            &format!("{BASE}/holds/{{domain}}"),
            put(hold).delete(release),
        )
        .with_state(state)
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": { "message": message } });
    (status, axum::Json(body)).into_response()
}

/// Checks the guard, then runs `command`.
async fn run(
    state: &AdminQueue,
    peer: SocketAddr,
    headers: &HeaderMap,
    command: Command,
) -> Response {
    let config = state.config.get();
    if let Err(denied) = crate::admin::check(
        peer.ip(),
        headers,
        &config.trusted_networks,
        config.http.admin_token_file.as_deref(),
    )
    .await
    {
        let mut response = error(denied.status(), &denied.to_string());
        if denied.status() == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        return response;
    }
    let ctx = ActionContext::of(&config);
    match crate::queue_ctl::execute(&state.backend, &ctx, command, now_millis()).await {
        Ok(output) => axum::Json(output).into_response(),
        Err(e) => {
            let status = match e.status() {
                ExitStatus::Usage => StatusCode::BAD_REQUEST,
                ExitStatus::NotFound => StatusCode::NOT_FOUND,
                ExitStatus::Busy => StatusCode::CONFLICT,
                ExitStatus::Ok | ExitStatus::Error => StatusCode::SERVICE_UNAVAILABLE,
            };
            if let CtlError::Queue(error) = &e {
                tracing::warn!(%error, "queue admin command failed");
            }
            error(status, &e.to_string())
        }
    }
}

type Peer = ConnectInfo<SocketAddr>;

async fn stats(State(s): State<AdminQueue>, ConnectInfo(p): Peer, h: HeaderMap) -> Response {
    run(&s, p, &h, Command::Stats).await
}

/// Query of `GET /admin/v1/queue/messages`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    domain: Option<String>,
    state: Option<UnitState>,
    older_than_ms: Option<u64>,
}

async fn list(
    State(s): State<AdminQueue>,
    ConnectInfo(p): Peer,
    h: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let filter = ListFilter {
        domain: q.domain,
        state: q.state,
        older_than_ms: q.older_than_ms,
    };
    run(&s, p, &h, Command::List(filter)).await
}

async fn show(
    State(s): State<AdminQueue>,
    ConnectInfo(p): Peer,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    run(&s, p, &h, Command::Show { id }).await
}

async fn delete(
    State(s): State<AdminQueue>,
    ConnectInfo(p): Peer,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    run(&s, p, &h, Command::Delete { id }).await
}

async fn retry_id(
    State(s): State<AdminQueue>,
    ConnectInfo(p): Peer,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let target = RetryTarget::Id(id);
    run(&s, p, &h, Command::Retry { target }).await
}

/// Query of `POST /admin/v1/queue/retry`.
#[derive(Debug, Deserialize)]
struct DomainQuery {
    domain: String,
}

async fn retry_domain(
    State(s): State<AdminQueue>,
    ConnectInfo(p): Peer,
    h: HeaderMap,
    Query(q): Query<DomainQuery>,
) -> Response {
    let target = RetryTarget::Domain(q.domain);
    run(&s, p, &h, Command::Retry { target }).await
}

/// Body of `POST /admin/v1/queue/messages/{id}/bounce` (optional).
#[derive(Debug, Default, Deserialize)]
struct BounceBody {
    reason: Option<String>,
}

async fn bounce(
    State(s): State<AdminQueue>,
    ConnectInfo(p): Peer,
    h: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let reason = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice::<BounceBody>(&body) {
            Ok(b) => b.reason,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad body: {e}")),
        }
    };
    run(&s, p, &h, Command::Bounce { id, reason }).await
}

async fn hold(
    State(s): State<AdminQueue>,
    ConnectInfo(p): Peer,
    h: HeaderMap,
    Path(domain): Path<String>,
) -> Response {
    run(&s, p, &h, Command::Hold { domain }).await
}

async fn release(
    State(s): State<AdminQueue>,
    ConnectInfo(p): Peer,
    h: HeaderMap,
    Path(domain): Path<String>,
) -> Response {
    run(&s, p, &h, Command::Release { domain }).await
}
