//! A whole inbound SMTP session (`petrel_relay::inbound::Session`) over an
//! in-memory stream, with an in-memory queue: EHLO, MAIL, RCPT, DATA, RSET,
//! AUTH, garbage, in any order and chunking.
//!
//! Properties: no panic; everything the relay writes is a well-formed SMTP
//! reply line (`ddd` then space or dash, CRLF-terminated); the session ends
//! once the client closes.

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use petrel_relay::config::RelayConfig;
use petrel_relay::inbound::{InboundContext, Session, SessionState};
use petrel_relay::queue::memory::MemoryBackend;
use petrel_relay::reload::Reloading;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

struct World {
    runtime: tokio::runtime::Runtime,
    ctx: Arc<InboundContext>,
    shutdown: watch::Sender<bool>,
    _dir: std::path::PathBuf,
}

const KEY: &str = include_str!("../../examples/local/dkim-example.test.key");

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("petrel-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("dkim.key"), KEY).expect("key");
        let d = dir.display();
        let yaml = format!(
            "hostname: relay.fuzz.test
listeners: [{{name: smtp, address: \"127.0.0.1:2525\"}}]
trustedNetworks: [\"127.0.0.0/8\"]
queue: {{embedded: {{path: {d}/queue}}}}
limits: {{maxMessageSize: 65536, maxLineLength: 1000, maxErrors: 1000, commandTimeout: 5s, dataTimeout: 5s}}
domains:
  - domain: example.test
    dkim: {{selector: example, algorithm: ed25519, keyFile: {d}/dkim.key}}
"
        );
        let config = RelayConfig::from_yaml(&yaml).expect("fuzz config");
        let mem = Arc::new(MemoryBackend::default());
        let (_, metrics) = petrel_relay::metrics::RelayMetrics::standalone();
        let ctx = InboundContext::new(Reloading::fixed(config), mem.clone(), mem, metrics)
            .expect("inbound context");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (shutdown, _) = watch::channel(false);
        World {
            runtime,
            ctx: Arc::new(ctx),
            shutdown,
            _dir: dir,
        }
    })
}

/// Every line the server wrote is `ddd[ -]text\r\n`.
fn check_replies(out: &[u8]) {
    if out.is_empty() {
        return;
    }
    assert!(out.ends_with(b"\r\n"), "reply stream not CRLF-terminated: {:?}", String::from_utf8_lossy(out));
    for line in out[..out.len() - 2].split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let ok = line.len() >= 4
            && line[..3].iter().all(u8::is_ascii_digit)
            && (b'2'..=b'5').contains(&line[0])
            && (line[3] == b' ' || line[3] == b'-')
            && !line.contains(&b'\r');
        assert!(ok, "not an SMTP reply line: {:?}", String::from_utf8_lossy(line));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let w = world();
    let listener = Arc::new(w.ctx.config.get().listeners[0].clone());
    let out = w.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let session = Session::new(
            server,
            SessionState::new("127.0.0.1:40000".parse().expect("addr")),
            w.ctx.clone(),
            listener,
            w.shutdown.subscribe(),
        );
        let task = tokio::spawn(session.run());
        let (mut r, mut wr) = tokio::io::split(&mut client);
        let reader = async {
            let mut out = Vec::new();
            let _ = r.read_to_end(&mut out).await;
            out
        };
        let writer = async {
            for piece in input.chunks(chunk) {
                if wr.write_all(piece).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        };
        let (out, ()) = tokio::join!(reader, writer);
        let _ = task.await;
        out
    });
    check_replies(&out);
});
