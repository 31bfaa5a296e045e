//! The Lua scripts behind every Redis queue state change.
//!
//! Each script is one atomic step: Redis runs it to the end before serving
//! any other client, so a worker crash or a lost connection leaves either
//! the whole change or none. Every key a script touches is passed in
//! `KEYS` (never built inside the script), as Redis Cluster requires, and
//! all of them share one hash tag (one partition's `{prefix:N}`, or the
//! shared `{prefix}`) so they live in one slot.
//!
//! Redis does not roll back a script that fails half-way (only out of
//! memory can make a plain `HSET`/`ZADD` fail), so writes are ordered to
//! make a partial run invisible: the `due` index, which is what makes a
//! unit leasable, is written last.

use std::sync::LazyLock;

use redis::Script;

/// Lua helpers shared by the scripts that store messages. KEYS 1-5: data,
/// left, received, unit, due.
///
/// `store_units` stores a message's unit count and units, the units due
/// at their times (the `due` index last), from `ARGV[first]` on: (unit id,
/// unit json, due at) per unit; returns the index after them.
///
/// `store_message` stores the message at `ARGV[i]` (id, data,
/// received_at, unit count, then the units) unless its id exists, and
/// returns the index after it and whether it stored.
const STORE_MESSAGE: &str = r#"
local function store_units(id, received, n, first)
  local last = first + 3 * n - 1
  redis.call('HSET', KEYS[2], id, n)
  for j = first, last, 3 do
    redis.call('HSET', KEYS[4], ARGV[j], ARGV[j + 1])
  end
  redis.call('ZADD', KEYS[3], received, id)
  for j = first, last, 3 do
    redis.call('ZADD', KEYS[5], ARGV[j + 2], ARGV[j])
  end
  return last + 1
end
local function store_message(i)
  local id, data, received, n = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  if redis.call('HEXISTS', KEYS[1], id) == 1 then return i + 4 + 3 * n, 0 end
  redis.call('HSET', KEYS[1], id, data)
  return store_units(id, received, n, i + 4), 1
end
"#;

/// Lua helper: appends `n` events (JSON, field `e`) from `ARGV[i]` on to
/// the outbox stream `KEYS[k]`; returns the index after them.
const APPEND_EVENTS: &str = r#"
local function append_events(k, i, ids)
  local n = tonumber(ARGV[i])
  for j = i + 1, i + n do
    local id = redis.call('XADD', KEYS[k], '*', 'e', ARGV[j])
    if ids then table.insert(ids, id) end
  end
  return i + n + 1
end
"#;

/// Stores a message's units, due at their `next_attempt_at`, and its
/// events, all or nothing, for a message whose bytes the same
/// transaction (`MULTI`) has just put in `data`. The bytes never pass
/// through Lua: Redis's Lua hashes every byte of every string it makes,
/// which at 100 KB was most of the enqueue's cost in Redis.
///
/// KEYS: data, left, received, unit, due, events.
/// ARGV: message id, received_at, unit count, then (unit id, unit json,
/// due at)*, then event count and event JSON*.
/// Returns `{1, event ids...}` when stored (the ids let a rollback take
/// the events back out), `{0}` when a message with this id already exists
/// (an enqueue retried after a timeout: stored once, not twice, and its
/// events were written the first time).
pub static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{STORE_MESSAGE}{APPEND_EVENTS}
local id = ARGV[1]
if redis.call('HEXISTS', KEYS[2], id) == 1 then return {{0}} end
local next = store_units(id, ARGV[2], tonumber(ARGV[3]), 4)
local out = {{1}}
append_events(6, next, out)
return out
"#
    ))
});

/// Ends or reschedules leased units of one shard and writes everything
/// each attempt produced: DSN messages, events and suppression entries.
/// Each item is all or nothing on its own: an item whose lease was lost
/// writes nothing and the others go on.
///
/// KEYS: data, left, received, unit, due, leased, token, events, and where
/// suppression entries go (the list, or the partition's outbox).
/// ARGV: item count, then per item: unit id, token, message id, mode
/// (`finish`, or `requeue` for a retry or a postponement: the unit stored
/// back and due again), unit json and next attempt (both empty for
/// `finish`), message count and per message the `store_message`
/// arguments, event count and event JSON*, suppression count and
/// (address, entry json)*.
/// Returns one 1 (done) or 0 (lease lost, nothing written) per item.
pub static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{STORE_MESSAGE}{APPEND_EVENTS}
local function item_end(i)
  local j = i + 6
  local messages = tonumber(ARGV[j])
  j = j + 1
  for _ = 1, messages do j = j + 4 + 3 * tonumber(ARGV[j + 3]) end
  j = j + 1 + tonumber(ARGV[j])
  return j + 1 + 2 * tonumber(ARGV[j])
