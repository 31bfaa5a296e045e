//! SMTP replies as values: a refusal is a [`Reject`], not a string, so the
//! code, enhanced status and whether to hang up travel together and tests
//! can compare them.

use std::fmt::Write as _;

/// A refusal: what the client is told, and whether the session ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// Reply code (4xx temporary, 5xx permanent).
    pub code: u16,
    /// Enhanced status code (RFC 3463), e.g. `5.7.1`.
    pub esc: &'static str,
    /// Human-readable text, one line.
    pub message: String,
    /// Close the connection after replying.
    pub disconnect: bool,
    /// Bounded label for the rejection metric.
    pub reason: &'static str,
}

impl Reject {
    /// A refusal that keeps the session open.
    pub fn new(
        code: u16,
        esc: &'static str,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Reject {
        Reject {
            code,
            esc,
            message: message.into(),
            disconnect: false,
            reason,
        }
    }

    /// The same refusal, closing the connection afterwards.
    pub fn and_disconnect(mut self) -> Reject {
        self.disconnect = true;
        self
    }

    /// 503 5.5.1: command out of sequence.
    pub fn bad_sequence(message: impl Into<String>) -> Reject {
        Reject::new(503, "5.5.1", "bad_sequence", message)
    }

    /// 501 5.5.2: syntax error in parameters.
    pub fn syntax(message: impl Into<String>) -> Reject {
        Reject::new(501, "5.5.2", "syntax", message)
    }

    /// 451 4.3.0: something on our side failed; try again later.
    pub fn temporary(reason: &'static str, message: impl Into<String>) -> Reject {
        Reject::new(451, "4.3.0", reason, message)
    }

    /// 421 4.3.2: the relay is shutting down.
    pub fn shutting_down() -> Reject {
        Reject::new(
            421,
            "4.3.2",
            "shutdown",
            "Service shutting down, try again later",
        )
        .and_disconnect()
    }

    /// The reply line(s), CRLF terminated.
    pub fn render(&self) -> String {
        render(self.code, self.esc, &self.message)
    }
}

/// Formats a one-line reply `code esc text\r\n`. Control characters in the
/// text (which could forge extra reply lines) are replaced.
pub fn render(code: u16, esc: &str, text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let _ = write!(out, "{code} ");
    if !esc.is_empty() {
        out.push_str(esc);
        out.push(' ');
    }
    out.extend(text.chars().map(|c| if c.is_control() { ' ' } else { c }));
    out.push_str("\r\n");
    out
}

/// Formats a multi-line reply (EHLO, HELP): `code-line` ... `code line`.
pub fn render_multi(code: u16, lines: &[String]) -> String {
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        let _ = write!(out, "{code}{sep}{line}\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_replies() {
        assert_eq!(
            Reject::bad_sequence("Need MAIL first").render(),
            "503 5.5.1 Need MAIL first\r\n"
        );
        assert_eq!(
            render(250, "", "ok\r\n550 forged"),
            "250 ok  550 forged\r\n"
        );
        assert_eq!(
            render_multi(
                250,
                &["relay.test".into(), "PIPELINING".into(), "SIZE 10".into()]
            ),
            "250-relay.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
        );
        assert!(Reject::shutting_down().disconnect);
    }
}
