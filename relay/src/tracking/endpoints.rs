//! The tracking endpoints on the relay's HTTP port, answered only for a
//! Host that is a configured tracking domain:
//!
//! - `GET /c/<token>`: 302 to the link's original URL, and a `clicked` event.
//! - `GET /o/<token>.gif`: a 43-byte transparent GIF that no one may cache,
//!   and an `opened` event.
//!
//! A token that does not verify gets 404, never a redirect: the URL comes
//! only from a token this relay sealed. Recording never stands in the way
//! of the reader: when the backend is away the redirect and the pixel are
//! still served, and the failure is logged.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::context::{self, EventContext};
use super::machine::is_machine;
use super::token::{Claims, Kind};
use super::{Tracking, TrackingMetrics};
use crate::config::RelayConfig;
use crate::events::{Event, EventLog, EventType};
use crate::queue::{SharedState, now_millis};
use crate::reload::Reloading;

/// The transparent 1x1 GIF89a.
pub const PIXEL: [u8; 43] = [
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// How long the first open or click of a message copy and its recipient
/// is remembered (the `unique` flag): later ones within it are repeats.
pub const UNIQUE_WINDOW: Duration = Duration::from_secs(90 * 24 * 3600);

/// Longest user agent recorded in an event.
const MAX_USER_AGENT: usize = 512;

/// What the endpoints share.
#[derive(Clone)]
pub struct Endpoints {
    /// The relay config: which hosts are tracking domains.
    pub config: Reloading<RelayConfig>,
    /// The key that opens tokens.
    pub tracking: Arc<Tracking>,
    /// Counters shared by all pods (first open / first click).
    pub state: Arc<dyn SharedState>,
    /// Where `opened` and `clicked` events go.
    pub events: Arc<dyn EventLog>,
    /// Metrics.
    pub metrics: TrackingMetrics,
    /// This relay's name in events.
    pub relay: String,
}

/// The routes `/c/{token}` and `/o/{file}`, to merge into the HTTP router.
pub fn router(endpoints: Endpoints) -> Router {
    Router::new()
        .route("/c/{token}", get(click))
        .route("/o/{file}", get(open))
        .with_state(endpoints)
}

/// What one request asked for, once its Host and token checked out.
struct Verified {
    claims: Claims,
    user_agent: Option<String>,
    machine: bool,
}

impl Endpoints {
    /// Checks Host and token; `Err` is the reason of the 404 to answer.
    fn verify(
        &self,
        headers: &HeaderMap,
        token: &str,
        kind: Kind,
    ) -> Result<Verified, &'static str> {
        let config = self.config.get();
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if config.tracking_for_host(host).is_none() {
            return Err("unknown_host");
        }
        let key = self.tracking.key().map_err(|error| {
            tracing::error!(%error, "tracking key unusable; refusing tracking requests");
            "no_key"
        })?;
        let claims = key
            .open(token)
            .ok()
            .filter(|c| c.kind == kind)
            .ok_or("bad_token")?;
        let user_agent = headers
            .get(header::USER_AGENT)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .map(|ua| ua.chars().take(MAX_USER_AGENT).collect::<String>());
        let machine = is_machine(user_agent.as_deref());
        Ok(Verified {
            claims,
            user_agent,
            machine,
        })
    }

    fn refuse(&self, reason: &str) -> Response {
        self.metrics.refused.with_label_values(&[reason]).inc();
        (StatusCode::NOT_FOUND, "not found\n").into_response()
    }

    /// Counts the request, decides `unique` and publishes the event.
    async fn record(&self, v: Verified, kind: EventType) {
        let timeout: Duration = self.config.get().queue.timeout.into();
        let c = &v.claims;
        let what = if kind == EventType::Opened {
            "open"
        } else {
            "click"
        };
        let key = format!("tracking:{what}:{}:{}", c.queue_id, c.recipient);
        let (counted, loaded) = tokio::join!(
            tokio::time::timeout(timeout, self.state.incr_counter(&key, 1, UNIQUE_WINDOW)),
            tokio::time::timeout(timeout, context::load(self.state.as_ref(), &c.queue_id)),
        );
        let context = match loaded {
            Ok(Ok(context)) => context,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot read tracking event context; event without tags");
                EventContext::default()
            }
            Err(_) => {
                tracing::warn!("reading tracking event context timed out; event without tags");
                EventContext::default()
            }
        };
        let unique = match counted {
            Ok(Ok(n)) => Some(n == 1),
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot count tracking request; unique unknown");
                None
            }
            Err(_) => {
                tracing::warn!("counting a tracking request timed out; unique unknown");
                None
            }
        };
        let machine = if v.machine { "true" } else { "false" };
        let labels = [c.sending_domain.as_str(), machine];
        let (total, first) = if kind == EventType::Opened {
            (&self.metrics.opens, &self.metrics.unique_opens)
        } else {
            (&self.metrics.clicks, &self.metrics.unique_clicks)
        };
        total.with_label_values(&labels).inc();
        if unique == Some(true) {
            first.with_label_values(&labels).inc();
        }
        let event = engagement_event(kind, &self.relay, &v, unique, context);
        match tokio::time::timeout(timeout, self.events.publish(&[event])).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "cannot record tracking event"),
            Err(_) => tracing::warn!("recording a tracking event timed out"),
        }
    }
}

