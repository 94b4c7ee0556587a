//! Shard sizes, counted by each data shard's leader (TiKV's split checker):
//! now and then the leader counts its shard's rows ([`Engine::size_scan`]),
//! records the figure in the metadata group (`size/` + shard id, a
//! [`ShardSizeRecord`]), and, past the placement settings' split threshold,
//! splits the shard where its bytes halve. The placement loop balances by
//! the recorded bytes once the nodes hold enough (D39).
//!
//! Why a leader counts, and counts rarely: only a leader's apply state is
//! current, and a count is a scan of every row (RocksDB's approximate sizes
//! are not exposed by the binding we link). A shard is counted when its
//! leader has handed to apply at least 1/[`SizeCheck::grow_div`] of its
//! last size in log bytes since the last count (so a scan's cost per byte
//! written is bounded), when its range changed (a split), when it was never
//! counted, or when anything was written and the last count is older than
//! [`SizeCheck::age_max`] (trims shrink a shard without writing much).
//!
//! A round's counts are one blocking call, off the async workers, through
//! one iterator ([`Engine::size_scans`]): an iterator in total order over
//! the data CF's hash memtable starts by copying the whole memtable into
//! one sorted skiplist; an iterator per shard, when each node first counted
//! its 20-odd shards, was 8.6 % of the servers' CPU in a 20 s profile at
//! 256 appends in flight (D54). Even one iterator a round copied a full
//! memtable every round at high write rates (2.5 % of the servers' CPU):
//! a due round whose memtables hold many entries now waits, up to
//! [`SizeCheck::defer_max`], for a flush it sees coming, and runs at the
//! first look after it, when they hold few (D63; [`round_due`]).
//!
//! [`Engine::size_scan`]: pigeonhole_engine::Engine::size_scan
//! [`Engine::size_scans`]: pigeonhole_engine::Engine::size_scans

use crate::balance::Sizes;
use crate::moves::{decode_config, PLACEMENT_CONFIG_KEY};
use crate::node::Node;
use crate::placement::META_SHARD;
use crate::Role;
use pigeonhole_engine::command as cmd;
use pigeonhole_engine::HashRange;
use pigeonhole_proto::internal::v1::ShardSizeRecord;
use prost::Message as _;
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// System key prefix of size records in the metadata group.
pub const SIZE_PREFIX: &[u8] = b"size/";

/// The system key of `shard`'s size record.
pub fn size_key(shard: u64) -> Vec<u8> {
    crate::placement::shard_key(SIZE_PREFIX, shard)
}

/// Shard → record, from the metadata group's `size/` values; a value that
/// does not decode, or names another shard than its key, is skipped.
pub fn decode_records(values: &[pigeonhole_engine::SystemValue]) -> BTreeMap<u64, ShardSizeRecord> {
    values
        .iter()
        .filter_map(|v| {
            let r = ShardSizeRecord::decode(v.value.as_slice()).ok()?;
            (v.key == size_key(r.shard)).then_some((r.shard, r))
        })
        .collect()
}

/// Bytes per namespace, summed over the shards' records that are of the
/// shard's current map epoch (`epoch_of`): a split parent's count from
/// before the split, which also covers the new half, is left out until
/// the parent is counted again (D44).
pub fn namespace_bytes(
    records: &BTreeMap<u64, ShardSizeRecord>,
    epoch_of: impl Fn(u64) -> Option<u64>,
) -> std::collections::HashMap<String, u64> {
    let mut out = std::collections::HashMap::new();
    for r in records.values().filter(|r| epoch_of(r.shard) == Some(r.epoch)) {
        for n in &r.namespaces {
            *out.entry(n.name.clone()).or_insert(0u64) += n.bytes;
        }
    }
    out
}

/// A shard holding a namespace near its storage quota is counted again
/// once this much log was handed to its apply since its last count: not
/// for retention's own small entries, which do not grow a shard.
const URGENT_GROWTH_BYTES_MIN: u64 = 64 << 10;

