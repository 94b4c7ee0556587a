//! Namespaces' limits: appends per second and payload bytes per second,
//! enforced on every node (issue 14, part 3; docs/operations.md "Quotas").
//!
//! - **Where the limits live.** One system value of the metadata group
//!   (`ns/state`, a `NamespaceState`), changed by compare-and-set through
//!   `Admin.SetNamespace`, followed by every node from its own replica
//!   ([`crate::meta_poll`]), so a change is enforced within a second.
//! - **What is limited.** Appends (Append, and each AppendBatch item) and
//!   their payload bytes, per namespace, **per node**: each node lets a
//!   namespace through at its rate, as Kafka's broker quotas do, so a
//!   namespace whose writes spread over N nodes can reach N times its rate
//!   cluster-wide. No coordination on the write path, and a node's own
//!   limit protects that node.
//! - **How.** A token bucket per namespace and node (the `governor` crate),
//!   one second of burst. Over the limit: RESOURCE_EXHAUSTED, reason
//!   `QUOTA_EXCEEDED`, with a `RetryInfo` saying when the bucket has room;
//!   nothing is proposed. The SDK waits that long and retries.
//! - Reads are not limited; neither are namespaces without a record.

use crate::auth::book::{bad, full, Refusal};
use crate::Node;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use pigeonhole_proto::internal::v1::{NamespaceRecord, NamespaceState};
use prost::Message as _;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use tonic::Status;

/// The metadata group's key of every namespace's record.
pub const STATE_KEY: &[u8] = b"ns/state";
/// Namespace records, at most.
pub const NAMESPACES_MAX: usize = 1_024;
/// Namespace names: 1 to this many bytes (as `MailboxId.namespace`).
pub const NAME_BYTES_MAX: usize = 64;

/// The longest TTL a retention policy may set: 100 years, in ms.
pub const TTL_MS_MAX: u64 = 100 * 365 * 24 * 3_600 * 1_000;
/// The shortest non-zero TTL: one second (retention runs about once a
/// second, so a shorter one would not be kept).
pub const TTL_MS_MIN: u64 = 1_000;

/// A change to a namespace's record: the API's request, whose fields
/// left `None` keep their value (its `name` is not read here).
pub type NamespaceChange = pigeonhole_proto::v1::SetNamespaceRequest;

/// Sets `name`'s limits and retention policy in `state` (a field `None`
/// keeps its value; a new record starts unlimited, keeping everything).
/// `Ok(created)`, or the field and rule broken.
pub fn set(state: &mut NamespaceState, name: &str, c: &NamespaceChange) -> Result<bool, Refusal> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(bad("name", format!("{} bytes; 1 to {NAME_BYTES_MAX}", name.len())));
    }
    // A namespace's rules apply to mailboxes of that name, so the name
    // follows the mailboxes' rule ([a-z0-9._-]).
    if let Err(pigeonhole_engine::OpError::InvalidArgument { reason, .. }) =
        pigeonhole_engine::Limits::default().check_namespace(name)
    {
        return Err(bad("name", reason));
    }
    if let Some(b) = c.bytes_per_s.filter(|b| *b > u64::from(u32::MAX)) {
        return Err(bad(
            "bytes_per_s",
            format!("{b} is more than {} (0 = unlimited)", u32::MAX),
        ));
    }
    if let Some(t) = c.ttl_ms.filter(|t| *t != 0 && !(TTL_MS_MIN..=TTL_MS_MAX).contains(t)) {
        return Err(bad(
            "ttl_ms",
            format!("{t} is outside {TTL_MS_MIN} (1 s) to {TTL_MS_MAX} (100 years); 0 = no TTL"),
        ));
    }
    if let Some(w) = c
        .dedup_window_ms
        .filter(|w| *w > pigeonhole_engine::DEDUP_WINDOW_MS_MAX)
    {
        return Err(bad(
            "dedup_window_ms",
            format!(
                "{w} is more than {} (366 days); 0 = the default",
                pigeonhole_engine::DEDUP_WINDOW_MS_MAX
            ),
        ));
    }
    let created = !state.namespaces.iter().any(|n| n.name == name);
    if created {
        if state.namespaces.len() >= NAMESPACES_MAX {
            return Err(full(
                "name",
                format!("the cluster holds {NAMESPACES_MAX} namespace records, the limit"),
            ));
        }
        state.namespaces.push(NamespaceRecord {
            name: name.to_string(),
            ..NamespaceRecord::default()
        });
        state.namespaces.sort_by(|a, b| a.name.cmp(&b.name));
    }
    if let Some(r) = state.namespaces.iter_mut().find(|n| n.name == name) {
        let NamespaceChange {
            name: _,
            appends_per_s,
            bytes_per_s,
            ttl_ms,
            messages_per_mailbox_max,
            trim_acked,
            legal_hold,
            dedup_window_ms,
            storage_bytes_max,
        } = c.clone();
        r.appends_per_s = appends_per_s.unwrap_or(r.appends_per_s);
        r.bytes_per_s = bytes_per_s.unwrap_or(r.bytes_per_s);
        r.ttl_ms = ttl_ms.unwrap_or(r.ttl_ms);
        r.messages_per_mailbox_max = messages_per_mailbox_max.unwrap_or(r.messages_per_mailbox_max);
        r.trim_acked = trim_acked.unwrap_or(r.trim_acked);
        r.legal_hold = legal_hold.unwrap_or(r.legal_hold);
        r.dedup_window_ms = dedup_window_ms.unwrap_or(r.dedup_window_ms);
        r.storage_bytes_max = storage_bytes_max.unwrap_or(r.storage_bytes_max);
    }
    Ok(created)
}

