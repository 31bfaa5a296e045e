//! Delivering a report (RFC 8460 section 5): gzip, then `mailto:` as a
//! message through the relay's own queue, or `https:` as a POST.

use std::io::Write;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http_body_util::Full;
use hyper::body::Bytes;

use super::report::{Report, Submitter};
use crate::http_client::HttpClient;
use crate::queue::{MessageFlags, Millis, NewMessage};

/// The media type of a gzipped report (section 5.4).
pub const MEDIA_TYPE: &str = "application/tlsrpt+gzip";

/// Why a report could not be sent to one address.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The POST failed.
    #[error("POST {url}: {reason}")]
    Https {
        /// Where to.
        url: String,
        /// What happened.
        reason: String,
    },
    /// The report message could not be queued.
    #[error("cannot queue the report for {to}: {reason}")]
    Queue {
        /// For whom.
        to: String,
        /// What happened.
        reason: String,
    },
}

/// The report as gzipped JSON.
pub fn gzip(report: &Report) -> Vec<u8> {
    let json = serde_json::to_vec(report).unwrap_or_default();
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(&json);
    encoder.finish().unwrap_or_default()
}

fn seconds(day: &str, end: bool) -> i64 {
    let date = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").unwrap_or_default();
    let start = date
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc()
        .timestamp();
    if end { start + 86_399 } else { start }
}

/// The attachment's file name (section 5.3): `submitter!domain!begin!end.json.gz`.
pub fn filename(hostname: &str, domain: &str, day: &str) -> String {
    format!(
        "{hostname}!{domain}!{}!{}.json.gz",
        seconds(day, false),
        seconds(day, true)
    )
}

/// The report mail (section 5.3): multipart/report with report-type
/// tlsrpt, a short text part and the gzipped report, with the
/// `TLS-Report-Domain` and `TLS-Report-Submitter` headers and the
/// prescribed Subject. Unsigned: the caller adds DKIM.
pub fn message(
    submitter: &Submitter,
    from: &str,
    to: &str,
    day: &str,
    domain: &str,
    report: &Report,
    now: Millis,
) -> Vec<u8> {
    let date = chrono::DateTime::from_timestamp_millis(now as i64)
        .unwrap_or_default()
        .to_rfc2822();
    let boundary = format!("tlsrpt-{}", &super::record::day_of(now).replace('-', ""));
    let host = &submitter.hostname;
    let id = &report.report_id;
    let body = B64.encode(gzip(report));
    let mut out = String::new();
    out.push_str(&format!("From: <{from}>\r\n"));
    out.push_str(&format!("To: <{to}>\r\n"));
    out.push_str(&format!("Date: {date}\r\n"));
    out.push_str(&format!(
        "Subject: Report Domain: {domain} Submitter: {host} Report-ID: <{id}>\r\n"
    ));
    out.push_str(&format!(
        "Message-ID: <{}>\r\n",
        id.replace(['<', '>', ' '], "")
    ));
    out.push_str(&format!("TLS-Report-Domain: {domain}\r\n"));
    out.push_str(&format!("TLS-Report-Submitter: {host}\r\n"));
    out.push_str("MIME-Version: 1.0\r\n");
    out.push_str(&format!(
        "Content-Type: multipart/report; report-type=\"tlsrpt\"; boundary=\"{boundary}\"\r\n\r\n"
    ));
    out.push_str("This is a multipart message in MIME format.\r\n\r\n");
    out.push_str(&format!("--{boundary}\r\n"));
    out.push_str("Content-Type: text/plain; charset=\"us-ascii\"\r\n");
    out.push_str("Content-Transfer-Encoding: 7bit\r\n\r\n");
    out.push_str(&format!(
        "This is an aggregate TLS report from {host} for {domain} on {day}.\r\n\r\n"
    ));
    out.push_str(&format!("--{boundary}\r\n"));
    out.push_str(&format!("Content-Type: {MEDIA_TYPE}\r\n"));
    out.push_str("Content-Transfer-Encoding: base64\r\n");
    out.push_str(&format!(
        "Content-Disposition: attachment; filename=\"{}\"\r\n\r\n",
        filename(host, domain, day)
    ));
    for line in body.as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push_str("\r\n");
    }
    out.push_str(&format!("\r\n--{boundary}--\r\n"));
    out.into_bytes()
}

