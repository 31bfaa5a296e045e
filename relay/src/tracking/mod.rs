//! Engagement tracking: opens and clicks of HTML mail, opt-in per sending
//! domain (`domains[].tracking`).
//!
//! ```text
//! accept: strip X-Petrel-Track -> rewrite (links -> /c/<token>, pixel /o/<token>.gif) -> DKIM sign
//! HTTP:   GET /c/<token> -> 302 + clicked event ; GET /o/<token>.gif -> GIF + opened event
//! ```
//! - [`mime`]: finds `text/html` parts by byte range; [`transfer`]: QP and
//!   base64; [`rewrite`]: the pure rewriter over lol_html.
//! - [`token`]: HMAC-sealed tokens (queue id, recipient, URL).
//! - [`endpoints`]: the two HTTP endpoints, routed by Host.
//! - [`context`]: per-recipient copy ids and the tags and `Message-ID`
//!   the events carry.
//!
//! Every token names its recipient: a tracked message with several
//! recipients is queued as one copy per recipient (see [`context`]), so
//! `unique` counts the first open and click per recipient.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prometheus::{IntCounterVec, Opts, Registry};

use crate::config::{RelayConfig, SendingDomain};
use crate::inbound::headers;

pub mod context;
pub mod endpoints;
pub mod machine;
pub mod mime;
pub mod rewrite;
pub mod token;
pub mod transfer;

pub use rewrite::{Options, Rewritten, Skip, TokenFactory, rewrite};
pub use token::{Claims, Kind, TokenError, TokenKey};

/// The opt-out header: `X-Petrel-Track: off` leaves the message untracked.
/// It is removed before signing and delivery, tracking on or not.
pub const OPT_OUT_HEADER: &str = "X-Petrel-Track";

/// Name of the key file the relay creates beside the embedded queue when
/// no `tracking.keyFile` is configured.
pub const GENERATED_KEY_FILE: &str = "tracking.key";

/// Metrics of tracking.
#[derive(Clone)]
pub struct TrackingMetrics {
    /// Messages of tracking domains through the rewriter, by result
    /// (`rewritten` or why not).
    pub rewrites: IntCounterVec,
    /// Opens (pixel fetches), by sending domain and `machine`.
    pub opens: IntCounterVec,
    /// First opens per message and recipient, by domain and `machine`.
    pub unique_opens: IntCounterVec,
    /// Clicks (tracked link follows), by sending domain and `machine`.
    pub clicks: IntCounterVec,
    /// First clicks per message and recipient, by domain and `machine`.
    pub unique_clicks: IntCounterVec,
    /// Tracking requests refused, by reason (`bad_token`, `unknown_host`).
    pub refused: IntCounterVec,
}

impl TrackingMetrics {
    /// Creates and registers the tracking metrics in `registry`.
    pub fn register(registry: &Registry) -> Result<TrackingMetrics, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        Ok(TrackingMetrics {
            rewrites: counter(
                "petrel_tracking_rewrite_total",
                "Messages of tracking domains through the link rewriter, by result.",
                &["result"],
            )?,
            opens: counter(
                "petrel_tracking_opens_total",
                "Open pixel fetches, by sending domain; machine=true for mailbox-provider proxies.",
                &["domain", "machine"],
            )?,
            unique_opens: counter(
                "petrel_tracking_unique_opens_total",
                "First open per message and recipient.",
                &["domain", "machine"],
            )?,
            clicks: counter(
                "petrel_tracking_clicks_total",
                "Tracked link follows, by sending domain.",
                &["domain", "machine"],
            )?,
            unique_clicks: counter(
                "petrel_tracking_unique_clicks_total",
                "First click per message and recipient.",
                &["domain", "machine"],
            )?,
            refused: counter(
                "petrel_tracking_refused_total",
                "Tracking requests answered 404, by reason.",
                &["reason"],
            )?,
        })
    }
}

/// The tracking key, loaded once (or created for a local run), shared by
/// the rewriter and the endpoints.
pub struct Tracking {
    /// The configured key file, or the one beside the embedded queue.
    path: Option<PathBuf>,
    /// Whether the relay may create `path` (no keyFile configured).
    create: bool,
    key: Mutex<Option<TokenKey>>,
}

