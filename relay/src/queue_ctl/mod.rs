//! `petrel-relay queue ...`: look into the queue and act on it, like
//! Postfix's `mailq`/`postsuper` or KumoMTA's `kcli`.
//!
//! A [`Command`] is executed against a [`Backend`] by [`execute`], in the
//! CLI (Redis, or an embedded file no relay holds) or in the relay behind
//! its admin API (`/admin/v1/queue/...`, module [`remote`] is the client),
//! so both paths run the same code and give the same [`Output`].
//!
//! - [`stats`], [`list`], [`show`]: pure views of [`QueueControl::units`].
//! - [`actions`]: retry, bounce, delete, hold, release.
//! - [`format`]: text tables; `--json` prints the [`Output`] values.
//!
//! Exit codes (the [`ExitStatus`] of a [`CtlError`]): 0 done, 1 error
//! (backend or relay unreachable), 2 usage (a bad argument), 3 not found,
//! 4 busy (a worker is delivering the unit right now; try again).
//!
//! [`QueueControl::units`]: crate::queue::QueueControl::units

pub mod actions;
pub mod cli;
pub mod format;
pub mod list;
pub mod remote;
pub mod show;
pub mod stats;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::queue::{Backend, Millis, QueueError};

/// What a script can tell apart from the exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: done.
    Ok = 0,
    /// 1: the backend or the relay failed.
    Error = 1,
    /// 2: a bad argument (also clap's usage errors).
    Usage = 2,
    /// 3: no such message, unit or hold.
    NotFound = 3,
    /// 4: a worker is delivering the unit right now; try again.
    Busy = 4,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Nothing in the queue has that id (or no hold on that domain).
    #[error("{0}")]
    NotFound(String),
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
    /// Units are leased by a worker.
    #[error("{0}")]
    Busy(String),
    /// The backend failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The relay's admin API failed or refused.
    #[error("admin API at {address}: {reason}")]
    Admin {
        /// Where it was asked.
        address: String,
        /// What went wrong.
        reason: String,
    },
}

impl CtlError {
    /// The exit status this failure maps to.
    pub fn status(&self) -> ExitStatus {
        match self {
            CtlError::NotFound(_) => ExitStatus::NotFound,
            CtlError::Usage(_) => ExitStatus::Usage,
            CtlError::Busy(_) => ExitStatus::Busy,
            CtlError::Queue(QueueError::NotFound(_)) => ExitStatus::NotFound,
            CtlError::Queue(_) | CtlError::Admin { .. } => ExitStatus::Error,
        }
    }
}

/// Which units a `list` shows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListFilter {
    /// Only this destination domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Only units in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<crate::queue::UnitState>,
    /// Only messages accepted at least this many ms ago.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub older_than_ms: Option<u64>,
}

/// What `retry` makes due now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RetryTarget {
    /// One message (or one unit, by unit id).
    Id(String),
    /// Every waiting unit for a destination.
    Domain(String),
}

/// One queue command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "command")]
pub enum Command {
    /// Units by state and destination, oldest age, holds.
    Stats,
    /// Units matching a filter.
    List(ListFilter),
    /// One message in full.
    Show {
        /// Queue id (or unit id).
        id: String,
    },
    /// Make units due now.
    Retry {
        /// What to retry.
        target: RetryTarget,
    },
    /// Fail a message's units with a DSN to the sender.
    Bounce {
        /// Queue id (or unit id).
        id: String,
        /// Why, for the DSN and the events.
        reason: Option<String>,
    },
    /// Drop a message's units without a DSN.
    Delete {
        /// Queue id (or unit id).
        id: String,
    },
    /// Stop delivering to a destination.
    Hold {
        /// The destination domain.
        domain: String,
    },
    /// Deliver to a held destination again.
    Release {
        /// The destination domain.
        domain: String,
    },
}

/// What a command answers (its `--json` form).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Output {
    /// `stats`.
    Stats(stats::QueueSummary),
    /// `list`.
    List(Vec<list::ListRow>),
    /// `show`.
    Show(Box<show::MessageDetail>),
    /// Every action.
    Action(actions::ActionReport),
}

impl Output {
    /// The exit status of a command that ran: [`ExitStatus::Busy`] when an
    /// action had to leave units alone because a worker held them.
    pub fn status(&self) -> ExitStatus {
        match self {
            Output::Action(report) if report.busy > 0 => ExitStatus::Busy,
            _ => ExitStatus::Ok,
        }
    }
}

