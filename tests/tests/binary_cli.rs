//! The `petrel-relay` command line as the README documents it: `config
//! check` (exit 1 listing every error by field path), `run` refusing a broken
//! file, `hash-password`, and `suppression add/list/remove` on an embedded
//! queue. Each runs the real binary that cargo built.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use petrel_tests::relay_proc::relay_bin;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Upper bound for one command.
const LIMIT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the binary with `args` in `dir`, feeding `stdin`, bounded by `LIMIT`
/// (killed on timeout).
async fn petrel(dir: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(relay_bin())
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn petrel-relay");
    let mut input = child.stdin.take().expect("stdin piped");
    input
        .write_all(stdin.as_bytes())
        .await
        .expect("write stdin");
    drop(input);
    tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("petrel-relay {args:?} did not finish"))
        .expect("wait for petrel-relay")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Three distinct mistakes: a port used twice, a trusted network that
/// trusts everyone, and the maildir transport without its settings.
const BROKEN: &str = r#"
hostname: relay.example.test
listeners:
  - name: smtp
    address: 127.0.0.1:2525
  - name: submission
    address: 127.0.0.1:2525
trustedNetworks:
  - 0.0.0.0/0
domains: []
queue:
  embedded:
    path: .petrel/queue.redb
delivery:
  transport: maildir
http:
  address: 127.0.0.1:9090
"#;

const BROKEN_PATHS: [&str; 3] = [
    "listeners[1].address",
    "trustedNetworks[0]",
    "delivery.maildir",
];

#[tokio::test]
async fn config_check_accepts_the_quick_start() {
    // The example names its key relative to the repo root, as the README runs it.
    let out = petrel(
        &repo(),
        &["config", "check", "examples/local/relay.yaml"],
        "",
    )
    .await;
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("ok"), "{}", text(&out.stdout));
}

#[tokio::test]
async fn config_check_lists_every_error_by_field_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, BROKEN).unwrap();
    let out = petrel(dir.path(), &["config", "check", "broken.yaml"], "").await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    for path in BROKEN_PATHS {
        assert!(stderr.contains(path), "{path} not named in:\n{stderr}");
    }
    assert!(stderr.contains("0.0.0.0/0"), "{stderr}");
}

#[tokio::test]
async fn config_check_names_an_unknown_field_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = std::fs::read_to_string(repo().join("examples/local/relay.yaml"))
        .unwrap()
        .replace("  maildir:\n", "  maildir:\n    compress: true\n");
    assert!(yaml.contains("compress"), "example changed shape");
    std::fs::write(dir.path().join("typo.yaml"), yaml).unwrap();
    let out = petrel(dir.path(), &["config", "check", "typo.yaml"], "").await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    // The full path to the offending key, so a typo is found at once.
    assert!(
        stderr.contains("delivery.maildir.compress"),
        "field path not named:\n{stderr}"
    );
    assert!(stderr.contains("unknown field"), "{stderr}");
}

#[tokio::test]
async fn run_refuses_a_broken_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.yaml"), BROKEN).unwrap();
    let out = petrel(dir.path(), &["run", "--config", "broken.yaml"], "").await;
    assert!(!out.status.success(), "run started on a broken config");
    let stderr = text(&out.stderr);
    for path in BROKEN_PATHS {
        assert!(stderr.contains(path), "{path} not named in:\n{stderr}");
    }
    assert!(
        !dir.path().join(".petrel").exists(),
        "nothing opened before the config is valid"
    );
}

#[tokio::test]
async fn hash_password_prints_a_verifiable_argon2id_hash() {
    let dir = tempfile::tempdir().unwrap();
    let password = "correct horse battery staple";
    let out = petrel(dir.path(), &["hash-password"], &format!("{password}\n")).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let hash = stdout.trim();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let parsed = PasswordHash::new(hash).expect("PHC string");
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .expect("hash verifies the password");
    assert!(
        Argon2::default()
            .verify_password(b"wrong", &parsed)
            .is_err(),
        "hash accepts a wrong password"
    );

    let empty = petrel(dir.path(), &["hash-password"], "\n").await;
    assert!(!empty.status.success(), "an empty password is refused");
}

#[tokio::test]
async fn suppression_add_list_remove_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = std::fs::read_to_string(repo().join("examples/local/relay.yaml"))
        .unwrap()
        .replace(
            "examples/local/dkim-example.test.key",
            &repo()
                .join("examples/local/dkim-example.test.key")
                .display()
                .to_string(),
        );
    std::fs::write(dir.path().join("relay.yaml"), yaml).unwrap();
    let cli = |args: &'static [&'static str]| {
        let mut all = vec!["suppression", "-c", "relay.yaml"];
        all.extend_from_slice(args);
        all
    };

    let out = petrel(dir.path(), &cli(&["list"]), "").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "", "empty at first");

    let out = petrel(
        dir.path(),
        &cli(&["add", "bounced@example.org", "--reason", "manual-test"]),
        "",
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("suppressed"),
        "{}",
        text(&out.stdout)
    );
    // The embedded queue lives where the config says, under the working dir.
    assert!(dir.path().join(".petrel/queue.redb").is_file());

    let out = petrel(dir.path(), &cli(&["list"]), "").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed = text(&out.stdout);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(
        listed.to_ascii_lowercase().contains("bounced@example.org"),
        "{listed}"
    );
    assert!(listed.contains("manual-test"), "{listed}");

    let out = petrel(dir.path(), &cli(&["remove", "bounced@example.org"]), "").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = petrel(dir.path(), &cli(&["list"]), "").await;
    assert_eq!(text(&out.stdout).trim(), "", "removed");
    let out = petrel(dir.path(), &cli(&["remove", "bounced@example.org"]), "").await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "removing an absent address fails"
    );

    // Reasons and scopes: shown by list, in columns and as JSON.
    for args in [
        &["add", "complained@example.org", "--reason", "complaint"][..],
        &[
            "add",
            "left@example.org",
            "--reason",
            "unsubscribe",
            "--scope",
            "Example.test",
            "--note",
            "asked by phone",
        ][..],
    ] {
        let mut all = vec!["suppression", "-c", "relay.yaml"];
        all.extend_from_slice(args);
        let out = petrel(dir.path(), &all, "").await;
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = petrel(dir.path(), &cli(&["list"]), "").await;
    let listed = text(&out.stdout);
    let left = listed
        .lines()
        .find(|l| l.starts_with("left@example.org"))
        .unwrap_or_else(|| panic!("{listed}"));
    let columns: Vec<&str> = left.split('\t').collect();
    assert_eq!(columns[1], "unsubscribe", "{left}");
    assert_eq!(columns[2], "example.test", "{left}");
    assert!(left.ends_with("asked by phone"), "{left}");
    let out = petrel(dir.path(), &cli(&["list", "--json"]), "").await;
    let rows: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["address"], "complained@example.org");
    assert_eq!(rows[0]["reason"], "complaint");
    assert_eq!(rows[0]["scope"], serde_json::Value::Null);
    assert_eq!(rows[1]["scope"], "example.test");
    assert_eq!(rows[1]["why"], "asked by phone");
    assert!(rows[1]["createdAt"].as_str().unwrap().ends_with('Z'));
    let out = petrel(
        dir.path(),
        &cli(&["remove", "left@example.org", "--scope", "other.test"]),
        "",
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "no entry in that scope");
    let out = petrel(dir.path(), &cli(&["remove", "left@example.org"]), "").await;
    assert!(out.status.success(), "every entry of the address goes");
    let out = petrel(dir.path(), &cli(&["list"]), "").await;
    assert_eq!(text(&out.stdout).lines().count(), 1);
}
