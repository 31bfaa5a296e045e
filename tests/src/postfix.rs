//! A private Postfix instance as a recipient's MX: its own config, queue
//! and data directories under a temp dir (`postfix -c <dir>`), one smtpd
//! on a free 127.0.0.1 port offering STARTTLS with the certificate given,
//! mail for one domain delivered by `virtual` into a Maildir the test
//! reads, and its log in a file (`maillog_file`, through `postlogd`).
//!
//! It never touches the system instance (`/etc/postfix`, port 25): the
//! benchmark uses that one. Needs the Debian `postfix` package (`.ci/setup`
//! installs it) and root (Postfix's master runs as root and drops to
//! `mail_owner`).
//!
//! ```no_run
//! # async fn f() -> Result<(), petrel_tests::postfix::PostfixError> {
//! use petrel_tests::{postfix::PostfixMx, tls::TestCa};
//! let ca = TestCa::new().unwrap();
//! let cert = ca.issue_server_cert(&["mx.dest.test"]).unwrap();
//! let mx = PostfixMx::start("mx.dest.test", "dest.test", &cert.chain_pem, &cert.key_pem).await?;
//! // ... point the relay's `delivery.mx.port` at mx.port() ...
//! let mail = mx.wait_for_messages(1, std::time::Duration::from_secs(30)).await;
//! # Ok(()) }
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use tokio::process::Command;

use crate::ports::{free_port, wait_for_port};

/// Where Debian installs the `postfix` command.
const POSTFIX: &str = "/usr/sbin/postfix";
/// Longest wait for `postfix start` and its smtpd port.
const START: Duration = Duration::from_secs(30);

/// Why an instance could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PostfixError {
    /// The package is missing: the test must fail, not pass unchecked.
    #[error(
        "Postfix is not installed ({POSTFIX} missing): run .ci/setup as root, which installs the Debian postfix package"
    )]
    NotInstalled,
    /// Postfix's master must start as root.
    #[error("a private Postfix instance needs root (uid {0}); run the test as root")]
    NotRoot(u32),
    /// A file or directory of the instance.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `postfix`, `postconf` or `id` failed.
    #[error("`{command}` failed ({status}):\n{output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    /// The smtpd port never opened.
    #[error("Postfix smtpd not listening on {addr}: {detail}\nlog:\n{log}")]
    NotListening {
        addr: SocketAddr,
        detail: String,
        log: String,
    },
}

/// A running private Postfix; `postfix abort`ed when dropped.
pub struct PostfixMx {
    dir: tempfile::TempDir,
    port: u16,
}

impl Drop for PostfixMx {
    fn drop(&mut self) {
        // Immediate stop of this instance only (`-c` names its config).
        let _ = std::process::Command::new(POSTFIX)
            .arg("-c")
            .arg(self.config_dir())
            .arg("abort")
            .output();
    }
}

impl PostfixMx {
    /// The installed Postfix version (`mail_version`).
    pub async fn version() -> Result<String, PostfixError> {
        installed()?;
        let out =
            run(Command::new("/usr/sbin/postconf").args(["-d", "-h", "mail_version"])).await?;
        Ok(out.trim().to_string())
    }

