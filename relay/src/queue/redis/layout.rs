//! Where each Redis key lives: the pure part of the partitioned layout
//! (module docs of `redis` hold the table). No I/O here.
//!
//! A *shard* is one set of queue keys under one hash tag: partition `n`
//! under `{prefix:n}`, or the legacy shard under the plain `{prefix}` tag
//! that every key used before partitions existed. Every queue script runs
//! on the keys of one shard, so on Redis Cluster each script stays in one
//! slot while the shards spread over all masters.

/// One set of queue keys under one hash tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Shard {
    /// The single-tag layout of before partitions: drained, never written
    /// by an enqueue. Its event stream is also the shared stream that
    /// `publish` writes (it sits with the suppression list, under `{prefix}`).
    Legacy,
    /// Partition `n` of the queue.
    Part(u32),
}

impl Shard {
    /// The hash tag of the shard's keys: `{prefix}` for the legacy shard,
    /// `{prefix:N:S}` for partition N (see [`partition_tag`]).
    pub(super) fn tag(self, prefix: &str) -> String {
        match self {
            Shard::Legacy => format!("{{{prefix}}}"),
            Shard::Part(n) => format!("{{{}}}", partition_tag(prefix, n)),
        }
    }

    /// How the shard is named inside lease tokens and event positions.
    pub(super) fn code(self) -> String {
        match self {
            Shard::Legacy => "L".into(),
            Shard::Part(n) => n.to_string(),
        }
    }

    /// The shard a [`Shard::code`] names.
    pub(super) fn from_code(code: &str) -> Option<Shard> {
        match code {
            "L" => Some(Shard::Legacy),
            n => n.parse().ok().map(Shard::Part),
        }
    }

    /// Position among shards when event streams are merged (legacy first).
    pub(super) fn order(self) -> u64 {
        match self {
            Shard::Legacy => 0,
            Shard::Part(n) => u64::from(n) + 1,
        }
    }
}

/// The Redis Cluster slot of a hash tag's content (CRC16/XMODEM, as Redis
/// computes it).
pub(super) fn slot_of(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for byte in tag.as_bytes() {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc & 0x3fff
}

/// Slots per partition window: 16384 slots over the 1024 partitions most.
const WINDOW: u32 = 16;

/// The tag content of partition `n`: `prefix:n:S`, with the smallest
/// salt `S` that puts its slot in window `reverse10(n)` of the slot space
/// (the van der Corput order: 0, 1/2, 1/4, 3/4, ...). So the first N
/// partitions sit evenly spread over the slots for any prefix (exactly
/// evenly when N is a power of two, as the default 16 is),
/// and a cluster whose masters own equal contiguous slot ranges (what
/// `redis-cli --cluster create` and rebalancing make) gets an equal share
/// of them; plain `prefix:n` tags fall where CRC16 puts them, which for 16
/// partitions over 3 masters is often 4/5/7. The tag depends on `n` and
/// the prefix only, never on the partition count, so changing
/// `partitions` renames nothing.
pub(super) fn partition_tag(prefix: &str, n: u32) -> String {
    let start = (n.reverse_bits() >> 22) * WINDOW;
    let mut tag = String::new();
    // About 1024 tries on average; the bound only guards the loop.
    for salt in 0..(1u32 << 20) {
        tag = format!("{prefix}:{n}:{salt}");
        let slot = u32::from(slot_of(&tag));
        if (start..start + WINDOW).contains(&slot) {
            break;
        }
    }
    tag
}

/// The partition of message `id` among `partitions` (at least 1): FNV-1a
/// of the id, so every pod and every version agrees without sharing state.
pub(super) fn partition_of(id: &str, partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u32
}

/// A lease token: the shard the unit lives in, then a random part, so
/// renew and settle find the unit's keys from the lease alone.
pub(super) fn token(shard: Shard) -> String {
    format!("{}.{}", shard.code(), uuid::Uuid::new_v4().simple())
}

/// The shard a token was issued for; `None` for a token this layout did
/// not issue (it cannot own any unit).
pub(super) fn shard_of_token(token: &str) -> Option<Shard> {
    token
        .split_once('.')
        .and_then(|(code, _)| Shard::from_code(code))
}

/// The event position of stream entry `id` of `shard`: the legacy (shared)
/// stream keeps plain stream ids, as before partitions; a partition's
/// entries carry `@n`.
pub(super) fn seq(shard: Shard, id: &str) -> String {
    match shard {
        Shard::Legacy => id.to_string(),
        Shard::Part(_) => format!("{id}@{}", shard.code()),
    }
}

/// The shard and stream id of an event position.
pub(super) fn split_seq(seq: &str) -> Option<(Shard, &str)> {
    match seq.split_once('@') {
        None => Some((Shard::Legacy, seq)),
        Some((id, code)) => Shard::from_code(code)
            .filter(|s| *s != Shard::Legacy)
            .map(|s| (s, id)),
    }
}

/// Orders stream ids numerically (`<ms>-<n>`).
pub(super) fn id_key(id: &str) -> (u64, u64) {
    let (ms, n) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), n.parse().unwrap_or(0))
}

