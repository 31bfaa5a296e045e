//! `petrel-relay`: parse arguments, load config, start the relay, wait for
//! shutdown. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use petrel_relay::config::RelayConfig;

// Small allocations dominate (SMTP lines, JSON records, Redis frames); glibc
// malloc took ~12% of the relay's CPU under load, mimalloc a fraction.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Petrel's SMTP relay: SMTP in, DKIM-signed, queued, delivered.
#[derive(Parser)]
#[command(name = "petrel-relay", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "PETREL_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Run {
        /// The relay config file (RelayConfig YAML).
        #[arg(long, short, env = "PETREL_CONFIG")]
        config: PathBuf,
    },
    /// Work with config files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print an argon2id hash of a password read from standard input, for
    /// a line `user:HASH` of the AUTH users file.
    HashPassword,
    /// Manage the suppression list in the configured queue backend.
    Suppression {
        /// The relay config file (names the queue backend).
        #[arg(long, short, env = "PETREL_CONFIG")]
        config: PathBuf,
        #[command(subcommand)]
        command: SuppressionCommand,
    },
    /// Read the event outbox.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Inspect and control the queue. Exit status: 0 done, 1 error,
    /// 2 usage, 3 not found, 4 busy (a worker is delivering it; retry).
    Queue(petrel_relay::queue_ctl::cli::QueueArgs),
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Print events as JSON lines, oldest retained first. With the
    /// embedded backend held by a running relay, reads through its admin
    /// API (`GET /admin/v1/events` on the HTTP port).
    Tail {
        /// The relay config file (names the queue backend).
        #[arg(long, short, env = "PETREL_CONFIG")]
        config: PathBuf,
        /// Only events of this type (`delivered`, `bounced`, ...).
        #[arg(long = "type")]
        kind: Option<petrel_relay::events::EventType>,
        /// Keep printing new events as they arrive.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum SuppressionCommand {
    /// List the entries in force now: address, reason (bounce, complaint,
    /// unsubscribe, manual), scope (the sending domain, or `*` for every
    /// domain), when, expiry and why.
    List {
        /// One JSON object per line instead of columns.
        #[arg(long)]
        json: bool,
    },
    /// Suppress an address.
    Add {
        /// The address.
        address: String,
        /// bounce, complaint, unsubscribe or manual (default). Any other
        /// text is kept as the note of a manual entry.
        #[arg(long)]
        reason: Option<String>,
        /// Only for mail from this sending domain; every domain when absent.
        #[arg(long)]
        scope: Option<String>,
        /// Why, in words (shown by `list`).
        #[arg(long)]
        note: Option<String>,
        /// Lift the suppression after this long (`30d`); forever when absent.
        #[arg(long)]
        ttl: Option<petrel_relay::config::Duration>,
    },
    /// Lift the suppression of an address: every entry of it, or only the
    /// one for `--scope`.
    Remove {
        /// The address.
        address: String,
        /// Only the entry scoped to this sending domain.
        #[arg(long)]
        scope: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file; exit 1 listing every error.
    Check {
        /// The config file.
        file: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: escape codes in a log file
    // or a container log are noise for every reader and parser.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match RelayConfig::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(error) => {
                eprintln!("{}: {error}", file.display());
                Ok(ExitCode::FAILURE)
            }
        },
        Command::HashPassword => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!password.is_empty(), "empty password on standard input");
            println!("{}", petrel_relay::inbound::auth::hash_password(password)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Suppression { config, command } => {
            let config = RelayConfig::load(&config)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(suppression(&config, command))
        }
        Command::Events {
            command:
                EventsCommand::Tail {
                    config,
                    kind,
                    follow,
                },
        } => {
            let config = RelayConfig::load(&config)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                use petrel_relay::events::tail;
                let source = tail::Source::open(&config).await?;
                let mut out = std::io::stdout();
                tail::tail(&source, kind, follow, &mut out).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Queue(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let status = runtime.block_on(petrel_relay::queue_ctl::cli::run(args));
            Ok(ExitCode::from(status as u8))
        }
        Command::Run { config } => {
            // A config that does not load gets the default size here and
            // its error, naming the field, from the server below.
            let configured = RelayConfig::load(&config)
                .ok()
                .and_then(|c| c.worker_threads);
            let threads =
                petrel_relay::runtime::threads(configured, petrel_relay::runtime::available_cpus());
            let runtime =
                petrel_relay::runtime::build(threads).context("starting the async runtime")?;
            runtime.block_on(petrel_relay::server::run(&config))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn suppression(
    config: &RelayConfig,
    command: SuppressionCommand,
) -> anyhow::Result<ExitCode> {
    use petrel_relay::delivery::suppression;
    use petrel_relay::queue::now_millis;
    let backend = petrel_relay::queue::open(&config.queue)
        .await
        .context("opening the queue backend")?;
    let state = backend.state.as_ref();
    match command {
        SuppressionCommand::List { json } => {
            for e in suppression::list(state, now_millis()).await? {
                if json {
                    println!("{}", suppression_json(&e));
                    continue;
                }
                let expires = e
                    .expires_at
                    .map(|t| format!("expires {}", millis_to_rfc3339(t)))
                    .unwrap_or_else(|| "never expires".to_string());
                let why = e.remote_reply.as_deref().unwrap_or("-");
                println!(
                    "{}\t{}\t{}\t{}\t{expires}\t{why}",
                    e.address,
                    e.reason,
                    e.scope.as_deref().unwrap_or("*"),
                    millis_to_rfc3339(e.created_at)
                );
            }
        }
        SuppressionCommand::Add {
            address,
            reason,
            scope,
            note,
            ttl,
        } => {
            use petrel_relay::queue::SuppressionReason;
            // `--reason` took free text before reasons were typed: such
            // text becomes the note of a manual entry.
            let (reason, note) = match reason.as_deref().map(str::parse::<SuppressionReason>) {
                None => (None, note),
                Some(Ok(r)) => (Some(r), note),
                Some(Err(_)) => (None, note.or(reason)),
            };
            let e = suppression::add(
                state,
                &address,
                suppression::Manual {
                    reason,
                    scope: scope.as_deref(),
                    note,
                    ttl: ttl.map(Into::into),
                },
                now_millis(),
            )
            .await?;
            match &e.scope {
                Some(scope) => println!("suppressed {} for {scope} ({})", e.address, e.reason),
                None => println!("suppressed {} ({})", e.address, e.reason),
            }
        }
        SuppressionCommand::Remove { address, scope } => {
            let removed = suppression::remove(state, &address, scope.as_deref()).await?;
            if removed > 0 {
                println!("removed {address} ({removed} entries)");
            } else {
                eprintln!("{address} was not suppressed");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn suppression_json(e: &petrel_relay::queue::SuppressionEntry) -> serde_json::Value {
    serde_json::json!({
        "address": e.address,
        "reason": e.reason,
        "scope": e.scope,
        "createdAt": millis_to_rfc3339(e.created_at),
        "expiresAt": e.expires_at.map(millis_to_rfc3339),
        "why": e.remote_reply,
    })
}

fn millis_to_rfc3339(millis: u64) -> String {
    chrono::DateTime::from_timestamp_millis(millis as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| millis.to_string())
}