/// The `opened` / `clicked` event of a verified request.
fn engagement_event(
    kind: EventType,
    relay: &str,
    v: &Verified,
    unique: Option<bool>,
    context: EventContext,
) -> Event {
    let c = &v.claims;
    let mut event = Event::new(kind, relay, now_millis());
    event.queue_id = Some(c.queue_id.clone());
    event.tags = context.tags;
    event.header_message_id = context.header_message_id;
    event.sending_domain = Some(c.sending_domain.clone());
    if !c.recipient.is_empty() {
        event.recipient = Some(c.recipient.clone());
        event.destination = crate::queue::recipient_domain(&c.recipient);
    }
    if kind == EventType::Clicked {
        event.url = Some(c.url.clone());
    }
    event.user_agent = v.user_agent.clone();
    event.machine = Some(v.machine);
    event.unique = unique;
    event
}

async fn click(
    State(e): State<Endpoints>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> Response {
    let verified = match e.verify(&headers, &token, Kind::Click) {
        Ok(v) => v,
        Err(reason) => return e.refuse(reason),
    };
    let Ok(location) = HeaderValue::from_str(&location(&verified.claims.url)) else {
        return e.refuse("bad_token");
    };
    e.record(verified, EventType::Clicked).await;
    let mut response = StatusCode::FOUND.into_response();
    let h = response.headers_mut();
    h.insert(header::LOCATION, location);
    no_cache(h);
    response
}

async fn open(
    State(e): State<Endpoints>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(token) = file.strip_suffix(".gif") else {
        return e.refuse("bad_token");
    };
    let verified = match e.verify(&headers, token, Kind::Open) {
        Ok(v) => v,
        Err(reason) => return e.refuse(reason),
    };
    e.record(verified, EventType::Opened).await;
    let mut response = PIXEL.to_vec().into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/gif"));
    no_cache(h);
    response
}

/// Every fetch must reach us: proxies and clients may not keep a copy.
fn no_cache(h: &mut HeaderMap) {
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, must-revalidate, private, max-age=0"),
    );
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert(header::EXPIRES, HeaderValue::from_static("0"));
}

/// The URL as a Location header: bytes outside visible ASCII percent-encoded
/// (a link written in Latin-1 or UTF-8 HTML may carry them).
pub fn location(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    for b in url.bytes() {
        if b.is_ascii_graphic() {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pixel_is_a_1x1_gif() {
        assert_eq!(PIXEL.len(), 43);
        assert!(PIXEL.starts_with(b"GIF89a"));
        assert_eq!(u16::from_le_bytes([PIXEL[6], PIXEL[7]]), 1);
        assert_eq!(u16::from_le_bytes([PIXEL[8], PIXEL[9]]), 1);
        assert_eq!(PIXEL[42], 0x3b);
    }

    #[test]
    fn locations_are_header_safe() {
        assert_eq!(
            location("https://a.example/?q=1&r=2"),
            "https://a.example/?q=1&r=2"
        );
        assert_eq!(
            location("https://a.example/caf\u{e9} x"),
            "https://a.example/caf%C3%A9%20x"
        );
    }
}