end
local function settle_one(i)
  local last = item_end(i)
  local id, mid = ARGV[i], ARGV[i + 2]
  if redis.call('HGET', KEYS[7], id) ~= ARGV[i + 1] then return last, 0 end
  redis.call('ZREM', KEYS[6], id)
  redis.call('HDEL', KEYS[7], id)
  if ARGV[i + 3] == 'requeue' then
    redis.call('HSET', KEYS[4], id, ARGV[i + 4])
    redis.call('ZADD', KEYS[5], ARGV[i + 5], id)
  else
    redis.call('HDEL', KEYS[4], id)
    local left = redis.call('HINCRBY', KEYS[2], mid, -1)
    if left <= 0 then
      redis.call('HDEL', KEYS[2], mid)
      redis.call('HDEL', KEYS[1], mid)
      redis.call('ZREM', KEYS[3], mid)
    end
  end
  local j = i + 7
  for _ = 1, tonumber(ARGV[i + 6]) do
    j = store_message(j)
  end
  j = append_events(8, j)
  local n = tonumber(ARGV[j])
  for k = j + 1, j + 2 * n, 2 do
    redis.call('HSET', KEYS[9], ARGV[k], ARGV[k + 1])
  end
  return last, 1
end
local out = {{}}
local i = 2
for _ = 1, tonumber(ARGV[1]) do
  local done
  i, done = settle_one(i)
  table.insert(out, done)
end
return out
"#
    ))
});

/// Appends events that change no queue state.
///
/// KEYS: events. ARGV: event count, event JSON*. Returns the count.
pub static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{APPEND_EVENTS}
append_events(1, 1)
return tonumber(ARGV[1])
"#
    ))
});

/// Appends events and stores the suppression entries they describe.
///
/// KEYS: events, supp. ARGV: event count, event JSON*, entry count,
/// (key, entry json)*. Returns the event count.
pub static PUBLISH_SUPPRESSING: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{APPEND_EVENTS}
local i = append_events(1, 1)
local n = tonumber(ARGV[i])
for j = i + 1, i + 2 * n, 2 do
  redis.call('HSET', KEYS[2], ARGV[j], ARGV[j + 1])
end
return tonumber(ARGV[1])
"#
    ))
});

/// Takes a message back out after `WAIT` saw too few replicas, unless a
/// worker already leased one of its units (then it stays: delivering it
/// twice is better than losing it), with the events its enqueue wrote.
///
/// KEYS: data, left, received, unit, due, leased, events.
/// ARGV: message id, unit count, unit ids, then event stream ids.
/// Returns 1 when removed.
pub static ROLLBACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local units = tonumber(ARGV[2]) + 2
for i = 3, units do
  if redis.call('ZSCORE', KEYS[6], ARGV[i]) then return 0 end
end
for i = 3, units do
  redis.call('ZREM', KEYS[5], ARGV[i])
  redis.call('HDEL', KEYS[4], ARGV[i])
end
for i = units + 1, #ARGV do
  redis.call('XDEL', KEYS[7], ARGV[i])
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"#,
    )
});

/// Makes expired leases due again (at their expiry), then leases up to
/// `max` due units of one shard, each returned with its message's id
/// while the byte budget lasts (once per message: a second unit of the
/// same message gets `false`, the caller shares the first copy). The
/// caller reads those messages with one `HMGET`: the bytes stay out of
/// Lua, which hashes every byte of each string it makes (see `ENQUEUE`). A due
/// unit of a held destination is moved to the held index instead
/// (keeping its due time), so it is neither handed out nor met again by
/// the next lease. Only with holds in place is a unit record decoded
/// (cjson) to learn its domain; one that does not decode is leased as
/// before, and the worker deals with it.
///
/// KEYS: due, leased, unit, token, held, data.
/// ARGV: now, max, lease expiry, token, most expired leases to reclaim,
/// byte budget, then the held domains.
/// Returns (unit JSON, message id to read or false) per leased unit.
pub static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[5])
for i = 1, #expired, 2 do
  redis.call('ZREM', KEYS[2], expired[i])
  redis.call('HDEL', KEYS[4], expired[i])
  redis.call('ZADD', KEYS[1], expired[i + 1], expired[i])
