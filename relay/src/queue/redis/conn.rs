//! Where the queue's Redis is: one server, a primary watched by Sentinel,
//! or a Redis Cluster, told apart by the URL scheme:
//!
//! - `redis://[user:pass@]host:port[/db]`: one server.
//! - `redis+sentinel://[user:pass@]s1:26379,s2:26379/<master name>[/db]`:
//!   ask the Sentinels for the primary of `<master name>`; after a
//!   failover (connection lost, or `READONLY` from a demoted primary) ask
//!   again. The credentials are the primary's; Sentinels without AUTH.
//! - `redis+cluster://[user:pass@]n1:6379,n2:6379`: seed nodes of a
//!   Cluster; the credentials apply to every node.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio::sync::OnceCell;

pub(super) use crate::config::RedisTarget as Target;

/// Hands out connections; every kind reconnects by itself.
#[derive(Clone)]
pub(super) enum Connector {
    /// One server through a [`ConnectionManager`] (lazy, reconnecting).
    Single(ConnectionManager),
    /// A Cluster, connected on first use (so a relay starts while the
    /// cluster is still forming) and then kept.
    Cluster(Arc<ClusterState>),
    /// The primary Sentinel names, connected on first use and looked up
    /// again after [`Connector::invalidate`].
    Sentinel(Arc<SentinelState>),
}

/// See [`Connector::Cluster`].
pub(super) struct ClusterState {
    client: ClusterClient,
    conn: OnceCell<ClusterConnection>,
}

/// See [`Connector::Sentinel`].
pub(super) struct SentinelState {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    current: std::sync::Mutex<Option<ConnectionManager>>,
    config: ConnectionManagerConfig,
}

impl Connector {
    /// Builds the connector without connecting.
    pub(super) fn new(target: &Target, timeout: Duration) -> RedisResult<Self> {
        // Our own deadline answers the caller; the client's timeouts only
        // make a hung connection count as broken, so they are longer.
        let response_timeout = timeout + Duration::from_secs(1);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(response_timeout))
            .set_max_delay(Duration::from_secs(2));
        match target {
            Target::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                Ok(Connector::Single(ConnectionManager::new_lazy_with_config(
                    client, config,
                )?))
            }
            Target::Cluster(nodes) => {
                let client = ClusterClient::builder(nodes.iter().map(String::as_str))
                    .connection_timeout(timeout)
                    .response_timeout(response_timeout)
                    .build()?;
                Ok(Connector::Cluster(Arc::new(ClusterState {
                    client,
                    conn: OnceCell::new(),
                })))
            }
            Target::Sentinel {
                sentinels,
                master,
                primary,
            } => {
                let primary = primary.as_str().into_connection_info()?;
                let node = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(primary.redis_settings().clone());
                let sentinel = SentinelClient::build(
                    sentinels.iter().map(String::as_str).collect(),
                    master.clone(),
                    Some(node),
                    SentinelServerType::Master,
                )?;
                Ok(Connector::Sentinel(Arc::new(SentinelState {
                    sentinel: tokio::sync::Mutex::new(sentinel),
                    current: std::sync::Mutex::new(None),
                    config,
                })))
            }
        }
    }

    /// Forgets the Sentinel-named primary after an error that may mean a
    /// failover, so the next call asks the Sentinels again. A no-op for
    /// the other kinds, which follow topology changes by themselves.
    pub(super) fn invalidate(&self, error: &RedisError) {
        if may_be_failover(error) {
            self.invalidate_after_timeout();
        }
    }

    /// Like [`Connector::invalidate`], after our own deadline passed.
    pub(super) fn invalidate_after_timeout(&self) {
        if let Connector::Sentinel(state) = self {
            let mut current = state.current.lock().unwrap_or_else(|p| p.into_inner());
            *current = None;
        }
    }

    /// A connection handle (cheap: every kind is multiplexed).
    pub(super) async fn get(&self) -> RedisResult<Conn> {
        match self {
            Connector::Single(manager) => Ok(Conn::Single(manager.clone())),
            Connector::Cluster(state) => {
                let conn = state
                    .conn
                    .get_or_try_init(|| state.client.get_async_connection())
                    .await?;
                Ok(Conn::Cluster(conn.clone()))
            }
            Connector::Sentinel(state) => {
                let current = &state.current;
                let cached = current.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some(manager) = cached {
                    return Ok(Conn::Single(manager));
                }
                let mut sentinel = state.sentinel.lock().await;
                // Another caller may have looked it up while we waited.
                let cached = current.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some(manager) = cached {
                    return Ok(Conn::Single(manager));
                }
                let client = sentinel.async_get_client().await?;
                let manager =
                    ConnectionManager::new_with_config(client, state.config.clone()).await?;
                *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(manager.clone());
                Ok(Conn::Single(manager))
            }
        }
    }
}

/// Errors after which the primary may have moved: the connection failed,
/// or the server we write to was demoted to a replica.
fn may_be_failover(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.code() == Some("READONLY")
        || error.to_string().contains("READONLY")
}

/// One connection of either kind.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