/// One namespace's buckets on this node.
#[derive(Debug)]
struct Buckets {
    record: NamespaceRecord,
    appends: Option<DefaultDirectRateLimiter>,
    bytes: Option<DefaultDirectRateLimiter>,
}

fn bucket(per_s: u64) -> Option<DefaultDirectRateLimiter> {
    let n = NonZeroU32::new(u32::try_from(per_s).unwrap_or(u32::MAX))?;
    Some(RateLimiter::direct(Quota::per_second(n)))
}

/// This node's copy of the namespace records: the limiters of the
/// rate-limited ones, and every record (for retention and legal holds).
#[derive(Debug, Default)]
struct Followed {
    buckets: HashMap<String, Arc<Buckets>>,
    records: Arc<Vec<NamespaceRecord>>,
    /// The records' names, for a constant-time "has a record".
    names: std::collections::HashSet<String>,
}

/// Storage quotas as this node last counted them (D44).
#[derive(Debug, Default)]
struct Storage {
    /// Namespaces at or over their storage quota: name → (stored, max).
    full: HashMap<String, (u64, u64)>,
}

/// How often a node sums the namespaces' counted bytes.
const STORAGE_POLL: Duration = Duration::from_secs(1);

/// This node's limiters and namespace records. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Quotas {
    inner: Arc<RwLock<Followed>>,
    storage: Arc<RwLock<Storage>>,
}

/// Bytes stored per namespace: the data shards' last size counts
/// ([`crate::sizes`]), those of each shard's current map epoch, summed.
pub fn stored_bytes(node: &Node) -> HashMap<String, u64> {
    let values = node
        .meta_scan(
            crate::sizes::SIZE_PREFIX,
            usize::try_from(crate::config::SHARD_COUNT_MAX).unwrap_or(usize::MAX),
        )
        .unwrap_or_default();
    let records = crate::sizes::decode_records(&values);
    let map = node.routing();
    crate::sizes::namespace_bytes(&records, |s| map.shard(s).map(|d| d.epoch))
}

/// Namespaces of `records` with a storage quota that `stored` reaches.
fn over_storage(records: &[NamespaceRecord], stored: &HashMap<String, u64>) -> HashMap<String, (u64, u64)> {
    records
        .iter()
        .filter(|r| r.storage_bytes_max != 0)
        .filter_map(|r| {
            let s = stored.get(&r.name).copied().unwrap_or(0);
            (s >= r.storage_bytes_max).then(|| (r.name.clone(), (s, r.storage_bytes_max)))
        })
        .collect()
}

