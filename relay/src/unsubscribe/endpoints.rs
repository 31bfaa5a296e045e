//! The unsubscribe endpoints on the relay's HTTP port (`unsubscribe.baseUrl`
//! routes here):
//!
//! - `POST /u/<token>` with the form body `List-Unsubscribe=One-Click`
//!   (RFC 8058; also what the confirm page posts): suppresses the
//!   recipient for the sending domain (`feedback::apply::unsubscribe`,
//!   reason `unsubscribe`, event `unsubscribed`) before answering 200.
//! - `GET /u/<token>`: a minimal page with a confirm button (a POST form).
//!   It never unsubscribes: mailbox providers' link scanners fetch links.
//!
//! A token this relay did not seal gets 404, whatever the method.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::UnsubscribeMetrics;
use super::headers::ONE_CLICK;
use crate::config::RelayConfig;
use crate::events::EventLog;
use crate::feedback::apply::{self, Via};
use crate::feedback::{Feedback, UnsubscribeClaims};
use crate::queue::{SharedState, now_millis};
use crate::reload::Reloading;

/// Largest body a POST may have: the one-click form is 26 bytes.
const MAX_BODY: usize = 4096;
/// The hidden field the confirm page adds, to tell its POSTs apart.
const PAGE_FIELD: &str = "source=page";

/// What the endpoints share.
#[derive(Clone)]
pub struct Endpoints {
    /// The relay config (the queue timeout).
    pub config: Reloading<RelayConfig>,
    /// The keys that open tokens.
    pub feedback: Arc<Feedback>,
    /// Where the suppression goes.
    pub state: Arc<dyn SharedState>,
    /// Where the `unsubscribed` event goes.
    pub events: Arc<dyn EventLog>,
    /// Metrics.
    pub metrics: UnsubscribeMetrics,
    /// This relay's name in events.
    pub relay: String,
}

/// The route `/u/{token}`, to merge into the HTTP router.
pub fn router(endpoints: Endpoints) -> Router {
    Router::new()
        .route("/u/{token}", get(page).post(unsubscribe))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(endpoints)
}

/// Why a token was not honoured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    /// Not sealed by this relay's key: 404.
    BadToken,
    /// The key cannot be loaded: 503.
    NoKey,
}

impl Endpoints {
    fn open(&self, token: &str) -> Result<UnsubscribeClaims, Refused> {
        let keys = self.feedback.keys().map_err(|error| {
            tracing::error!(%error, "feedback key unusable; refusing unsubscribe requests");
            Refused::NoKey
        })?;
        keys.open_unsubscribe(token).map_err(|_| Refused::BadToken)
    }

    fn refuse(&self, refused: Refused) -> Response {
        match refused {
            Refused::BadToken => self.answer("bad_token", StatusCode::NOT_FOUND, "not found\n"),
            Refused::NoKey => self.answer(
                "unavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                "try again later\n",
            ),
        }
    }

    fn answer(&self, result: &str, status: StatusCode, text: &'static str) -> Response {
        self.metrics.requests.with_label_values(&[result]).inc();
        (status, text).into_response()
    }
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}

fn escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '&' => "&amp;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&#39;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// Whether a POST body is the one-click form: `List-Unsubscribe=One-Click`
/// URL-encoded (with other fields allowed) or as a multipart field.
pub fn is_one_click(headers: &HeaderMap, body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body);
    let multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    if multipart {
        return text.contains("name=\"List-Unsubscribe\"")
            && text.lines().any(|l| l.trim() == "One-Click");
    }
    text.trim().split('&').any(|field| field == ONE_CLICK)
}

async fn page(State(e): State<Endpoints>, Path(token): Path<String>) -> Response {
    let claims = match e.open(&token) {
        Ok(c) => c,
        Err(refused) => return e.refuse(refused),
    };
    e.metrics.requests.with_label_values(&["page"]).inc();
    let body = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><meta name=\"robots\" content=\"noindex\">\
         <title>Unsubscribe</title></head><body>\n\
         <p>Stop mail from {domain} to {address}?</p>\n\
         <form method=\"post\"><input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
         <input type=\"hidden\" name=\"source\" value=\"page\">\
         <button type=\"submit\">Unsubscribe</button></form>\n</body></html>\n",
        domain = escape(&claims.sending_domain),
        address = escape(&claims.recipient),
    );
    html(StatusCode::OK, body)
}

async fn unsubscribe(
    State(e): State<Endpoints>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let claims = match e.open(&token) {
        Ok(c) => c,
        Err(refused) => return e.refuse(refused),
    };
    if !is_one_click(&headers, &body) {
        return e.answer(
            "bad_body",
            StatusCode::BAD_REQUEST,
            "expected the form body List-Unsubscribe=One-Click\n",
        );
    }
    let via = if String::from_utf8_lossy(&body)
        .split('&')
        .any(|f| f == PAGE_FIELD)
    {
        Via::Page
    } else {
        Via::OneClick
    };
    let timeout: Duration = e.config.get().queue.timeout.into();
    let done = tokio::time::timeout(
        timeout,
        apply::unsubscribe(
            e.state.as_ref(),
            e.events.as_ref(),
            &claims,
            via,
            now_millis(),
            &e.relay,
        ),
    )
    .await;
    match done {
        Ok(Ok(())) => {
            e.metrics
                .requests
                .with_label_values(&["unsubscribed"])
                .inc();
            tracing::info!(event = "unsubscribed", domain = %claims.sending_domain, via = via.describe(), "recipient unsubscribed");
            html(
                StatusCode::OK,
                format!(
                    "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Unsubscribed</title></head>\
                     <body><p>{} will get no more mail from {}.</p></body></html>\n",
                    escape(&claims.recipient),
                    escape(&claims.sending_domain)
                ),
            )
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot record an unsubscribe");
            e.answer(
                "unavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                "try again later\n",
            )
        }
        Err(_) => {
            tracing::warn!("recording an unsubscribe timed out");
            e.answer(
                "unavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                "try again later\n",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_click_bodies() {
        let form = HeaderMap::new();
        assert!(is_one_click(&form, b"List-Unsubscribe=One-Click"));
        assert!(is_one_click(
            &form,
            b"List-Unsubscribe=One-Click&source=page"
        ));
        assert!(!is_one_click(&form, b""));
        assert!(!is_one_click(&form, b"List-Unsubscribe=No"));
        let mut multi = HeaderMap::new();
        multi.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=b"),
        );
        let body = b"--b\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--b--\r\n";
        assert!(is_one_click(&multi, body));
        assert!(!is_one_click(&multi, b"--b\r\n\r\nOne-Click\r\n--b--\r\n"));
        assert_eq!(escape("<a&\"b'>"), "&lt;a&amp;&quot;b&#39;&gt;");
    }
}