impl Tracking {
    /// Where the key comes from, per the config. A configured `keyFile` is
    /// read now, so a bad one stops the start with a clear error; the
    /// generated one is created now when some domain tracks, else on first
    /// use (a reload may turn tracking on).
    pub fn new(config: &RelayConfig) -> Result<Tracking, TokenError> {
        let (path, create) = match (&config.tracking.key_file, &config.queue.embedded) {
            (Some(path), _) => (Some(path.clone()), false),
            (None, Some(embedded)) => (Some(generated_key_path(&embedded.path)), true),
            (None, None) => (None, false),
        };
        let tracking = Tracking {
            path,
            create,
            key: Mutex::new(None),
        };
        if config.tracking.key_file.is_some() || config.tracking_enabled() {
            tracking.key()?;
        }
        Ok(tracking)
    }

    /// A fixed key (tests, fuzzing).
    pub fn with_key(key: TokenKey) -> Tracking {
        Tracking {
            path: None,
            create: false,
            key: Mutex::new(Some(key)),
        }
    }

    /// The key, loading (or creating) it on first use.
    pub fn key(&self) -> Result<TokenKey, TokenError> {
        let mut guard = self.key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(key) = guard.as_ref() {
            return Ok(key.clone());
        }
        let Some(path) = &self.path else {
            return Err(TokenError::KeyFile {
                path: PathBuf::new(),
                reason: "no tracking.keyFile configured".into(),
            });
        };
        let key = if self.create {
            let (key, created) = TokenKey::load_or_create(path)?;
            if created {
                tracing::warn!(path = %path.display(), "no tracking.keyFile configured; created a tracking key beside the embedded queue");
            }
            key
        } else {
            TokenKey::load(path)?
        };
        *guard = Some(key.clone());
        Ok(key)
    }

    /// The message as it will be signed for `recipient` under `queue_id`:
    /// the opt-out header removed and, when `domain` tracks and the message
    /// did not opt out, its HTML parts rewritten with tokens naming them.
    /// Never fails: a message that cannot be rewritten goes out as it came
    /// (counted in `petrel_tracking_rewrite_total`, once per call). `tracked`
    /// says whether the body now carries tokens, so whether each recipient
    /// needs a copy of its own.
    pub fn prepare(
        &self,
        data: Vec<u8>,
        domain: &SendingDomain,
        queue_id: &str,
        recipient: &str,
        metrics: &TrackingMetrics,
    ) -> Prepared {
        let (data, opt_out) = strip_opt_out(data);
        let Some(settings) = domain.tracking.as_ref().filter(|t| t.enabled()) else {
            return Prepared {
                data,
                tracked: false,
            };
        };
        let result = if opt_out {
            Err(Skip::OptedOut)
        } else if has_dkim_signature(&data) {
            Err(Skip::Signed)
        } else {
            match self.key() {
                Ok(key) => {
                    let mut tokens = Sealer {
                        key,
                        queue_id,
                        recipient,
                        sending_domain: &domain.domain,
                    };
                    let options = Options {
                        domain: &settings.domain,
                        scheme: settings.scheme(),
                        opens: settings.opens,
                        clicks: settings.clicks,
                    };
                    rewrite(&data, &options, &mut tokens)
                }
                Err(error) => {
                    tracing::error!(%error, "tracking key unusable; sending untracked");
                    Err(Skip::NoKey)
                }
            }
        };
        match result {
            Ok(done) => {
                metrics.rewrites.with_label_values(&["rewritten"]).inc();
                for skip in &done.skipped {
                    tracing::debug!(%queue_id, reason = %skip, "HTML part left untracked");
                }
                Prepared {
                    data: done.data,
                    tracked: true,
                }
            }
            Err(skip) => {
                metrics.rewrites.with_label_values(&[skip.label()]).inc();
                if skip.is_warning() {
                    tracing::warn!(%queue_id, reason = %skip, "message sent untracked");
                }
                Prepared {
                    data,
                    tracked: false,
                }
            }
        }
    }
}

/// A message ready for signing, from [`Tracking::prepare`].
#[derive(Debug)]
pub struct Prepared {
    /// The message bytes.
    pub data: Vec<u8>,
    /// Its HTML carries tracking tokens (for one recipient).
    pub tracked: bool,
}