/// The namespace records as this node's metadata replica has them.
fn namespace_state(node: &Node) -> pigeonhole_proto::internal::v1::NamespaceState {
    node.meta_scan(crate::quota::STATE_KEY, 1)
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.key == crate::quota::STATE_KEY)
        .and_then(|v| pigeonhole_proto::internal::v1::NamespaceState::decode(v.value.as_slice()).ok())
        .unwrap_or_default()
}

/// Namespaces with a storage quota whose counted bytes are at least half
/// of it: their shards are counted every round they grew in.
fn watched_namespaces(
    node: &Node,
    state: &pigeonhole_proto::internal::v1::NamespaceState,
    records: &BTreeMap<u64, ShardSizeRecord>,
) -> std::collections::HashSet<String> {
    if state.namespaces.iter().all(|r| r.storage_bytes_max == 0) {
        return std::collections::HashSet::new();
    }
    let map = node.routing();
    let stored = namespace_bytes(records, |s| map.shard(s).map(|d| d.epoch));
    state
        .namespaces
        .iter()
        .filter(|r| r.storage_bytes_max != 0 && stored.get(&r.name).copied().unwrap_or(0) >= r.storage_bytes_max / 2)
        .map(|r| r.name.clone())
        .collect()
}

/// Shard → bytes, from the metadata group's `size/` values.
pub fn decode_sizes(values: &[pigeonhole_engine::SystemValue]) -> Sizes {
    decode_records(values).into_iter().map(|(s, r)| (s, r.bytes)).collect()
}

/// The size checker's settings.
#[derive(Debug, Clone, Copy)]
pub struct SizeCheck {
    /// How often the checker looks at the shards this node leads.
    pub interval: Duration,
    /// A count stops after this many keys (its figures are then lower
    /// bounds): about 4 GiB of 256-byte messages, a few seconds of one core.
    pub keys_max: u64,
    /// Counted again once the log bytes handed to apply since the last
    /// count reach 1/`grow_div` of the last size…
    pub grow_div: u64,
    /// …and at least this many bytes.
    pub grow_bytes_min: u64,
    /// Counted again after this long if an eighth of the growth step was
    /// written since (trims shrink a shard while writing little).
    pub age_max: Duration,
    /// A round that is due runs at once while the data CF's memtables
    /// hold at most this many entries; with more it may wait for a flush
    /// it sees coming (D63, [`round_due`]): the round's iterator copies
    /// them all first, and right after a flush there are few to copy…
    pub memtable_entries_max: u64,
    /// …but it waits at most this long past `interval`, so a node whose
    /// memtables stay full still counts (paying the copy).
    pub defer_max: Duration,
}

impl Default for SizeCheck {
    fn default() -> Self {
        SizeCheck {
            interval: Duration::from_secs(10),
            keys_max: 16 << 20,
            grow_div: 8,
            grow_bytes_min: 4 << 20,
            age_max: Duration::from_secs(10 * 60),
            // About a tenth of a full 64 MiB memtable of 256-byte appends
            // (two entries each, about 300,000 entries in all).
            memtable_entries_max: 32_768,
            defer_max: Duration::from_secs(30),
        }
    }
}

/// How often the checker looks whether a round may run: the memtables
/// hold few entries for a second or two after a flush at high write rates.
const POLL_MAX: Duration = Duration::from_secs(1);

/// What the checker saw of the data CF's memtables: how they stand now,
/// whether a flush ended since the look before (their entries went down),
/// and how fast the active memtable has been filling (bytes per second,
/// over its life so far as the checker saw it; 0 when just switched).
#[derive(Debug, Clone, Copy)]
pub struct MemtableLook {
    pub now: pigeonhole_engine::Memtables,
    pub flushed: bool,
    pub fill_bytes_per_s: u64,
}

/// The checker's memory of its looks at the memtables, turning each new
/// one into a [`MemtableLook`]. The fill rate is taken from the first look
/// at the active memtable, not the last second: the active memtable's
/// size grows by whole arena blocks (about 1 MiB), so a one-second
/// difference is 0 or a block at low rates.
#[derive(Debug, Default)]
pub struct MemtableWatch {
    /// Entries at the last look.
    entries: u64,
    /// When the active memtable was first seen, and its bytes then.
    first: Option<(Instant, u64)>,
    /// When its size last grew, and its bytes then.
    grew: Option<(Instant, u64)>,
}

