//! `kubectl-petrel`: the kubectl plugin (`kubectl petrel ...`). Uses the
//! user's kubeconfig like kubectl does.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use petrel_operator::plugin::commands;

/// Petrel at a glance: relays, domains and keys, DNS records, key rotation and
/// the relay's queue.
#[derive(Parser, Debug)]
#[command(name = "kubectl-petrel", bin_name = "kubectl petrel", version)]
struct Args {
    /// Namespace (default: the kubeconfig context's namespace).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// SmtpRelays, SendingDomains and DkimKeys with their conditions, in one table.
    Status,
    /// The records a SendingDomain (by name or domain) needs, as zone-file lines with their states.
    Dns {
        /// SendingDomain name or its domain.
        domain: String,
        /// TTL written on each line.
        #[arg(long, default_value_t = 3600)]
        ttl: u32,
    },
    /// Rotate a DkimKey now (sets the petrel.dev/rotate=now annotation).
    Rotate {
        /// DkimKey name.
        key: String,
    },
    /// Run `petrel-relay queue ARGS` in a ready pod of the relay (through `kubectl exec`).
    Queue {
        /// SmtpRelay name.
        relay: String,
        /// The queue subcommand and its arguments, after `--`.
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (KUBECONFIG or ~/.kube/config)")?;
    let ns = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    match args.command {
        Command::Status => print!("{}", commands::status(&client, &ns).await?),
        Command::Dns { domain, ttl } => {
            print!("{}", commands::dns(&client, &ns, &domain, ttl).await?)
        }
        Command::Rotate { key } => {
            commands::rotate(&client, &ns, &key).await?;
            println!(
                "dkimkey/{key} annotated petrel.dev/rotate=now; `kubectl petrel status -n {ns}` shows the rotation"
            );
        }
        Command::Queue { relay, args } => {
            let pod = commands::queue_pod(&client, &ns, &relay).await?;
            // kubectl is on PATH whenever kubectl runs a plugin; it carries the
            // exec subresource's streaming, so the plugin needs no websocket client.
            let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
            let status = tokio::process::Command::new(&kubectl)
                .args(commands::queue_exec_args(&ns, &pod, &args))
                .status()
                .await
                .with_context(|| format!("running {kubectl} exec"))?;
            // The queue command's exit code is the script's answer: pass it on.
            std::process::exit(status.code().unwrap_or(1));
        }
    }
    Ok(())
}
