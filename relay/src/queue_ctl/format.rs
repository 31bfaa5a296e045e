//! Text output of the queue commands (`--json` prints [`Output`] as JSON
//! instead): tab-separated tables a person can read and `cut` can split.

use std::fmt::Write;

use super::Output;
use super::actions::{Action, ActionReport};
use super::list::ListRow;
use super::show::MessageDetail;
use super::stats::QueueSummary;

/// `output` as text, ending in a newline (empty for an empty list).
pub fn text(output: &Output) -> String {
    match output {
        Output::Stats(s) => stats(s),
        Output::List(rows) => list(rows),
        Output::Show(d) => show(d),
        Output::Action(r) => action(r),
    }
}

/// `output` as pretty JSON with a final newline.
pub fn json(output: &Output) -> String {
    let mut s = serde_json::to_string_pretty(output).unwrap_or_else(|e| {
        serde_json::json!({ "error": { "message": e.to_string() } }).to_string()
    });
    s.push('\n');
    s
}

fn stats(s: &QueueSummary) -> String {
    let mut out = String::new();
    let u = &s.units;
    let _ = writeln!(
        out,
        "messages {}  units {}  due {}  leased {}  deferred {}  held {}  oldest {}s",
        s.messages,
        u.total(),
        u.due,
        u.leased,
        u.deferred,
        u.held,
        s.oldest_age_seconds
    );
    if !s.destinations.is_empty() {
        let _ = writeln!(
            out,
            "\nDESTINATION\tDUE\tLEASED\tDEFERRED\tHELD\tOLDEST\tSTATUS"
        );
        for d in &s.destinations {
            let _ = writeln!(
                out,
                "{}\t{}\t{}\t{}\t{}\t{}s\t{}",
                d.domain,
                d.units.due,
                d.units.leased,
                d.units.deferred,
                d.units.held,
                d.oldest_age_seconds,
                if d.held { "held" } else { "-" }
            );
        }
    }
    for h in &s.holds {
        let _ = writeln!(out, "held: {} since {}", h.domain, h.since);
    }
    out
}

fn list(rows: &[ListRow]) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "QUEUE ID\tSENDER\tRECIPIENTS\tDESTINATION\tSTATE\tATTEMPTS\tNEXT ATTEMPT\tLAST REPLY"
    );
    for r in rows {
        let sender = if r.sender.is_empty() { "<>" } else { &r.sender };
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            r.queue_id,
            sender,
            r.recipients.join(","),
            r.destination,
            r.state.as_str(),
            r.attempts,
            r.next_attempt_at.as_deref().unwrap_or("-"),
            r.last_reply.as_deref().unwrap_or("-")
        );
    }
    out
}

fn show(d: &MessageDetail) -> String {
    let mut out = String::new();
    let sender = if d.sender.is_empty() { "<>" } else { &d.sender };
    let _ = writeln!(out, "Queue ID:        {}", d.queue_id);
    let _ = writeln!(out, "Sender:          {sender}");
    let _ = writeln!(out, "Sending domain:  {}", d.sending_domain);
    let _ = writeln!(
        out,
        "Received:        {} ({}s ago)",
        d.received_at, d.age_seconds
    );
    if let Some(id) = &d.message_id_header {
        let _ = writeln!(out, "Message-ID:      <{id}>");
    }
    if let Some(size) = d.size {
        let _ = writeln!(out, "Size:            {size} bytes");
    }
    if d.is_dsn {
        let _ = writeln!(out, "Type:            DSN");
    }
    for (k, v) in &d.tags {
        let _ = writeln!(out, "Tag:             {k}={v}");
    }
    for u in &d.units {
        let _ = writeln!(out, "\nUnit {} ({})", u.unit_id, u.state.as_str());
        let _ = writeln!(out, "  Recipients:    {}", u.recipients.join(", "));
        let _ = writeln!(out, "  Attempts:      {}", u.attempts);
        if let Some(next) = &u.next_attempt_at {
            let _ = writeln!(out, "  Next attempt:  {next}");
        }
        if let Some(reply) = &u.last_reply {
            let _ = writeln!(out, "  Last reply:    {reply}");
        }
        if u.held_seconds > 0 {
            let _ = writeln!(out, "  Held for:      {}s", u.held_seconds);
        }
        for a in &u.history {
            let _ = writeln!(out, "  Attempt {}: {}", a.at, a.reply);
        }
    }
    if !d.headers.is_empty() {
        let _ = writeln!(out, "\nHeaders:");
        for (k, v) in &d.headers {
            let _ = writeln!(out, "  {k}: {v}");
        }
    }
    out
}

fn action(r: &ActionReport) -> String {
    let verb = match r.action {
        Action::Retry => "made due now",
        Action::Bounce => "bounced",
        Action::Delete => "deleted",
        Action::Hold => "held",
        Action::Release => "released",
    };
    let mut out = match r.action {
        Action::Hold => format!("{}: held ({} units moved to hold)\n", r.target, r.units),
        Action::Release => format!("{}: released ({} units due again)\n", r.target, r.units),
        _ => format!("{}: {} units {verb}\n", r.target, r.units),
    };
    if r.busy > 0 {
        let _ = writeln!(
            out,
            "{}: {} units are being delivered right now; try again",
            r.target, r.busy
        );
    }
    if r.held > 0 {
        let _ = writeln!(
            out,
            "{}: {} units are held; release their destination to send them",
            r.target, r.held
        );
    }
    for id in &r.dsn_queue_ids {
        let _ = writeln!(out, "DSN queued as {id}");
    }
    out
}
