//! Rendering SMTP replies. Refusals are [`crate::refusal::Refusal`] values;
//! this module only turns codes and text into safe reply lines.

use std::fmt::Write as _;

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
    }
}