/// What actions need besides the backend.
#[derive(Clone, Debug)]
pub struct ActionContext {
    /// The relay's hostname (DSN Reporting-MTA).
    pub hostname: String,
    /// The name events carry in `relay`.
    pub relay: String,
    /// How long an action's claim on a unit lasts (`queue.lease`).
    pub lease_for: Duration,
}

impl ActionContext {
    /// From the relay config.
    pub fn of(config: &crate::config::RelayConfig) -> ActionContext {
        ActionContext {
            hostname: config.hostname.clone(),
            relay: crate::events::relay_name(&config.hostname),
            lease_for: config.queue.lease.get(),
        }
    }
}

/// Longest id accepted (queue ids are uuids; unit ids add the domain).
const MAX_ID: usize = 512;

/// A queue id or unit id as given: refused when it cannot be one.
pub fn check_id(id: &str) -> Result<&str, CtlError> {
    let id = id.trim();
    if id.is_empty() || id.len() > MAX_ID || id.chars().any(|c| c.is_control() || c == ' ') {
        return Err(CtlError::Usage(format!(
            "{id:?} is not a queue id (see `petrel-relay queue list`)"
        )));
    }
    Ok(id)
}

/// A destination domain as given, lower-cased; refused when it cannot be one.
pub fn check_domain(domain: &str) -> Result<String, CtlError> {
    let d = crate::queue::control::normalize_domain(domain);
    if d.is_empty()
        || d.len() > 255
        || d.chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '@' || c == '/')
    {
        return Err(CtlError::Usage(format!(
            "{domain:?} is not a destination domain"
        )));
    }
    Ok(d)
}

/// Runs `command` against `backend` at `now`.
pub async fn execute(
    backend: &Backend,
    ctx: &ActionContext,
    command: Command,
    now: Millis,
) -> Result<Output, CtlError> {
    match command {
        Command::Stats => Ok(Output::Stats(stats::summary(backend, now).await?)),
        Command::List(filter) => {
            let units = backend.control.units(now).await?;
            Ok(Output::List(list::rows(units, &filter, now)))
        }
        Command::Show { id } => {
            let id = check_id(&id)?;
            Ok(Output::Show(Box::new(
                show::detail(backend, id, now).await?,
            )))
        }
        Command::Retry { target } => actions::retry(backend, ctx, target, now)
            .await
            .map(Output::Action),
        Command::Bounce { id, reason } => {
            actions::bounce(backend, ctx, check_id(&id)?, reason.as_deref(), now)
                .await
                .map(Output::Action)
        }
        Command::Delete { id } => actions::delete(backend, ctx, check_id(&id)?, now)
            .await
            .map(Output::Action),
        Command::Hold { domain } => actions::hold(backend, &check_domain(&domain)?, now)
            .await
            .map(Output::Action),
        Command::Release { domain } => actions::release(backend, &check_domain(&domain)?, now)
            .await
            .map(Output::Action),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ids_and_domains_are_usage_errors() {
        for bad in ["", "  ", "a b", "x\ny", &"x".repeat(600)] {
            assert_eq!(
                check_id(bad).unwrap_err().status(),
                ExitStatus::Usage,
                "{bad:?}"
            );
        }
        assert_eq!(check_id(" abc:x.org ").unwrap(), "abc:x.org");
        for bad in ["", "a@b", "x y", "a/b"] {
            assert!(check_domain(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_domain("Gmail.COM.").unwrap(), "gmail.com");
    }

    #[test]
    fn exit_statuses_are_the_documented_numbers() {
        assert_eq!(ExitStatus::Ok as u8, 0);
        assert_eq!(CtlError::NotFound("x".into()).status() as u8, 3);
        assert_eq!(
            CtlError::Queue(QueueError::NotFound("x".into())).status() as u8,
            3
        );
        assert_eq!(CtlError::Busy("x".into()).status() as u8, 4);
        assert_eq!(CtlError::Usage("x".into()).status() as u8, 2);
        assert_eq!(
            CtlError::Queue(QueueError::Unavailable("x".into())).status() as u8,
            1
        );
    }

    #[test]
    fn commands_round_trip_through_json() {
        let commands = [
            Command::Stats,
            Command::List(ListFilter {
                domain: Some("x.org".into()),
                state: Some(crate::queue::UnitState::Held),
                older_than_ms: Some(3_600_000),
            }),
            Command::Retry {
                target: RetryTarget::Domain("x.org".into()),
            },
            Command::Bounce {
                id: "abc".into(),
                reason: Some("spam".into()),
            },
        ];
        for c in commands {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), c, "{json}");
        }
    }
}