    /// Starts an instance named `hostname` that accepts mail for every
    /// address at `domain` and presents `chain_pem` (leaf first) with
    /// `key_pem` on STARTTLS (`smtpd_tls_security_level = may`).
    pub async fn start(
        hostname: &str,
        domain: &str,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<PostfixMx, PostfixError> {
        installed()?;
        let uid = id(&["-u"]).await?;
        if uid != 0 {
            return Err(PostfixError::NotRoot(uid));
        }
        let owner_uid = id(&["-u", "postfix"]).await?;
        let owner_gid = id(&["-g", "postfix"]).await?;
        let dir = tempfile::Builder::new()
            .prefix("petrel-postfix-")
            .tempdir()
            .map_err(|source| PostfixError::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        let port = free_port();
        let mx = PostfixMx { dir, port };
        mx.write_files(hostname, domain, chain_pem, key_pem, owner_uid, owner_gid)?;
        let config = mx.config_dir();
        run(Command::new(POSTFIX).arg("-c").arg(&config).arg("check")).await?;
        run(Command::new(POSTFIX).arg("-c").arg(&config).arg("start")).await?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        if let Err(e) = wait_for_port(addr, START).await {
            return Err(PostfixError::NotListening {
                addr,
                detail: e.to_string(),
                log: mx.log(),
            });
        }
        Ok(mx)
    }

    /// The smtpd's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Everything the instance logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root().join("postfix.log")).unwrap_or_default()
    }

    /// The messages delivered so far, as stored (with Postfix's headers).
    pub fn messages(&self) -> Vec<String> {
        let new = self.root().join("mail/inbox/new");
        let Ok(entries) = std::fs::read_dir(new) else {
            return Vec::new();
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        paths
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .collect()
    }

    /// Polls the Maildir until `n` messages are there or `timeout` passes;
    /// returns what is there then.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let got = self.messages();
            if got.len() >= n || tokio::time::Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls the log until a line contains `needle` or `timeout` passes;
    /// returns whether one did.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn config_dir(&self) -> PathBuf {
        self.root().join("etc")
    }

    fn write_files(
        &self,
        hostname: &str,
        domain: &str,
        chain_pem: &str,
        key_pem: &str,
        owner_uid: u32,
        owner_gid: u32,
    ) -> Result<(), PostfixError> {
        let root = self.root();
        // Postfix's daemons run as `mail_owner` and must traverse the
        // temp dir (created 0700) to reach the queue and the Maildir.
        set_mode(root, 0o755)?;
        for sub in ["etc", "queue", "data", "mail"] {
            let path = root.join(sub);
            std::fs::create_dir(&path).map_err(|source| PostfixError::Io {
                path: path.clone(),
                source,
            })?;
        }
        // `data_directory` belongs to `mail_owner`; `virtual` writes the
        // Maildir as the uid it is given below.
        for sub in ["data", "mail"] {
            let path = root.join(sub);
            std::os::unix::fs::chown(&path, Some(owner_uid), Some(owner_gid))
                .map_err(|source| PostfixError::Io { path, source })?;
        }
        let etc = self.config_dir();
        write(&etc.join("tls.crt"), chain_pem)?;
        write(&etc.join("tls.key"), key_pem)?;
        set_mode(&etc.join("tls.key"), 0o600)?;
        write(
            &etc.join("main.cf"),
            &main_cf(root, hostname, domain, owner_uid, owner_gid),
        )?;
        write(&etc.join("master.cf"), &master_cf(self.port))?;
        Ok(())
    }
}

/// `main.cf`: everything the instance needs is spelled out, so nothing
/// comes from the system's `/etc/postfix`.
fn main_cf(root: &Path, hostname: &str, domain: &str, uid: u32, gid: u32) -> String {
    let root = root.display();
    format!(
        "compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {hostname}
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# 127.0.0.1 has no PTR in a test; no lookup, no delay.
smtpd_peername_lookup = no
# Bounces it might generate go nowhere: no DNS, no internet.
smtp_dns_support_level = disabled
default_transport = error:this test MX delivers only locally
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {root}/mail
# Every recipient into one Maildir (trailing slash: Maildir format).
virtual_mailbox_maps = static:inbox/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
smtpd_tls_cert_file = {root}/etc/tls.crt
smtpd_tls_key_file = {root}/etc/tls.key
smtpd_tls_security_level = may
# The Received header and the log say whether a message came over TLS.
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
maillog_file = {root}/postfix.log
maillog_file_prefixes = {root}
"
    )
}

/// `master.cf`: one smtpd on 127.0.0.1:`port` (never :25) and the
/// internal services; no chroot (it would need copies of /etc and libs).
fn master_cf(port: u16) -> String {
    format!(
        "127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
smtp      unix  - - n -     - smtp
relay     unix  - - n -     - smtp
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
virtual   unix  - n n -     - virtual
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
"
    )
}

fn installed() -> Result<(), PostfixError> {
    if Path::new(POSTFIX).is_file() {
        Ok(())
    } else {
        Err(PostfixError::NotInstalled)
    }
}

/// `id <args>` as a number.
async fn id(args: &[&str]) -> Result<u32, PostfixError> {
    let out = run(Command::new("id").args(args)).await?;
    out.trim().parse().map_err(|_| PostfixError::Command {
        command: format!("id {}", args.join(" ")),
        status: "not a number".to_string(),
        output: out,
    })
}

/// Runs `command` to completion; its stdout when it exits 0.
async fn run(command: &mut Command) -> Result<String, PostfixError> {
    let shown = format!("{:?}", command.as_std());
    let out: Output = tokio::time::timeout(START, command.kill_on_drop(true).output())
        .await
        .map_err(|_| PostfixError::Command {
            command: shown.clone(),
            status: format!("still running after {START:?}"),
            output: String::new(),
        })?
        .map_err(|source| PostfixError::Io {
            path: PathBuf::from(shown.clone()),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(PostfixError::Command {
            command: shown,
            status: out.status.to_string(),
            output: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
        })
    }
}

fn write(path: &Path, contents: &str) -> Result<(), PostfixError> {
    std::fs::write(path, contents).map_err(|source| PostfixError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn set_mode(path: &Path, mode: u32) -> Result<(), PostfixError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        PostfixError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}