impl Quotas {
    /// Limiters that follow `node`'s metadata replica.
    pub fn follow(node: &Node) -> Quotas {
        let q = Quotas::default();
        crate::meta_poll::follow(node, STATE_KEY, Arc::downgrade(&q.inner), install);
        let (weak, quotas) = (node.downgrade(), q.clone());
        let storage = Arc::downgrade(&q.storage);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(STORAGE_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (Some(node), Some(storage)) = (weak.upgrade(), storage.upgrade()) else {
                    return;
                };
                let records = quotas.records();
                let full = if records.iter().any(|r| r.storage_bytes_max != 0) {
                    over_storage(&records, &stored_bytes(&node))
                } else {
                    HashMap::new()
                };
                storage.write().unwrap_or_else(PoisonError::into_inner).full = full;
            }
        });
        q
    }

    /// Takes one append of `payload_bytes` for `namespace`, or says when
    /// to retry: RESOURCE_EXHAUSTED with RetryInfo.
    pub fn take_append(&self, namespace: &str, payload_bytes: usize) -> Result<(), Status> {
        self.check_append(namespace, payload_bytes)?;
        if !crate::metrics::enabled() {
            return Ok(()); // no label strings, no lookup, per append
        }
        // Labelled by namespace only for namespaces with a record (a
        // bounded set): any caller may name any namespace.
        let known = self
            .inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .names
            .contains(namespace);
        crate::metrics::namespace_append(if known { namespace } else { "other" }, payload_bytes);
        Ok(())
    }

    fn check_append(&self, namespace: &str, payload_bytes: usize) -> Result<(), Status> {
        {
            let s = self.storage.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((stored, max)) = (!s.full.is_empty()).then(|| s.full.get(namespace)).flatten() {
                return Err(storage_exceeded(namespace, *stored, *max));
            }
        }
        let b = {
            let f = self.inner.read().unwrap_or_else(PoisonError::into_inner);
            if f.buckets.is_empty() {
                return Ok(());
            }
            match f.buckets.get(namespace) {
                Some(b) => b.clone(),
                None => return Ok(()),
            }
        };
        let clock = DefaultClock::default();
        if let Some(l) = &b.appends {
            if let Err(not_until) = l.check() {
                return Err(exceeded(
                    namespace,
                    "appends_per_s",
                    u64::from(b.record.appends_per_s),
                    not_until.wait_time_from(clock.now()),
                ));
            }
        }
        if let Some(l) = &b.bytes {
            // A payload larger than one second's bytes can never fit the
            // bucket: take the whole bucket for it instead.
            let cap = u32::try_from(b.record.bytes_per_s).unwrap_or(u32::MAX);
            let n = u32::try_from(payload_bytes).unwrap_or(u32::MAX).min(cap);
            if let Some(n) = NonZeroU32::new(n) {
                match l.check_n(n) {
                    Ok(Ok(())) => {}
                    Ok(Err(not_until)) => {
                        return Err(exceeded(
                            namespace,
                            "bytes_per_s",
                            b.record.bytes_per_s,
                            not_until.wait_time_from(clock.now()),
                        ))
                    }
                    Err(_) => {
                        return Err(exceeded(
                            namespace,
                            "bytes_per_s",
                            b.record.bytes_per_s,
                            Duration::from_secs(1),
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}

impl Quotas {
    /// Every namespace record, as this node last read them.
    pub fn records(&self) -> Arc<Vec<NamespaceRecord>> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .records
            .clone()
    }

    /// `namespace`'s record, if it has one.
    pub fn record(&self, namespace: &str) -> Option<NamespaceRecord> {
        let f = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        f.records.iter().find(|r| r.name == namespace).cloned()
    }
}

/// Installs a new `NamespaceState`: keeps the buckets of records whose
/// rates did not change (their state is the point), makes new ones for
/// the rest.
fn install(map: &RwLock<Followed>, version: u64, value: &[u8]) {
    let state = match NamespaceState::decode(value) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("ns/state version {version} does not decode: {e}");
            return;
        }
    };
    let old = map.read().unwrap_or_else(PoisonError::into_inner).buckets.clone();
    let mut next = HashMap::new();
    for r in &state.namespaces {
        if r.appends_per_s == 0 && r.bytes_per_s == 0 {
            continue;
        }
        let b = match old.get(&r.name) {
            Some(b) if (b.record.appends_per_s, b.record.bytes_per_s) == (r.appends_per_s, r.bytes_per_s) => b.clone(),
            _ => Arc::new(Buckets {
                appends: bucket(u64::from(r.appends_per_s)),
                bytes: bucket(r.bytes_per_s),
                record: r.clone(),
            }),
        };
        next.insert(r.name.clone(), b);
    }
    *map.write().unwrap_or_else(PoisonError::into_inner) = Followed {
        buckets: next,
        names: state.namespaces.iter().map(|r| r.name.clone()).collect(),
        records: Arc::new(state.namespaces),
    };
}

/// When a namespace at its storage quota may ask again: the size
/// checker's round, after which a trim or retention can show in the counts.
pub const STORAGE_RETRY_AFTER: Duration = Duration::from_secs(10);

/// A namespace at its storage quota. Its RetryInfo is the size checker's
/// round: no answer can change sooner (only a trim, retention or a higher
/// quota, seen at a later count, does), so a caller with the default
/// 10 s deadline fails at once and one with a longer deadline waits a round.
fn storage_exceeded(namespace: &str, stored: u64, max: u64) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let mut d = ErrorDetails::with_retry_info(Some(STORAGE_RETRY_AFTER));
    d.set_error_info(
        "STORAGE_QUOTA_EXCEEDED",
        "pigeonhole.v1",
        [
            ("namespace".to_string(), namespace.to_string()),
            ("limit".to_string(), "storage_bytes_max".to_string()),
            ("value".to_string(), max.to_string()),
            ("stored".to_string(), stored.to_string()),
        ],
    );
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!(
            "namespace {namespace:?} stores {stored} bytes, at or over its storage_bytes_max of {max}; \
             trim, set a retention policy or raise the quota"
        ),
        d,
    )
}

fn exceeded(namespace: &str, limit: &str, value: u64, retry_after: Duration) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    // At least a millisecond: a zero delay would have the client spin.
    let retry_after = retry_after.max(Duration::from_millis(1));
    let mut d = ErrorDetails::with_retry_info(Some(retry_after));
    d.set_error_info(
        "QUOTA_EXCEEDED",
        "pigeonhole.v1",
        [
            ("namespace".to_string(), namespace.to_string()),
            ("limit".to_string(), limit.to_string()),
            ("value".to_string(), value.to_string()),
        ],
    );
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!(
            "namespace {namespace:?} is over its {limit} limit ({value} on this node); retry in {} ms",
            retry_after.as_millis()
        ),
        d,
    )
}