/// Where an event sits in the merged log: by stream id, streams tied at
/// one id ordered by shard. Within one stream this is the stream's order.
pub(super) fn merged_key(shard: Shard, id: &str) -> (u64, u64, u64) {
    let (ms, n) = id_key(id);
    (ms, n, shard.order())
}

/// The `XRANGE` start of `shard` for reading after position `after` of
/// the merged log: a stream ordered after `after`'s own includes an entry
/// with the same id, the others exclude it.
pub(super) fn range_start(shard: Shard, after: Option<(Shard, &str)>) -> String {
    match after {
        None => "-".into(),
        Some((at, id)) if shard.order() > at.order() => id.to_string(),
        Some((_, id)) => format!("({id}"),
    }
}

/// Splits `max` items over shards that have `available[i]` each, fairly:
/// every shard gets an equal share (the remainder going to the shards
/// from `start` on, so the lucky ones rotate), and what a shard cannot use
/// goes to the others. Never more than a shard has, never more than `max`
/// in all.
pub(super) fn plan_quotas(available: &[u64], max: usize, start: usize) -> Vec<usize> {
    let n = available.len();
    let mut quotas = vec![0usize; n];
    if n == 0 {
        return quotas;
    }
    let mut left = max;
    loop {
        let open: Vec<usize> = (0..n)
            .map(|i| (start + i) % n)
            .filter(|&i| (quotas[i] as u64) < available[i])
            .collect();
        if left == 0 || open.is_empty() {
            return quotas;
        }
        let share = (left / open.len()).max(1);
        for i in open {
            if left == 0 {
                break;
            }
            let room = available[i].saturating_sub(quotas[i] as u64);
            let take = share
                .min(left)
                .min(usize::try_from(room).unwrap_or(usize::MAX));
            quotas[i] += take;
            left -= take;
        }
    }
}

/// The keys of one shard's queue.
#[derive(Clone, Debug)]
pub(super) struct ShardKeys {
    pub(super) shard: Shard,
    /// Message id -> message bytes.
    pub(super) data: String,
    /// Message id -> units not yet finished.
    pub(super) left: String,
    /// Message id -> received_at.
    pub(super) received: String,
    /// Unit id -> unit JSON.
    pub(super) unit: String,
    /// Unit id -> next attempt.
    pub(super) due: String,
    /// Unit id -> lease expiry.
    pub(super) leased: String,
    /// Unit id -> lease token.
    pub(super) token: String,
    /// Unit id -> next attempt, for held destinations.
    pub(super) held: String,
    /// The shard's event stream.
    pub(super) events: String,
    /// Where a settlement writes suppression entries: the shared list
    /// itself for the legacy shard (same tag), else the partition's
    /// suppression outbox, moved to the shared list right after.
    pub(super) supp_out: String,
}

impl ShardKeys {
    pub(super) fn new(prefix: &str, shard: Shard) -> ShardKeys {
        let tag = shard.tag(prefix);
        let k = |name: &str| format!("{tag}:{name}");
        ShardKeys {
            shard,
            data: k("data"),
            left: k("left"),
            received: k("received"),
            unit: k("unit"),
            due: k("due"),
            leased: k("leased"),
            token: k("token"),
            held: k("held"),
            events: k("events"),
            supp_out: match shard {
                Shard::Legacy => k("supp"),
                Shard::Part(_) => k("supp-out"),
            },
        }
    }
}

/// The keys every pod shares outside the partitions, under `{prefix}`.
#[derive(Clone, Debug)]
pub(super) struct SharedKeys {
    pub(super) tag: String,
    /// Address -> suppression entry JSON.
    pub(super) supp: String,
    /// Held domain -> held since.
    pub(super) holds: String,
    /// `partitions` -> the highest partition count ever used.
    pub(super) meta: String,
}

impl SharedKeys {
    pub(super) fn new(prefix: &str) -> SharedKeys {
        let tag = Shard::Legacy.tag(prefix);
        SharedKeys {
            supp: format!("{tag}:supp"),
            holds: format!("{tag}:holds"),
            meta: format!("{tag}:meta"),
            tag,
        }
    }

    pub(super) fn counter(&self, key: &str) -> String {
        format!("{}:ctr:{key}", self.tag)
    }

    pub(super) fn slot(&self, key: &str) -> String {
        format!("{}:slot:{key}", self.tag)
    }