/// The queued message of a mailto report (id unique per day, domain and
/// address: queuing it twice stores it once). `data` is the signed
/// message; `now` the real time (it is when the message is due).
pub fn queued(
    from: &str,
    to: &str,
    day: &str,
    domain: &str,
    index: usize,
    data: Vec<u8>,
    now: Millis,
) -> NewMessage {
    NewMessage {
        id: format!("tlsrpt-{day}-{domain}-{index}"),
        mail_from: from.to_string(),
        recipients: vec![to.to_string()],
        data,
        sending_domain: crate::queue::recipient_domain(from).unwrap_or_default(),
        received_at: now,
        flags: MessageFlags {
            smtputf8: !to.is_ascii() || !from.is_ascii(),
            // Reports are not bounced back to a report address either
            // way; marking them as DSN-like keeps a failed report from
            // producing mail about mail about TLS.
            is_dsn: true,
            ..MessageFlags::default()
        },
        tags: Default::default(),
        header_message_id: None,
    }
}

/// POSTs the gzipped report to `url` (section 5.4): any 2xx is success.
pub async fn post(client: &HttpClient, url: &str, report: &Report) -> Result<(), SendError> {
    let err = |reason: String| SendError::Https {
        url: url.to_string(),
        reason,
    };
    let request = hyper::Request::post(url)
        .header(hyper::header::CONTENT_TYPE, MEDIA_TYPE)
        .header(hyper::header::USER_AGENT, "petrel-relay")
        .body(Full::new(Bytes::from(gzip(report))))
        .map_err(|e| err(e.to_string()))?;
    let response = client.send(request).await.map_err(|e| err(e.to_string()))?;
    if !response.status.is_success() {
        return Err(err(format!("answered {}", response.status)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::tls_rpt::report::build;
    use crate::delivery::tls_rpt::{Entry, Outcome, PolicyDesc};
    use mail_parser::MimeHeaders;
    use std::io::Read;

    #[test]
    fn the_mail_has_the_headers_and_a_gzipped_report() {
        let submitter = Submitter {
            organization: "Org".into(),
            contact: "postmaster@relay.test".into(),
            hostname: "relay.test".into(),
        };
        let counts = vec![(
            Entry {
                domain: "dest.test".into(),
                policy: PolicyDesc::none(),
                outcome: Outcome::Success,
            },
            4,
        )];
        let report = build(&submitter, "2026-12-01", "dest.test", &counts).unwrap();
        let now = 1_796_169_600_000 + 3_600_000;
        let data = message(
            &submitter,
            "postmaster@relay.test",
            "tls@dest.test",
            "2026-12-01",
            "dest.test",
            &report,
            now,
        );
        let parsed = mail_parser::MessageParser::default().parse(&data).unwrap();
        assert_eq!(
            parsed.subject(),
            Some(
                "Report Domain: dest.test Submitter: relay.test Report-ID: <2026-12-01T00:00:00Z_dest.test@relay.test>"
            )
        );
        let text = String::from_utf8_lossy(&data);
        assert!(
            text.contains("\r\nTLS-Report-Domain: dest.test\r\n"),
            "{text}"
        );
        assert!(
            text.contains("\r\nTLS-Report-Submitter: relay.test\r\n"),
            "{text}"
        );
        assert!(
            text.contains("filename=\"relay.test!dest.test!1796083200!1796169599.json.gz\""),
            "{text}"
        );
        let attachment = parsed.attachment(0).unwrap();
        assert_eq!(
            attachment.content_type().map(|c| format!(
                "{}/{}",
                c.ctype(),
                c.subtype().unwrap_or("")
            )),
            Some(MEDIA_TYPE.to_string())
        );
        let mut json = String::new();
        flate2::read::GzDecoder::new(attachment.contents())
            .read_to_string(&mut json)
            .unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value, serde_json::to_value(&report).unwrap());
    }
}