/// What the active memtable's size grows by at a time: RocksDB's arena
/// block, min(1 MiB, write buffer / 8) with `arena_block_size` unset, as
/// here (the looks at 256 in flight saw steps of 1 MiB and 8 bytes). Used
/// only to tell a memtable that stopped filling from one between blocks.
const ARENA_BLOCK_BYTES: u64 = 1 << 20;

impl MemtableWatch {
    pub fn look(&mut self, m: pigeonhole_engine::Memtables, now: Instant) -> MemtableLook {
        let flushed = self.first.is_some() && m.entries < self.entries;
        self.entries = m.entries;
        let (since, bytes) = match self.first {
            // The same memtable, still growing. A new one shows as fewer
            // bytes, or (if it outgrew the old one's first look within a
            // second) as the flush of the old one ending a second or two
            // later: either starts the rate again.
            Some((at, bytes)) if m.active_bytes >= bytes && !flushed => (at, bytes),
            _ => {
                self.first = Some((now, m.active_bytes));
                (now, m.active_bytes)
            }
        };
        let (grew_at, grew_bytes) = match self.grew {
            Some((at, b)) if m.active_bytes <= b && at >= since => (at, b),
            _ => {
                self.grew = Some((now, m.active_bytes));
                (now, m.active_bytes)
            }
        };
        // Bytes per second between two points of this memtable's life.
        let rate = |from: Instant, to: Instant, grown: u64| {
            let ms = to.saturating_duration_since(from).as_millis();
            u128::from(grown).saturating_mul(1_000).checked_div(ms).unwrap_or(0)
        };
        // Writes that stopped: no new block for twice the time one took at
        // the rate up to the last growth (and a second more, for the
        // looks' spacing). Else the rate over the memtable's life would
        // decay slowly and hold rounds for a flush that is not coming.
        let block_ms = u128::from(ARENA_BLOCK_BYTES).saturating_mul(1_000).checked_div(rate(
            since,
            grew_at,
            grew_bytes.saturating_sub(bytes),
        ));
        let quiet_ms = now.saturating_duration_since(grew_at).as_millis();
        let stalled = block_ms.is_some_and(|b| quiet_ms > b.saturating_mul(2).saturating_add(1_000));
        let fill_bytes_per_s = if stalled {
            0
        } else {
            u64::try_from(rate(since, now, m.active_bytes.saturating_sub(bytes))).unwrap_or(u64::MAX)
        };
        MemtableLook {
            now: m,
            flushed,
            fill_bytes_per_s,
        }
    }
}

/// Whether a round runs now, `since_last` after the last one ended.
/// Never before `interval`. Then at once, unless the round's copy of the
/// memtables (D63) can be made smaller by waiting for a flush that is
/// coming: they hold more than `memtable_entries_max` entries, no flush
/// ended since the look before (right after one they are as small as a
/// look every second finds them), and either an immutable memtable is
/// waiting for its flush or, at the rate the active one fills, it is
/// switched out before `defer_max` past the interval. A memtable filling
/// slowly is not waited for: at that write rate the copy's CPU is idle
/// anyway, and a count 30 s late would not be. Nor is an unknown state,
/// nor past `defer_max`; and `near_quota` (asked only for a round that
/// would wait, as it reads the metadata replica) says a namespace is near
/// its storage quota, whose counts are not put off (D44).
pub fn round_due(
    since_last: Duration,
    look: Option<MemtableLook>,
    near_quota: impl FnOnce() -> bool,
    cfg: &SizeCheck,
) -> bool {
    if since_last < cfg.interval {
        return false;
    }
    let give_up = cfg.interval.saturating_add(cfg.defer_max);
    let Some(look) = look else { return true };
    if since_last >= give_up || look.flushed || look.now.entries <= cfg.memtable_entries_max {
        return true;
    }
    let room_bytes = look.now.active_bytes_max.saturating_sub(look.now.active_bytes);
    let left_ms = give_up.saturating_sub(since_last).as_millis();
    let coming_bytes = u128::from(look.fill_bytes_per_s).saturating_mul(left_ms) / 1_000;
    // `>`: a memtable at its size with nothing written (room 0, rate 0)
    // is switched out only by the next write, which may not come.
    let flush_coming = look.now.immutable_entries > 0 || coming_bytes > u128::from(room_bytes);
    !flush_coming || near_quota()
}

