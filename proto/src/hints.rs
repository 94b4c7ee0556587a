//! Leader hints on successful writes: part of the wire contract.
//!
//! Every node serves every write; one that reaches a follower is forwarded
//! to the shard's leader by Raft and answered OK by the follower. The
//! caller never learned that, so a client whose map named a follower (the
//! leader moved: a failover, the rebalancer, a transfer) kept paying one
//! more hop per write until an error refreshed its map (D53). A node that
//! answers a write for a shard it does not lead now adds the response
//! header [`LEADERS_HEADER`]: `shard=node` pairs, comma-separated, one per
//! shard of the request whose leader is known and is another node.
//!
//! Why a header on the OK answer and not a NOT_LEADER error: the write is
//! already done, so a hint can only make later writes cheaper, never send
//! a request around in a loop (a redirect tried first did, D53), and
//! clients that ignore it lose nothing.
//!
//! The format is ASCII decimal: `12=3` or `12=3,40=1`. [`parse`] takes at
//! most [`LEADER_HINTS_MAX`] pairs and skips malformed ones.

/// The response header naming the leaders of a write's shards that the
/// answering node does not lead.
pub const LEADERS_HEADER: &str = "pigeonhole-leaders";

/// Pairs a header carries, at most: a node writes one per shard of a
/// request (an AppendBatch has at most 1,024 items by default), leaves out
/// any past this, and a reader takes no more than this.
pub const LEADER_HINTS_MAX: usize = 1_024;

/// The header value for `(shard, leader)` pairs; None when there are none.
/// Pairs past [`LEADER_HINTS_MAX`] are left out.
pub fn format(pairs: impl IntoIterator<Item = (u64, u64)>) -> Option<String> {
    let mut out = String::new();
    for (shard, leader) in pairs.into_iter().take(LEADER_HINTS_MAX) {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&shard.to_string());
        out.push('=');
        out.push_str(&leader.to_string());
    }
    (!out.is_empty()).then_some(out)
}

/// The `(shard, leader)` pairs of a header value: at most
/// [`LEADER_HINTS_MAX`], malformed pairs and leader 0 (unknown) skipped.
pub fn parse(value: &str) -> Vec<(u64, u64)> {
    value
        .split(',')
        .take(LEADER_HINTS_MAX)
        .filter_map(|pair| {
            let (shard, leader) = pair.trim().split_once('=')?;
            let (shard, leader) = (shard.parse::<u64>().ok()?, leader.parse::<u64>().ok()?);
            (leader != 0).then_some((shard, leader))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_bad_ones_are_skipped() {
        assert_eq!(format([]), None);
        let v = format([(12, 3), (40, 1)]).unwrap_or_default();
        assert_eq!(v, "12=3,40=1");
        assert_eq!(parse(&v), [(12, 3), (40, 1)]);
        assert_eq!(parse("7=2, x=1,8=,=3,9=0,10=4=5,11=5"), [(7, 2), (11, 5)]);
        assert_eq!(parse(""), []);
    }

    #[test]
    fn both_sides_stop_at_the_limit() {
        let many = format((0..5_000).map(|s| (s, 1))).unwrap_or_default();
        assert_eq!(many.split(',').count(), LEADER_HINTS_MAX);
        let long = (0..5_000).map(|s| format!("{s}=1")).collect::<Vec<_>>().join(",");
        assert_eq!(parse(&long).len(), LEADER_HINTS_MAX);
    }
}
