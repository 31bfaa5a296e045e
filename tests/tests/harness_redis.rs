//! Tests of the redis-server harness itself.

use std::time::Duration;

use petrel_tests::redis::{Persistence, RedisServer};
use redis::AsyncCommands;

const LIMIT: Duration = Duration::from_secs(60);

async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).expect("valid url");
    client
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

#[tokio::test]
async fn harness_redis_aof_survives_kill_and_restart() {
    tokio::time::timeout(LIMIT, async {
        let mut server = RedisServer::builder()
            .persistence(Persistence::Aof)
            .start()
            .await
            .unwrap();
        let port = server.port();
        assert_eq!(server.url(), format!("redis://127.0.0.1:{port}"));

        let mut conn = connect(&server.url()).await;
        let _: () = conn.set("petrel:key", "durable").await.unwrap();
        drop(conn);

        server.kill().await.unwrap();
        assert!(!server.is_running());
        assert!(tokio::net::TcpStream::connect(server.addr()).await.is_err());

        server.restart().await.unwrap();
        assert_eq!(server.port(), port);
        let mut conn = connect(&server.url()).await;
        let value: Option<String> = conn.get("petrel:key").await.unwrap();
        assert_eq!(value.as_deref(), Some("durable"));
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn harness_redis_without_persistence_forgets_on_restart() {
    tokio::time::timeout(LIMIT, async {
        let mut server = RedisServer::start().await.unwrap();
        let mut conn = connect(&server.url()).await;
        let _: () = conn.set("k", "v").await.unwrap();
        drop(conn);

        server.stop().await.unwrap();
        server.restart().await.unwrap();
        let mut conn = connect(&server.url()).await;
        let value: Option<String> = conn.get("k").await.unwrap();
        assert_eq!(value, None);
        assert!(
            server
                .raw_command(&["PING"])
                .await
                .unwrap()
                .starts_with("+PONG")
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn harness_redis_servers_are_isolated_and_killed_on_drop() {
    tokio::time::timeout(LIMIT, async {
        let a = RedisServer::start().await.unwrap();
        let b = RedisServer::start().await.unwrap();
        assert_ne!(a.port(), b.port());
        let addr = a.addr();
        drop(a);
        // Drop sends SIGKILL; the port stops accepting once the process is
        // gone. No event to await for another process's death, so poll.
        let mut refused = false;
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "redis still listening after drop");
        drop(b);
    })
    .await
    .expect("test timed out");
}