/// Whether a namespace with a storage quota holds half of it or more by
/// the counts recorded now (what a round watches, D44), read from this
/// node's metadata replica; false without one.
fn near_quota_now(node: &Node) -> bool {
    let state = namespace_state(node);
    if state.namespaces.iter().all(|r| r.storage_bytes_max == 0) {
        return false;
    }
    let Some(records) = recorded_sizes(node) else {
        return false;
    };
    !watched_namespaces(node, &state, &records).is_empty()
}

/// The shards' size records in this node's metadata replica (None
/// without one).
fn recorded_sizes(node: &Node) -> Option<BTreeMap<u64, ShardSizeRecord>> {
    let limit = usize::try_from(crate::config::SHARD_COUNT_MAX).unwrap_or(usize::MAX);
    node.meta_scan(SIZE_PREFIX, limit).ok().map(|r| decode_records(&r))
}

/// The last count of a shard this node leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub bytes: u64,
    /// The replica's handed-bytes counter then.
    pub handed_bytes: u64,
    /// The shard's map epoch then (a split changes it).
    pub epoch: u64,
    pub at: Instant,
}

/// Whether a shard is due for a count, given its last count (None: never
/// counted here), its replica's handed-bytes counter and its epoch now.
pub fn due(last: Option<&Counted>, handed_bytes: u64, epoch: u64, now: Instant, cfg: &SizeCheck) -> bool {
    let Some(l) = last else { return true };
    if l.epoch != epoch || handed_bytes < l.handed_bytes {
        return true; // split, or the replica started again (counter reset)
    }
    let grown = handed_bytes - l.handed_bytes;
    let step = (l.bytes / cfg.grow_div.max(1)).max(cfg.grow_bytes_min);
    // An old count is redone after an eighth of the step (trims and expiry
    // shrink a shard while writing little), never for a trickle: a node of
    // many large, lightly written shards must not rescan them all.
    grown >= step || (grown >= step / 8 && now.saturating_duration_since(l.at) >= cfg.age_max)
}

