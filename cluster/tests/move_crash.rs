//! A crash at each step of a replica move (issue 13): the placement loop
//! moves a replica onto a joined node, and the nodes the move depends on
//! stop and start again at the step under test. Filters of the in-process
//! transport hold a move at a step long enough to crash there. Afterwards
//! the move is finished or cleaned up, no node keeps a replica the shard
//! map does not give it, and every acknowledged append is on every replica.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::placing::*;
use common::*;
use pigeonhole_cluster::placement::META_SHARD;
use pigeonhole_cluster::transport::local::CutShard;
use pigeonhole_cluster::RaftTuning;

const SHARDS: u64 = 4;

fn tuning() -> RaftTuning {
    RaftTuning {
        // Long enough that a restarted node's replica is seen before it goes.
        stale_replica_after_ms: 1_000,
        ..placing()
    }
}

/// 3 nodes with data in every shard, moves one at a time; node 4 joins,
/// cut off from every data shard, so the loop starts a move onto it whose
/// learner cannot catch up. Returns the cluster, the acked appends and the move
/// (shard, from, to).
async fn a_move_held_at_its_learner() -> (TestCluster, Vec<Acked>, (u64, u64, u64), u64) {
    let mut c = TestCluster::new(3, SHARDS, 3, tuning());
    c.leader(META_SHARD).await;
    // Running, one move at a time.
    c.node(1)
        .set_placement(pigeonhole_cluster::node::PlacementChange {
            paused: Some(false),
            moves_max: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut acked = Vec::new();
    for u in 0..24 {
        let user = format!("user-{u}");
        let shard = shard_of(c.node(1), &user);
        let key = format!("k{u}");
        let (seq, _) = append_retrying(c.node(1), shard, &user, &key, key.as_bytes(), 10).await;
        acked.push((user, shard, seq, key));
    }
    // Node 4 hears the metadata group but no data shard: a learner added
    // there gets nothing, so the move waits at that step.
    let held = c.router.add_filter(CutShard { node: 4, shard: None });
    let d = c.join(1, "127.0.0.1:17004", 31).await;
    assert_eq!(d, 4);
    let (shard, from) = until("a move onto node 4 with its learner added", 30, || async {
        let p = c.node(1).placement().await.ok()?;
        let t = p.decision.in_flight.first()?.clone();
        let s = shards(&c).await;
        s.get(&t.shard)
            .is_some_and(|(_, _, l)| l.contains(&d))
            .then_some((t.shard, t.from))
    })
    .await;
    (c, acked, (shard, from, d), held)
}

/// Every node holds exactly the replicas the shards' leaders list, and
/// every acknowledged append is on each of them.
async fn settled_and_whole(c: &TestCluster, acked: &[Acked], nodes: &[u64]) {
    c.eventually("balance over four nodes", 90, || balanced(c, SHARDS, nodes))
        .await;
    c.eventually("no node keeps a replica it was moved off", 30, || async {
        let s = shards(c).await;
        let mut all = true;
        for n in nodes {
            let held: Vec<u64> = c
                .node(*n)
                .status()
                .await
                .unwrap()
                .iter()
                .map(|r| r.shard)
                .filter(|s| *s != META_SHARD)
                .collect();
            let want: Vec<u64> = s
                .iter()
                .filter(|(_, (_, v, l))| v.contains(n) || l.contains(n))
                .map(|(id, _)| *id)
                .collect();
            all &= held == want;
        }
        all
    })
    .await;
    let s = all_shards(c, SHARDS).await;
    acked_on_every_voter(c, acked, &s).await;
}

/// After the learner is added: the shard's leader and the learner's node
/// both crash and restart. The move goes on from the configuration (the
/// new leader finds the learner and the target) and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_learner_is_added_and_the_move_finishes() {
    let (mut c, acked, (shard, _from, to), held) = a_move_held_at_its_learner().await;
    let leader = c.leader(shard).await;
    c.restart(leader);
    c.restart(to);
    c.router.remove_filter(held);
    settled_and_whole(&c, &acked, &[1, 2, 3, to]).await;
}

/// Before the source learns of its removal: the source crashes while the
/// move waits at its learner, and the move promotes the learner and removes
/// the source while it is down (joint consensus needs only the others).
/// Back, nothing in the shard tells it: it finds itself out of the shard's
/// record and deletes its replica (stale-replica GC), so the move is
/// cleaned up without an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_crashes_before_its_removal_reaches_it_deletes_its_replica() {
    let (mut c, acked, (shard, from, to), held) = a_move_held_at_its_learner().await;
    c.stop(from);
    c.router.remove_filter(held);
    c.eventually("the move promotes the learner and removes the source", 30, || async {
        shards(&c).await.get(&shard).is_some_and(|(_, v, l)| {
            let mut v = v.clone();
            v.sort_unstable();
            let mut want: Vec<u64> = [1, 2, 3, to].into_iter().filter(|n| *n != from).collect();
            want.sort_unstable();
            v == want && l.is_empty()
        })
    })
    .await;
    c.start(from);
    let st = c
        .status(from, shard)
        .await
        .expect("the source's replica loads at start");
    assert!(st.voters.contains(&from), "it never heard of its removal: {st:?}");
    c.eventually("the source deletes its stale replica", 30, || async {
        c.status(from, shard).await.is_none() && c.node(from).engine().shard_meta(shard).unwrap().is_none()
    })
    .await;
    assert_eq!(
        c.node(from)
            .counters()
            .stale_replicas_deleted
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    settled_and_whole(&c, &acked, &[1, 2, 3, to]).await;
}