impl Node {
    /// Every namespace record (after a read barrier on the metadata group).
    pub async fn namespaces(&self) -> Result<NamespaceState, crate::ClusterError> {
        Ok(self.read_meta_value::<NamespaceState>(STATE_KEY).await?.1)
    }

    /// Sets a namespace's limits ([`set`]); the record after it and whether
    /// it was created, or the field and rule broken.
    pub async fn set_namespace(
        &self,
        name: &str,
        change: &NamespaceChange,
    ) -> Result<Result<(NamespaceRecord, bool), Refusal>, crate::ClusterError> {
        let (version, mut state) = self.read_meta_value::<NamespaceState>(STATE_KEY).await?;
        let created = match set(&mut state, name, change) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        let record = state
            .namespaces
            .iter()
            .find(|n| n.name == name)
            .cloned()
            .unwrap_or_default();
        self.write_meta_value(STATE_KEY, version, state.encode_to_vec(), "the namespace records")
            .await?;
        Ok(Ok((record, created)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn rates(appends_per_s: Option<u32>, bytes_per_s: Option<u64>) -> NamespaceChange {
        NamespaceChange {
            appends_per_s,
            bytes_per_s,
            ..NamespaceChange::default()
        }
    }

    fn quotas(records: &[(&str, u32, u64)]) -> Quotas {
        let mut s = NamespaceState::default();
        for (n, a, b) in records {
            set(&mut s, n, &rates(Some(*a), Some(*b))).unwrap();
        }
        let q = Quotas::default();
        install(&q.inner, 1, &s.encode_to_vec());
        q
    }

    #[test]
    fn a_namespace_over_its_rate_is_refused_with_a_retry_delay_and_others_are_not() {
        let q = quotas(&[("noisy", 10, 0), ("open", 0, 0)]);
        let taken = (0..100).filter(|_| q.take_append("noisy", 10).is_ok()).count();
        assert_eq!(taken, 10, "one second of burst, no more");
        let s = q.take_append("noisy", 10).unwrap_err();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        let d = tonic_types::StatusExt::get_error_details(&s);
        let wait = d.retry_info().and_then(|r| r.retry_delay).unwrap();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        assert_eq!(d.error_info().unwrap().reason, "QUOTA_EXCEEDED");
        for _ in 0..1_000 {
            q.take_append("open", 1 << 20).unwrap();
            q.take_append("unknown", 1 << 20).unwrap();
        }
    }

    #[test]
    fn bytes_are_limited_and_a_payload_larger_than_the_bucket_still_fits_alone() {
        let q = quotas(&[("b", 0, 1_000)]);
        q.take_append("b", 600).unwrap();
        assert!(q.take_append("b", 600).is_err());
        let q = quotas(&[("b", 0, 1_000)]);
        q.take_append("b", 5_000).unwrap();
        assert!(q.take_append("b", 1).is_err());
    }

    #[test]
    fn an_unchanged_record_keeps_its_bucket_across_installs() {
        let q = quotas(&[("n", 5, 0)]);
        for _ in 0..5 {
            q.take_append("n", 1).unwrap();
        }
        let mut s = NamespaceState::default();
        set(&mut s, "n", &rates(Some(5), Some(0))).unwrap();
        set(&mut s, "other", &rates(Some(1), None)).unwrap();
        install(&q.inner, 2, &s.encode_to_vec());
        assert!(
            q.take_append("n", 1).is_err(),
            "the bucket was not refilled by a reinstall"
        );
    }

    #[test]
    fn a_namespace_at_its_storage_quota_is_refused_until_the_next_count() {
        let rec = |name: &str, max: u64| NamespaceRecord {
            name: name.into(),
            storage_bytes_max: max,
            ..NamespaceRecord::default()
        };
        let stored: HashMap<String, u64> = [("full".to_string(), 100), ("room".to_string(), 99)].into();
        let full = over_storage(&[rec("full", 100), rec("room", 100), rec("free", 0)], &stored);
        assert_eq!(full.keys().collect::<Vec<_>>(), ["full"]);
        let q = Quotas::default();
        q.storage.write().unwrap().full = full;
        let s = q.take_append("full", 1).unwrap_err();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        let d = tonic_types::StatusExt::get_error_details(&s);
        assert_eq!(
            d.retry_info().and_then(|r| r.retry_delay),
            Some(STORAGE_RETRY_AFTER),
            "no sooner than the next count"
        );
        let info = d.error_info().unwrap();
        assert_eq!(info.reason, "STORAGE_QUOTA_EXCEEDED");
        assert_eq!(info.metadata["stored"], "100");
        q.take_append("room", 1).unwrap();
    }

    #[test]
    fn records_are_checked() {
        let mut s = NamespaceState::default();
        assert_eq!(set(&mut s, "", &rates(None, None)).unwrap_err().field, "name");
        assert_eq!(
            set(&mut s, &"x".repeat(65), &rates(None, None)).unwrap_err().field,
            "name"
        );
        assert_eq!(set(&mut s, "Foo", &rates(None, None)).unwrap_err().field, "name");
        assert_eq!(
            set(&mut s, "a", &rates(None, Some(1 << 40))).unwrap_err().field,
            "bytes_per_s"
        );
        assert!(set(&mut s, "a", &rates(Some(3), None)).unwrap());
        assert!(!set(&mut s, "a", &rates(None, Some(7))).unwrap());
        assert_eq!((s.namespaces[0].appends_per_s, s.namespaces[0].bytes_per_s), (3, 7));
        let policy = |c: NamespaceChange| set(&mut s.clone(), "a", &c).map_err(|e| e.field);
        assert_eq!(
            policy(NamespaceChange {
                ttl_ms: Some(999),
                ..NamespaceChange::default()
            }),
            Err("ttl_ms")
        );
        assert_eq!(
            policy(NamespaceChange {
                ttl_ms: Some(TTL_MS_MAX + 1),
                ..NamespaceChange::default()
            }),
            Err("ttl_ms")
        );
        assert_eq!(
            policy(NamespaceChange {
                ttl_ms: Some(0),
                ..NamespaceChange::default()
            }),
            Ok(false)
        );
        assert_eq!(
            policy(NamespaceChange {
                dedup_window_ms: Some(pigeonhole_engine::DEDUP_WINDOW_MS_MAX + 1),
                ..NamespaceChange::default()
            }),
            Err("dedup_window_ms")
        );
        set(
            &mut s,
            "a",
            &NamespaceChange {
                ttl_ms: Some(60_000),
                trim_acked: Some(true),
                ..NamespaceChange::default()
            },
        )
        .unwrap();
        assert_eq!(
            (
                s.namespaces[0].ttl_ms,
                s.namespaces[0].trim_acked,
                s.namespaces[0].appends_per_s
            ),
            (60_000, true, 3),
            "unset fields keep their value"
        );
        for i in 1..NAMESPACES_MAX {
            set(&mut s, &format!("ns{i}"), &rates(Some(1), None)).unwrap();
        }
        let e = set(&mut s, "one-more", &rates(Some(1), None)).unwrap_err();
        assert!(e.full && e.field == "name", "{e:?}");
        assert!(
            !set(&mut s, "ns1", &rates(Some(2), None)).unwrap(),
            "a full cluster still changes its records"
        );
    }
}