/// Where to split a shard after a count, if it is due one: its bytes
/// counted reach the split size (not "never"), and a point halves them.
/// By the bytes counted only: a count cut short is a lower bound, and cut
/// short by a shared space's siblings it says nothing of this shard's own
/// size (splitting on it split every shard of a large shared space again
/// and again: found by a review).
pub fn split_point(scan: &pigeonhole_engine::SizeScan, config: &crate::moves::Config) -> Option<u64> {
    let past = config.split_size_bytes != crate::moves::SPLIT_NEVER && scan.size.bytes >= config.split_size_bytes;
    past.then_some(scan.split_at).flatten()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Starts `node`'s size checker on the current tokio runtime. It holds
/// the node weakly and ends when the node is dropped or stopped.
pub fn spawn(node: &Node, cfg: SizeCheck) -> tokio::task::JoinHandle<()> {
    let weak = node.downgrade();
    tokio::spawn(async move {
        let mut counted: BTreeMap<u64, Counted> = BTreeMap::new();
        let mut due_splits: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
        let poll = cfg.interval.min(POLL_MAX);
        let mut last = Instant::now();
        let mut watch = MemtableWatch::default();
        loop {
            tokio::time::sleep(poll).await;
            let Some(node) = weak.upgrade() else { return };
            let look = node
                .engine()
                .data_memtables()
                .ok()
                .map(|m| watch.look(m, Instant::now()));
            if !round_due(last.elapsed(), look, || near_quota_now(&node), &cfg) {
                continue;
            }
            let waited_ms = last.elapsed().saturating_sub(cfg.interval).as_millis();
            tracing::debug!(waited_ms, memtables = ?look, "size round");
            if round(&node, &cfg, &mut counted, &mut due_splits).await.is_err() {
                return; // the node stopped
            }
            // The interval is counted from a round's end: a long round is
            // not followed at once by the next.
            last = Instant::now();
        }
    })
}

/// One round: count the due shards this node leads, record each count,
/// and split the shards past the threshold (`due_splits`: shard → (hash,
/// epoch, bytes counted), kept until made). Err only when the node
/// stopped.
async fn round(
    node: &Node,
    cfg: &SizeCheck,
    counted: &mut BTreeMap<u64, Counted>,
    due_splits: &mut BTreeMap<u64, (u64, u64, u64)>,
) -> Result<(), ()> {
    let statuses = node.status().await.map_err(|_| ())?;
    let map = node.routing();
    // Without a metadata replica there is nowhere to record, and no
    // settings to read: wait for one.
    let Some(records) = recorded_sizes(node) else {
        return Ok(());
    };
    let config_value = node
        .meta_scan(PLACEMENT_CONFIG_KEY, 1)
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.key == PLACEMENT_CONFIG_KEY);
    let config = decode_config(config_value.as_ref());
    // A shard with a replica move in flight is not split: the new shard
    // would inherit the move's learner, which no move owns.
    let moving: std::collections::BTreeSet<u64> = node
        .meta_scan(
            crate::moves::MOVE_PREFIX,
            usize::try_from(crate::config::SHARD_COUNT_MAX).unwrap_or(usize::MAX),
        )
        .map(|v| crate::moves::decode_targets(&v))
        .unwrap_or_default()
        .values()
        .filter(|t| t.in_flight())
        .map(|t| t.shard)
        .collect();
    let leading: Vec<_> = statuses
        .iter()
        .filter(|s| s.role == Role::Leader && s.shard != META_SHARD)
        .collect();
    counted.retain(|shard, _| leading.iter().any(|s| s.shard == *shard));
    let ns_state = namespace_state(node);
    let watched = watched_namespaces(node, &ns_state, &records);
    let count: std::collections::BTreeSet<String> = ns_state.namespaces.iter().map(|r| r.name.clone()).collect();
    let mut to_count = Vec::new();
    for st in leading {
        let Some(desc) = map.shard(st.shard) else { continue };
        let now = Instant::now();
        // A leader new here starts from the recorded count if it is recent
        // and of this range, instead of counting every shard it took over.
        let age_max_ms = u64::try_from(cfg.age_max.as_millis()).unwrap_or(u64::MAX);
        if let std::collections::btree_map::Entry::Vacant(e) = counted.entry(st.shard) {
            let recent = records
                .get(&st.shard)
                .filter(|r| r.epoch == desc.epoch && unix_ms().saturating_sub(r.counted_unix_ms) < age_max_ms);
            if let Some(r) = recent {
                e.insert(Counted {
                    bytes: r.bytes,
                    handed_bytes: st.handed_bytes,
                    epoch: r.epoch,
                    at: now,
                });
            }
        }
        // A shard holding a namespace near its storage quota is counted
        // every round it grew by 64 KiB, so the quota is kept to about a
        // round's writes (D44).
        let urgent = !watched.is_empty()
            && records
                .get(&st.shard)
                .is_some_and(|r| r.namespaces.iter().any(|n| watched.contains(&n.name)))
            && counted
                .get(&st.shard)
                .is_some_and(|c| st.handed_bytes >= c.handed_bytes.saturating_add(URGENT_GROWTH_BYTES_MIN));
        if !urgent && !due(counted.get(&st.shard), st.handed_bytes, desc.epoch, now, cfg) {
            continue;
        }
        to_count.push((st, desc, now));
    }
    // The round's counts share one scan of the data CF: each iterator over
    // the hash memtable first copies all of it (`Engine::size_scans`, D54).
    let shards: Vec<(u64, HashRange)> = to_count
        .iter()
        .map(|(st, desc, _)| {
            let range = HashRange {
                start: desc.range_start,
                end: desc.range_end,
            };
            (st.shard, range)
        })
        .collect();
    // No iterator at all when nothing is due (making one copies too).
    let scans = if shards.is_empty() {
        Vec::new()
    } else {
        let engine = node.engine().clone();
        let keys_max = cfg.keys_max;
        // An error (the node stopping) counts nothing; the next round sees.
        match tokio::task::spawn_blocking(move || engine.size_scans(&shards, keys_max, &count)).await {
            Ok(Ok(scans)) => scans,
            _ => Vec::new(),
        }
    };
    for ((st, desc, now), scan) in to_count.into_iter().zip(scans) {
        let Ok(scan) = scan else {
            continue; // the replica went meanwhile; the next round sees
        };
        let shard = st.shard;
        counted.insert(
            shard,
            Counted {
                bytes: scan.size.bytes,
                handed_bytes: st.handed_bytes,
                epoch: desc.epoch,
                at: now,
            },
        );
        let record = ShardSizeRecord {
            shard,
            keys: scan.size.keys,
            bytes: scan.size.bytes,
            complete: scan.size.complete,
            applied_index: st.applied,
            counted_unix_ms: unix_ms(),
            epoch: desc.epoch,
            namespaces: scan
                .namespaces
                .iter()
                .map(|(name, bytes)| pigeonhole_proto::internal::v1::NamespaceBytes {
                    name: name.clone(),
                    bytes: *bytes,
                })
                .collect(),
            namespaces_complete: scan.namespaces_complete,
        };
        // The version is the leader's term: a deposed leader's late count
        // loses to its successor's. A lost write is made at the next count.
        let put = cmd::Op {
            op: Some(cmd::op::Op::PutSystem(cmd::PutSystemOp {
                key: size_key(shard),
                value: record.encode_to_vec(),
                version: st.term,
                if_version: None,
            })),
        };
        let _ = node.propose(META_SHARD, vec![put]).await;
        if let Some(at) = split_point(&scan, &config) {
            due_splits.insert(shard, (at, desc.epoch, scan.size.bytes));
        }
    }
    due_splits_round(node, &statuses, &map, &config, &moving, due_splits).await?;
    Ok(())
}

