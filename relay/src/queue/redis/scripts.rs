//! The Lua scripts behind every Redis queue state change.
//!
//! Each script is one atomic step: Redis runs it to the end before serving
//! any other client, so a worker crash or a lost connection leaves either
//! the whole change or none. Every key a script touches is passed in
//! `KEYS` (never built inside the script), as Redis Cluster requires, and
//! all of them share one `{prefix}` hash tag so they live in one slot.
//!
//! Redis does not roll back a script that fails half-way (only out of
//! memory can make a plain `HSET`/`ZADD` fail), so writes are ordered to
//! make a partial run invisible: the `due` index, which is what makes a
//! unit leasable, is written last.

use std::sync::LazyLock;

use redis::Script;

/// Stores a message and its units, due at their `next_attempt_at`.
///
/// KEYS: data, left, received, unit, due.
/// ARGV: message id, data, received_at, then (unit id, unit json, due at)*.
/// Returns 1 when stored, 0 when a message with this id already exists (an
/// enqueue retried after a timeout: stored once, not twice).
pub static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
local n = (#ARGV - 3) / 3
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], n)
for i = 4, #ARGV, 3 do
  redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
for i = 4, #ARGV, 3 do
  redis.call('ZADD', KEYS[5], ARGV[i + 2], ARGV[i])
end
return 1
"#,
    )
});

/// Takes a message back out after `WAIT` saw too few replicas, unless a
/// worker already leased one of its units (then it stays: delivering it
/// twice is better than losing it).
///
/// KEYS: data, left, received, unit, due, leased.
/// ARGV: message id, then unit ids. Returns 1 when removed.
pub static ROLLBACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[6], ARGV[i]) then return 0 end
end
for i = 2, #ARGV do
  redis.call('ZREM', KEYS[5], ARGV[i])
  redis.call('HDEL', KEYS[4], ARGV[i])
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"#,
    )
});

/// Makes expired leases due again (at their expiry), then leases up to
/// `max` due units.
///
/// KEYS: due, leased, unit, token.
/// ARGV: now, max, lease expiry, token, most expired leases to reclaim.
/// Returns the leased unit records (JSON).
pub static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[5])
for i = 1, #expired, 2 do
  redis.call('ZREM', KEYS[2], expired[i])
  redis.call('HDEL', KEYS[4], expired[i])
  redis.call('ZADD', KEYS[1], expired[i + 1], expired[i])
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local unit = redis.call('HGET', KEYS[3], id)
  if unit then
    redis.call('ZADD', KEYS[2], ARGV[3], id)
    redis.call('HSET', KEYS[4], id, ARGV[4])
    table.insert(out, unit)
  end
end
return out
"#,
    )
});

/// Removes a leased unit (delivered, or failed for good); the message and
/// its data go with its last unit.
///
/// KEYS: leased, token, unit, left, data, received.
/// ARGV: unit id, token, message id.
/// Returns 1 when done, 0 when the lease was lost.
pub static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
local left = redis.call('HINCRBY', KEYS[4], ARGV[3], -1)
if left <= 0 then
  redis.call('HDEL', KEYS[4], ARGV[3])
  redis.call('HDEL', KEYS[5], ARGV[3])
  redis.call('ZREM', KEYS[6], ARGV[3])
end
return 1
"#,
    )
});

/// Stores the rescheduled unit and makes it due at its next attempt.
///
/// KEYS: leased, token, unit, due.
/// ARGV: unit id, token, unit json, next attempt.
/// Returns 1 when done, 0 when the lease was lost.
pub static RETRY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
return 1
"#,
    )
});

/// Extends a lease still held by `token` and not expired at `now` (the
/// same boundary as [`LEASE`]: a lease expiring at `now` is expired).
///
/// KEYS: leased, token.
/// ARGV: unit id, token, now, new expiry.
/// Returns 1 when extended, 0 when the lease was lost.
pub static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) <= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
return 1
"#,
    )
});

/// Fixed-window counter: the window starts with the first increment.
///
/// KEYS: counter. ARGV: by, window ms. Returns the new total.
pub static INCR: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v
"#,
    )
});

/// Takes a slot when fewer than `limit` unexpired ones are held. Uses the
/// Redis server's clock, the only one all pods share.
///
/// KEYS: slot set. ARGV: limit, ttl ms, token. Returns 1 when taken.
pub static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"#,
    )
});
