//! The admin API of the guard (guarded by [`crate::admin`]), what the
//! operator polls for the SendingDomain's `Paused` and
//! `ReputationWarning` conditions:
//!
//! - `GET /admin/v1/reputation`: every configured sending domain, freshly
//!   evaluated: `{"domains":[{"domain","state","reason","message",
//!   "bounceRate","complaintRate","volume","since"}]}`;
//! - `POST /admin/v1/reputation/<domain>/resume`: unpauses and resets the
//!   window, `{"domain":..,"state":"ok"}`; 404 for an unknown domain.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;

use super::rates::{Level, Reason};
use super::{DomainState, Guard, ReputationMetrics};
use crate::admin::AdminDenied;
use crate::queue::now_millis;

/// What the endpoints share.
#[derive(Clone)]
pub struct Endpoints {
    /// The guard.
    pub guard: Guard,
    /// Gauges updated by every answer.
    pub metrics: ReputationMetrics,
}

/// The two routes, to merge into the HTTP router.
pub fn router(endpoints: Endpoints) -> Router {
    Router::new()
        .route("/admin/v1/reputation", get(list))
        .route("/admin/v1/reputation/{domain}/resume", post(resume))
        .with_state(endpoints)
}

/// One domain in `GET /admin/v1/reputation`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainStatus {
    /// The sending domain, lower-cased.
    pub domain: String,
    /// `ok`, `warning` or `paused`.
    pub state: Level,
    /// `BounceRateExceeded` or `ComplaintRateExceeded`; null when ok.
    pub reason: Option<Reason>,
    /// `bounce rate 7.2% over 24h exceeds 5%`; null when ok.
    pub message: Option<String>,
    /// Hard bounces / (delivered + hard bounces), a fraction.
    pub bounce_rate: f64,
    /// Complaints / delivered, a fraction.
    pub complaint_rate: f64,
    /// Delivered + hard bounces in the window.
    pub volume: u64,
    /// When the state began (RFC 3339); null when ok.
    pub since: Option<String>,
}

impl DomainStatus {
    /// The status of `record`. A pause shows the numbers that caused it.
    pub fn of(domain: String, record: &DomainState) -> DomainStatus {
        DomainStatus {
            domain,
            state: record.level,
            reason: record.reason,
            message: record.message.clone(),
            bounce_rate: record.counts.bounce_rate(),
            complaint_rate: record.counts.complaint_rate(),
            volume: record.counts.volume(),
            since: record.since.map(crate::events::format_timestamp),
        }
    }
}

#[derive(Serialize)]
struct List {
    domains: Vec<DomainStatus>,
}

#[derive(Serialize)]
struct Resumed {
    domain: String,
    state: Level,
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": { "message": message } });
    (status, axum::Json(body)).into_response()
}

async fn gate(guard: &Guard, peer: SocketAddr, headers: &HeaderMap) -> Result<(), AdminDenied> {
    let config = guard.config();
    crate::admin::check(
        peer.ip(),
        headers,
        &config.trusted_networks,
        config.http.admin_token_file.as_deref(),
    )
    .await
}

fn denied(denied: AdminDenied) -> Response {
    let mut response = error(denied.status(), &denied.to_string());
    if denied.status() == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

async fn list(
    State(e): State<Endpoints>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(why) = gate(&e.guard, peer, &headers).await {
        return denied(why);
    }
    match e.guard.evaluate_all(now_millis()).await {
        Ok(all) => {
            let domains = all
                .into_iter()
                .map(|(domain, record)| {
                    e.metrics.show(&domain, &record);
                    DomainStatus::of(domain, &record)
                })
                .collect();
            axum::Json(List { domains }).into_response()
        }
        Err(err) => error(StatusCode::SERVICE_UNAVAILABLE, &err.to_string()),
    }
}

async fn resume(
    State(e): State<Endpoints>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(domain): Path<String>,
) -> Response {
    if let Err(why) = gate(&e.guard, peer, &headers).await {
        return denied(why);
    }
    match e.guard.resume(&domain).await {
        Ok(Some(record)) => {
            let domain = domain.to_ascii_lowercase();
            e.metrics.show(&domain, &record);
            axum::Json(Resumed {
                domain,
                state: record.level,
            })
            .into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            &format!("{domain} is not a sending domain of this relay"),
        ),
        Err(err) => error(StatusCode::SERVICE_UNAVAILABLE, &err.to_string()),
    }
}