end
local holds, holding = {}, false
for i = 7, #ARGV do
  holds[ARGV[i]] = true
  holding = true
end
local budget = tonumber(ARGV[6])
local sent = {}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
local out = {}
for i = 1, #due, 2 do
  local id = due[i]
  redis.call('ZREM', KEYS[1], id)
  local unit = redis.call('HGET', KEYS[3], id)
  if unit then
    local held = false
    if holding then
      local ok, u = pcall(cjson.decode, unit)
      held = ok and type(u) == 'table' and type(u.domain) == 'string'
        and holds[u.domain] == true
    end
    if held then
      redis.call('ZADD', KEYS[5], due[i + 1], id)
    else
      redis.call('ZADD', KEYS[2], ARGV[3], id)
      redis.call('HSET', KEYS[4], id, ARGV[4])
      local body = false
      if budget > 0 then
        -- serde_json writes the id plainly unless it needs escapes.
        local mid = string.match(unit, '"message_id":"([^"\\]*)"')
        if not mid then
          local ok, u = pcall(cjson.decode, unit)
          if ok and type(u) == 'table' and type(u.message_id) == 'string' then mid = u.message_id end
        end
        if mid and not sent[mid] then
          local len = redis.call('HSTRLEN', KEYS[6], mid)
          if len > 0 then
            sent[mid] = true
            budget = budget - len
            body = mid
          end
        end
      end
      table.insert(out, unit)
      table.insert(out, body)
    end
  end
end
return out
"#,
    )
});

/// Leases named units for an operator action, whatever index they are in,
/// unless a worker's lease on them is still running at `now`.
///
/// KEYS: due, leased, unit, token, held.
/// ARGV: now, lease expiry, token, unit ids...
/// Returns the claimed unit records (JSON).
pub static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local unit = redis.call('HGET', KEYS[3], id)
  local expiry = redis.call('ZSCORE', KEYS[2], id)
  if unit and not (expiry and tonumber(expiry) > tonumber(ARGV[1])) then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[5], id)
    redis.call('ZADD', KEYS[2], ARGV[2], id)
    redis.call('HSET', KEYS[4], id, ARGV[3])
    table.insert(out, unit)
  end
end
return out
"#,
    )
});

/// Moves the named units of one shard from due to held, keeping their
/// due time (the hold itself is in the shared `holds` hash).
///
/// KEYS: due, held. ARGV: unit ids...
/// Returns how many units moved.
pub static HOLD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local moved = 0
for i = 1, #ARGV do
  local at = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if at then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('ZADD', KEYS[2], at, ARGV[i])
    moved = moved + 1
  end
end
return moved
"#,
    )
});

/// Records the partition count a pod uses and returns the highest one
/// ever recorded, so every pod leases from every partition that may hold
/// units (partitions shrink without stranding anything).
///
/// KEYS: meta. ARGV: partitions. Returns the highest count.
pub static META: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local seen = tonumber(redis.call('HGET', KEYS[1], 'partitions') or '0')
local mine = tonumber(ARGV[1])
if mine > seen then
  redis.call('HSET', KEYS[1], 'partitions', mine)
  return mine
end
return seen
"#,
    )
});

/// Moves released units from held back to due at their due time, storing
/// their record with the held time credited.
///
/// KEYS: held, due, unit. ARGV: (unit id, unit json)...
/// Returns how many units moved.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local moved = 0
for i = 1, #ARGV, 2 do
  local at = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if at then
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('ZADD', KEYS[2], at, ARGV[i])
    moved = moved + 1
  end
end
return moved
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

/// Extends a slot still held by `token` (unexpired by the server clock) to
/// `ttl` from now; an expired one is removed and stays lost, since its
/// place may have been taken already.
///
/// KEYS: slot set. ARGV: token, ttl ms. Returns 1 when extended.
pub static RENEW_SLOT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry then return 0 end
if tonumber(expiry) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"#,
    )
});