/// `<dir of the queue file>/tracking.key`.
pub fn generated_key_path(queue_file: &Path) -> PathBuf {
    queue_file
        .parent()
        .unwrap_or(Path::new("."))
        .join(GENERATED_KEY_FILE)
}

/// Token factory of one message.
struct Sealer<'a> {
    key: TokenKey,
    queue_id: &'a str,
    recipient: &'a str,
    sending_domain: &'a str,
}

impl Sealer<'_> {
    fn claims(&self, kind: Kind, url: &str) -> Claims {
        Claims {
            kind,
            queue_id: self.queue_id.to_string(),
            recipient: self.recipient.to_string(),
            sending_domain: self.sending_domain.to_string(),
            url: url.to_string(),
        }
    }
}

impl TokenFactory for Sealer<'_> {
    fn open(&mut self) -> String {
        // Fields were bounded by the accept path (queue id, address length,
        // configured domain); an impossible failure yields a dead pixel.
        self.key
            .seal(&self.claims(Kind::Open, ""))
            .unwrap_or_default()
    }

    fn click(&mut self, url: &str) -> Option<String> {
        self.key.seal(&self.claims(Kind::Click, url)).ok()
    }
}

/// Removes every `X-Petrel-Track` field from the header section; true when
/// one said `off`. A message without the header is returned untouched.
pub fn strip_opt_out(data: Vec<u8>) -> (Vec<u8>, bool) {
    let hlen = headers::header_len(&data);
    if !headers::has_header(&data[..hlen], OPT_OUT_HEADER) {
        return (data, false);
    }
    let mut out = Vec::with_capacity(data.len());
    let mut opt_out = false;
    let mut skipping = false;
    let mut pos = 0;
    while pos < hlen {
        let end = data[pos..hlen]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(hlen, |e| pos + e + 2);
        let line = &data[pos..end];
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        if !continuation {
            skipping = field_named(line, OPT_OUT_HEADER);
            if skipping {
                let value = &line[OPT_OUT_HEADER.len()..];
                let value = value.trim_ascii_start().strip_prefix(b":").unwrap_or(value);
                opt_out |= value.trim_ascii().eq_ignore_ascii_case(b"off");
            }
        }
        if !skipping {
            out.extend_from_slice(line);
        }
        pos = end;
    }
    out.extend_from_slice(&data[hlen..]);
    (out, opt_out)
}

fn field_named(line: &[u8], name: &str) -> bool {
    line.len() > name.len()
        && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
        && line[name.len()..]
            .iter()
            .find(|&&b| b != b' ' && b != b'\t')
            == Some(&b':')
}

/// A signature the client made itself would break if the body changed.
fn has_dkim_signature(data: &[u8]) -> bool {
    headers::has_header(&data[..headers::header_len(data)], "DKIM-Signature")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opt_out_header_is_removed() {
        let table: &[(&[u8], &[u8], bool)] = &[
            (b"Subject: a\r\n\r\nbody", b"Subject: a\r\n\r\nbody", false),
            (
                b"X-Petrel-Track: off\r\nSubject: a\r\n\r\nX-Petrel-Track: off\r\n",
                b"Subject: a\r\n\r\nX-Petrel-Track: off\r\n",
                true,
            ),
            (
                b"Subject: a\r\nx-petrel-track:  OFF \r\n\r\nb",
                b"Subject: a\r\n\r\nb",
                true,
            ),
            (
                b"X-Petrel-Track: on\r\nTo: b\r\n\r\nb",
                b"To: b\r\n\r\nb",
                false,
            ),
            (
                b"X-Petrel-Track:\r\n off\r\nTo: b\r\n\r\nb",
                b"To: b\r\n\r\nb",
                false,
            ),
            (
                b"X-Petrel-Tracking: off\r\n\r\nb",
                b"X-Petrel-Tracking: off\r\n\r\nb",
                false,
            ),
        ];
        for (input, want, opted) in table {
            let (out, opt_out) = strip_opt_out(input.to_vec());
            assert_eq!(out, *want, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(opt_out, *opted, "{:?}", String::from_utf8_lossy(input));
        }
    }
}
