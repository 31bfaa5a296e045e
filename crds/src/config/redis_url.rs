//! Queue URLs: which Redis the queue talks to, told apart by the scheme.
//! One parser, used by config validation and by the queue when it
//! connects, so a config is accepted exactly when the queue can use it.
//!
//! - `redis://[user:pass@]host:port[/db]`: one server.
//! - `redis+sentinel://[user:pass@]s1:26379,s2:26379/<master name>[/db]`:
//!   ask the Sentinels for the primary of `<master name>`. The credentials
//!   are the primary's; Sentinels without AUTH.
//! - `redis+cluster://[user:pass@]n1:6379,n2:6379`: seed nodes of a
//!   Cluster; the credentials apply to every node.
//!
//! `rediss://` is refused: the relay's Redis client is built without TLS.

/// A parsed queue URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server, as a `redis://` URL.
    Single(String),
    /// Seed nodes of a Cluster, each as a `redis://` URL.
    Cluster(Vec<String>),
    /// Sentinels (`redis://host:port` each), the master's name, and the
    /// primary's own connection settings.
    Sentinel {
        /// `redis://host:port` of each Sentinel.
        sentinels: Vec<String>,
        /// The name Sentinel knows the primary by.
        master: String,
        /// `redis://[userinfo@]primary/db`: only credentials and db count.
        primary: String,
    },
}

/// Parses a queue URL (see the module docs).
pub fn parse_redis_url(url: &str) -> Result<RedisTarget, String> {
    let url = url.trim();
    let (kind, rest) = match url.split_once("://") {
        Some(("redis+cluster", rest)) => ("cluster", rest),
        Some(("redis+sentinel", rest)) => ("sentinel", rest),
        Some((s, _)) if s.ends_with("+cluster") || s.ends_with("+sentinel") => {
            return Err(format!("unsupported scheme {s}:// (no TLS to Redis)"));
        }
        Some(("redis", _)) => return Ok(RedisTarget::Single(url.to_string())),
        // The queue's Redis client is built without TLS: a rediss:// URL
        // would pass here and fail on every connection attempt.
        Some(("rediss", _)) => {
            return Err(
                "rediss:// (TLS to Redis) is not supported by this relay build; use redis://"
                    .into(),
            );
        }
        _ => {
            return Err("must start with redis://, redis+sentinel:// or redis+cluster://".into());
        }
    };
    let (authority, path) = match rest.split_once('/') {
        Some((authority, path)) => (authority, path.trim_end_matches('/')),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let hosts: Vec<&str> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    if hosts.is_empty() {
        return Err(format!("a {kind} URL needs at least one host:port"));
    }
    let with_auth = |host: &str| match userinfo {
        Some(u) => format!("redis://{u}@{host}"),
        None => format!("redis://{host}"),
    };
    if kind == "cluster" {
        if !path.is_empty() {
            return Err("a cluster URL takes no path (Redis Cluster has only database 0)".into());
        }
        return Ok(RedisTarget::Cluster(
            hosts.into_iter().map(with_auth).collect(),
        ));
    }
    let (master, db) = match path.split_once('/') {
        Some((master, db)) => (master, db),
        None => (path, "0"),
    };
    if master.is_empty() {
        return Err("a sentinel URL needs the master name as its path".into());
    }
    if db.parse::<u32>().is_err() {
        return Err(format!(
            "database {db:?} in the sentinel URL is not a number"
        ));
    }
    Ok(RedisTarget::Sentinel {
        sentinels: hosts.iter().map(|h| format!("redis://{h}")).collect(),
        master: master.to_string(),
        primary: format!("{}/{db}", with_auth("primary")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_one_server_sentinels_or_cluster_seeds() {
        let single = |u: &str| Ok(RedisTarget::Single(u.to_string()));
        let cluster = |nodes: &[&str]| {
            Ok(RedisTarget::Cluster(
                nodes.iter().map(|n| n.to_string()).collect(),
            ))
        };
        let err = |e: &str| Err(e.to_string());
        for (url, want) in [
            ("redis://127.0.0.1:6379", single("redis://127.0.0.1:6379")),
            (" redis://:pw@r:6380/2\n", single("redis://:pw@r:6380/2")),
            (
                "rediss://:pw@r:6380/2",
                err("rediss:// (TLS to Redis) is not supported by this relay build; use redis://"),
            ),
            (
                "http://x",
                err("must start with redis://, redis+sentinel:// or redis+cluster://"),
            ),
            (
                "redis+cluster://a:7000,b:7001",
                cluster(&["redis://a:7000", "redis://b:7001"]),
            ),
            (
                "redis+cluster://user:p@ss@a:7000, b:7001/",
                cluster(&["redis://user:p@ss@a:7000", "redis://user:p@ss@b:7001"]),
            ),
            (
                "redis+cluster://",
                err("a cluster URL needs at least one host:port"),
            ),
            (
                "redis+cluster://a:1/0",
                err("a cluster URL takes no path (Redis Cluster has only database 0)"),
            ),
            (
                "redis+sentinel://:pw@s1:26379,s2:26379/mymaster",
                Ok(RedisTarget::Sentinel {
                    sentinels: vec!["redis://s1:26379".into(), "redis://s2:26379".into()],
                    master: "mymaster".into(),
                    primary: "redis://:pw@primary/0".into(),
                }),
            ),
            (
                "redis+sentinel://s1:26379/mymaster/3/",
                Ok(RedisTarget::Sentinel {
                    sentinels: vec!["redis://s1:26379".into()],
                    master: "mymaster".into(),
                    primary: "redis://primary/3".into(),
                }),
            ),
            (
                "redis+sentinel://s1:26379",
                err("a sentinel URL needs the master name as its path"),
            ),
            (
                "redis+sentinel://s1:26379/m/x",
                err("database \"x\" in the sentinel URL is not a number"),
            ),
            (
                "rediss+cluster://a:1",
                err("unsupported scheme rediss+cluster:// (no TLS to Redis)"),
            ),
        ] {
            assert_eq!(parse_redis_url(url), want, "{url}");
        }
    }
}