/// The splits found due (this round or before) made, where they can be.
async fn due_splits_round(
    node: &Node,
    statuses: &[crate::driver::ShardStatus],
    map: &crate::placement::ShardMap,
    config: &crate::moves::Config,
    moving: &std::collections::BTreeSet<u64>,
    due_splits: &mut BTreeMap<u64, (u64, u64, u64)>,
) -> Result<(), ()> {
    // Splits due, tried every round until made (a paused loop, a move in
    // flight, no leader, the shard-count limit), without counting again;
    // dropped once the shard is not led here or its range changed.
    due_splits.retain(|shard, (_, epoch, _)| {
        statuses.iter().any(|s| s.shard == *shard && s.role == Role::Leader)
            && map.shard(*shard).is_some_and(|d| d.epoch == *epoch)
    });
    if config.paused || config.split_size_bytes == crate::moves::SPLIT_NEVER {
        return Ok(());
    }
    let due: Vec<(u64, u64, u64)> = due_splits
        .iter()
        .filter(|(shard, _)| !moving.contains(shard))
        .map(|(shard, (at, _, bytes))| (*shard, *at, *bytes))
        .collect();
    for (shard, at, bytes) in due {
        match node.split_shard(shard, Some(at)).await {
            Ok(done) => {
                due_splits.remove(&shard);
                tracing::info!(
                    "shard {shard} counted {bytes} bytes (split threshold {}): split at {at:#018x}, \
                     shard {} takes the upper part",
                    config.split_size_bytes,
                    done.new_shard.id
                );
            }
            Err(e) if e.is_retryable() => {}
            Err(e) => {
                due_splits.remove(&shard);
                tracing::warn!("shard {shard} is due a split at {at:#018x}, not made: {e}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "sizes_tests.rs"]
mod tests;
