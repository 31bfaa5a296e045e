//! Cutting claimed events into request bodies (pure): events the webhook
//! does not subscribe to are skipped (acked unsent), the rest go out as a
//! JSON array bounded in count and bytes.

use std::collections::VecDeque;

use ring::digest;

use super::webhook_sign::hex;
use super::{Event, EventSeq, StoredEvent};

/// Limits of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Most events in one body.
    pub max_events: usize,
    /// Most bytes in one body; a single larger event still goes, alone.
    pub max_bytes: usize,
}

/// One request's worth of events.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `Petrel-Webhook-Id`: derived from the webhook and its event ids, so
    /// every retry of this batch (and a re-claim of the same events by
    /// another pod) carries the same id.
    pub id: String,
    /// The JSON array, exactly the bytes that are signed and sent.
    pub body: Vec<u8>,
    /// Log positions of the events in it, to ack on success.
    pub seqs: Vec<EventSeq>,
}

/// What to do with the front of the claimed events.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Events this webhook does not want: ack without sending.
    pub skipped: Vec<EventSeq>,
    /// Events that could not be encoded: ack and log (never silently).
    pub unencodable: Vec<EventSeq>,
    /// The next request, if any event is wanted.
    pub batch: Option<Batch>,
}

/// Takes events off the front of `pending` into a [`Plan`]: skipped ones,
/// then as many wanted ones as `bounds` allow. Events left in `pending` go
/// into a later plan.
pub fn plan(
    pending: &mut VecDeque<StoredEvent>,
    wants: impl Fn(&Event) -> bool,
    bounds: Bounds,
    webhook: &str,
) -> Plan {
    let mut plan = Plan::default();
    let mut body = vec![b'['];
    let mut seqs = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    while let Some(stored) = pending.pop_front() {
        if !wants(&stored.event) {
            plan.skipped.push(stored.seq);
            continue;
        }
        let json = match serde_json::to_vec(&stored.event) {
            Ok(json) => json,
            Err(_) => {
                plan.unencodable.push(stored.seq);
                continue;
            }
        };
        // The closing bracket, and a comma unless it is the first event.
        let extra = if seqs.is_empty() { 1 } else { 2 };
        let fits =
            seqs.len() < bounds.max_events && body.len() + json.len() + extra <= bounds.max_bytes;
        if !seqs.is_empty() && !fits {
            pending.push_front(stored);
            break;
        }
        if !seqs.is_empty() {
            body.push(b',');
        }
        body.extend_from_slice(&json);
        ids.push(stored.event.id);
        seqs.push(stored.seq);
        if seqs.len() >= bounds.max_events {
            break;
        }
    }
    if !seqs.is_empty() {
        body.push(b']');
        plan.batch = Some(Batch {
            id: batch_id(webhook, &ids),
            body,
            seqs,
        });
    }
    plan
}

/// `whb_` and 32 hex digits of SHA-256 over the webhook name and event ids.
fn batch_id(webhook: &str, ids: &[String]) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(webhook.as_bytes());
    for id in ids {
        ctx.update(b"\n");
        ctx.update(id.as_bytes());
    }
    format!("whb_{}", &hex(ctx.finish())[..32])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventType;

    fn stored(n: u64, kind: EventType) -> StoredEvent {
        let mut event = Event::new(kind, "relay-0", 1_700_000_000_000 + n);
        event.id = format!("event-{n}");
        event.recipient = Some(format!("user{n}@example.org"));
        StoredEvent {
            seq: format!("{n:020}"),
            stored_at: 1_700_000_000_000 + n,
            event,
        }
    }

    fn queue(kinds: &[EventType]) -> VecDeque<StoredEvent> {
        kinds
            .iter()
            .enumerate()
            .map(|(i, k)| stored(i as u64, *k))
            .collect()
    }

    const ROOMY: Bounds = Bounds {
        max_events: 100,
        max_bytes: 1 << 20,
    };

    #[test]
    fn the_body_is_a_json_array_of_the_wanted_events_and_the_rest_is_skipped() {
        use EventType::*;
        let mut pending = queue(&[Accepted, Delivered, Bounced, Accepted, Delivered]);
        let p = plan(&mut pending, |e| e.kind != Accepted, ROOMY, "app");
        assert_eq!(p.skipped, vec![format!("{:020}", 0), format!("{:020}", 3)]);
        let batch = p.batch.unwrap();
        let events: Vec<Event> = serde_json::from_slice(&batch.body).unwrap();
        let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["event-1", "event-2", "event-4"]);
        assert_eq!(batch.seqs.len(), 3);
        assert!(pending.is_empty());
    }

    #[test]
    fn batches_are_bounded_in_count() {
        let mut pending = queue(&[EventType::Delivered; 7]);
        let bounds = Bounds {
            max_events: 3,
            max_bytes: 1 << 20,
        };
        let sizes: Vec<usize> = std::iter::from_fn(|| {
            plan(&mut pending, |_| true, bounds, "app")
                .batch
                .map(|b| b.seqs.len())
        })
        .collect();
        assert_eq!(sizes, [3, 3, 1]);
    }

    #[test]
    fn batches_are_bounded_in_bytes_but_a_big_event_still_goes_alone() {
        let one = serde_json::to_vec(&stored(0, EventType::Delivered).event)
            .unwrap()
            .len();
        let mut pending = queue(&[EventType::Delivered; 5]);
        // Room for two events (plus brackets and a comma) but not three.
        let bounds = Bounds {
            max_events: 100,
            max_bytes: 2 * one + 3 + one / 2,
        };
        let mut sizes = Vec::new();
        while let Some(b) = plan(&mut pending, |_| true, bounds, "app").batch {
            assert!(
                b.body.len() <= bounds.max_bytes,
                "{} > {}",
                b.body.len(),
                bounds.max_bytes
            );
            sizes.push(b.seqs.len());
        }
        assert_eq!(sizes, [2, 2, 1]);
        let mut pending = queue(&[EventType::Delivered; 2]);
        let tiny = Bounds {
            max_events: 100,
            max_bytes: 10,
        };
        let b = plan(&mut pending, |_| true, tiny, "app").batch.unwrap();
        assert_eq!(b.seqs.len(), 1);
        assert_eq!(pending.len(), 1);
    }

    #[test]
    fn the_batch_id_is_stable_for_the_same_events_and_differs_otherwise() {
        let make = |hook: &str, n: usize| {
            let mut pending = queue(&vec![EventType::Delivered; n]);
            plan(&mut pending, |_| true, ROOMY, hook).batch.unwrap().id
        };
        assert_eq!(make("app", 3), make("app", 3));
        assert_ne!(make("app", 3), make("app", 2));
        assert_ne!(make("app", 3), make("crm", 3));
        assert!(make("app", 1).starts_with("whb_") && make("app", 1).len() == 36);
    }

    #[test]
    fn the_config_knows_exactly_the_relays_event_types() {
        let relay: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(relay, crate::config::EVENT_TYPES);
    }

    #[test]
    fn nothing_wanted_means_no_batch() {
        let mut pending = queue(&[EventType::Accepted; 4]);
        let p = plan(&mut pending, |_| false, ROOMY, "app");
        assert_eq!(p.skipped.len(), 4);
        assert!(p.batch.is_none());
    }
}