    pub(super) fn value(&self, key: &str) -> String {
        format!("{}:kv:{key}", self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_shard_has_its_own_tag_and_the_legacy_one_keeps_the_old_names() {
        let legacy = ShardKeys::new("petrel", Shard::Legacy);
        assert_eq!(legacy.data, "{petrel}:data");
        assert_eq!(legacy.due, "{petrel}:due");
        assert_eq!(legacy.events, "{petrel}:events");
        assert_eq!(legacy.supp_out, "{petrel}:supp");
        let p = ShardKeys::new("petrel", Shard::Part(3));
        let tag = "{petrel:3:".to_string();
        for key in [
            &p.data,
            &p.left,
            &p.received,
            &p.unit,
            &p.due,
            &p.leased,
            &p.token,
            &p.held,
            &p.events,
            &p.supp_out,
        ] {
            assert!(key.starts_with(&tag), "{key}");
            assert!(key.starts_with(&Shard::Part(3).tag("petrel")), "{key}");
        }
        let shared = SharedKeys::new("petrel");
        assert_eq!(shared.supp, "{petrel}:supp");
        assert_eq!(shared.counter("auth:1.2.3.4"), "{petrel}:ctr:auth:1.2.3.4");
        assert_eq!(shared.slot("mx:gmail"), "{petrel}:slot:mx:gmail");
    }

    #[test]
    fn slots_are_computed_as_redis_does() {
        // From the Redis Cluster specification.
        assert_eq!(slot_of("123456789"), 0x31c3);
        assert_eq!(slot_of("user1000"), 3443);
    }

    #[test]
    fn partitions_spread_evenly_over_the_slots_of_three_masters() {
        for prefix in ["petrel", "petrel-test", "x"] {
            // Powers of two sit exactly evenly (others within the
            // van der Corput discrepancy).
            for n in [2u32, 4, 16, 64] {
                let mut per_master = [0u32; 3];
                for p in 0..n {
                    let slot = u32::from(slot_of(&partition_tag(prefix, p)));
                    // The ranges `redis-cli --cluster create` gives 3 masters.
                    per_master[match slot {
                        0..=5460 => 0,
                        5461..=10922 => 1,
                        _ => 2,
                    }] += 1;
                }
                let (lo, hi) = (n / 3, n.div_ceil(3) + 1);
                assert!(
                    per_master.iter().all(|c| (lo..=hi).contains(c)),
                    "{prefix} {n}: {per_master:?}"
                );
            }
        }
        assert_eq!(partition_tag("petrel", 5), partition_tag("petrel", 5));
        assert_ne!(partition_tag("petrel", 5), partition_tag("other", 5));
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(partition_of("abc", 16), partition_of("abc", 16));
        assert_eq!(partition_of("abc", 1), 0);
        assert_eq!(partition_of("abc", 0), 0);
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[partition_of(&format!("msg-{i}"), 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn tokens_and_positions_name_their_shard() {
        assert_eq!(shard_of_token(&token(Shard::Part(7))), Some(Shard::Part(7)));
        assert_eq!(shard_of_token(&token(Shard::Legacy)), Some(Shard::Legacy));
        assert_eq!(shard_of_token("not-the-token"), None);
        assert_eq!(split_seq("5-1"), Some((Shard::Legacy, "5-1")));
        assert_eq!(
            split_seq(&seq(Shard::Part(2), "5-1")),
            Some((Shard::Part(2), "5-1"))
        );
        assert_eq!(split_seq("5-1@x"), None);
        assert_eq!(split_seq("5-1@L"), None);
    }

    #[test]
    fn reading_after_a_position_includes_ties_only_in_later_streams() {
        let after = Some((Shard::Part(2), "5-1"));
        assert_eq!(range_start(Shard::Part(3), after), "5-1");
        assert_eq!(range_start(Shard::Part(2), after), "(5-1");
        assert_eq!(range_start(Shard::Legacy, after), "(5-1");
        assert_eq!(range_start(Shard::Part(0), None), "-");
        assert!(merged_key(Shard::Part(2), "5-1") < merged_key(Shard::Part(3), "5-1"));
        assert!(merged_key(Shard::Part(9), "5-1") < merged_key(Shard::Legacy, "5-2"));
        assert!(merged_key(Shard::Legacy, "999-0") < merged_key(Shard::Legacy, "1000-0"));
    }

    #[test]
    fn quotas_share_fairly_and_pass_on_what_a_shard_cannot_use() {
        // Equal share, remainder from `start`.
        assert_eq!(plan_quotas(&[10, 10, 10], 7, 1), vec![2, 3, 2]);
        // An empty shard's share goes to the others.
        assert_eq!(plan_quotas(&[0, 100, 1], 10, 0), vec![0, 9, 1]);
        // Fewer than max in all: everything.
        assert_eq!(plan_quotas(&[1, 2, 0], 10, 2), vec![1, 2, 0]);
        // Fewer items than shards: the start rotates who gets one.
        assert_eq!(plan_quotas(&[5, 5, 5, 5], 2, 0), vec![1, 1, 0, 0]);
        assert_eq!(plan_quotas(&[5, 5, 5, 5], 2, 2), vec![0, 0, 1, 1]);
        assert_eq!(plan_quotas(&[], 5, 0), Vec::<usize>::new());
        assert_eq!(plan_quotas(&[3, 3], 0, 0), vec![0, 0]);
    }
}
