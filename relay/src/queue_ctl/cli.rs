//! The `petrel-relay queue` arguments, and where a command runs: on the
//! backend itself (Redis; an embedded file no relay holds) or, when a
//! running relay holds the embedded file, through its admin API
//! (module [`super::remote`]).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::remote::Relay;
use super::{ActionContext, Command, CtlError, ExitStatus, ListFilter, Output, RetryTarget};
use crate::config::RelayConfig;
use crate::queue::{UnitState, now_millis};

/// `petrel-relay queue`.
#[derive(Args, Debug)]
pub struct QueueArgs {
    /// The relay config file (names the queue backend and the relay's HTTP
    /// address).
    #[arg(long, short, env = "PETREL_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Print JSON instead of text (errors too, on standard output).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: QueueCommand,
}

/// A queue subcommand.
#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// Units by state and destination, oldest age, held destinations.
    Stats,
    /// One line per unit: queue id, sender, recipients, destination,
    /// attempts, next attempt, last reply.
    List {
        /// Only this destination domain.
        #[arg(long)]
        domain: Option<String>,
        /// Only units in this state.
        #[arg(long, value_enum)]
        state: Option<UnitState>,
        /// Only messages older than this (`1h`, `30m`, `2d`).
        #[arg(long)]
        older_than: Option<crate::config::Duration>,
    },
    /// A message in full: envelope, units, attempt history, headers.
    Show {
        /// Queue id (or unit id `QUEUEID:domain`).
        id: String,
    },
    /// Make a message, or every waiting unit for a destination, due now.
    Retry {
        /// Queue id (or unit id).
        #[arg(required_unless_present = "domain", conflicts_with = "domain")]
        id: Option<String>,
        /// Every unit for this destination instead.
        #[arg(long)]
        domain: Option<String>,
    },
    /// Fail a message now with a DSN to its sender.
    Bounce {
        /// Queue id (or unit id).
        id: String,
        /// Why (in the DSN and the `bounced` events).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Drop a message without a DSN (a `deleted` event per recipient).
    Delete {
        /// Queue id (or unit id).
        id: String,
    },
    /// Stop delivering to a destination, on every pod, until released.
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

impl QueueCommand {
    /// The command to execute.
    pub fn command(self) -> Command {
        match self {
            QueueCommand::Stats => Command::Stats,
            QueueCommand::List {
                domain,
                state,
                older_than,
            } => Command::List(ListFilter {
                domain,
                state,
                older_than_ms: older_than.map(|d| d.get().as_millis() as u64),
            }),
            QueueCommand::Show { id } => Command::Show { id },
            QueueCommand::Retry { id, domain } => Command::Retry {
                target: match (id, domain) {
                    (_, Some(d)) => RetryTarget::Domain(d),
                    (Some(id), None) => RetryTarget::Id(id),
                    // clap requires one of them.
                    (None, None) => RetryTarget::Id(String::new()),
                },
            },
            QueueCommand::Bounce { id, reason } => Command::Bounce { id, reason },
            QueueCommand::Delete { id } => Command::Delete { id },
            QueueCommand::Hold { domain } => Command::Hold { domain },
            QueueCommand::Release { domain } => Command::Release { domain },
        }
    }
}

/// Runs the command where it can run: the backend, or the relay holding
/// the embedded file.
pub async fn execute(config: &RelayConfig, command: Command) -> Result<Output, CtlError> {
    let ctx = ActionContext::of(config);
    if let Some(embedded) = &config.queue.embedded {
        // Opening would create an empty queue: a wrong working directory
        // (the path is relative to it, as for the relay) must not look
        // like an empty queue.
        if !embedded.path.exists() {
            return Err(CtlError::Queue(crate::queue::QueueError::Unavailable(
                format!(
                    "no queue file at {} (queue.embedded.path; relative paths are relative to \
                 the working directory, as for the relay)",
                    embedded.path.display()
                ),
            )));
        }
    }
    match crate::queue::open(&config.queue).await {
        Ok(backend) => super::execute(&backend, &ctx, command, now_millis()).await,
        Err(error) if config.queue.embedded.is_some() => {
            tracing::debug!(%error, "queue file busy; going through the relay's admin API");
            Relay::of(config).await?.execute(command).await
        }
        Err(error) => Err(error.into()),
    }
}

/// Runs `args`, prints the answer, and returns the exit status.
pub async fn run(args: QueueArgs) -> ExitStatus {
    let json = args.json;
    let result = async {
        let path = args.config.ok_or_else(|| {
            CtlError::Usage("--config (or PETREL_CONFIG) names the relay config file".into())
        })?;
        let config = RelayConfig::load(&path)
            .map_err(|e| CtlError::Usage(format!("{}: {e}", path.display())))?;
        execute(&config, args.command.command()).await
    }
    .await;
    match result {
        Ok(output) => {
            let text = if json {
                super::format::json(&output)
            } else {
                super::format::text(&output)
            };
            print!("{text}");
            output.status()
        }
        Err(error) => {
            let status = error.status();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "error": { "message": error.to_string(), "exitCode": status as u8 }
                    })
                );
            }
            eprintln!("error: {error}");
            status
        }
    }
}
