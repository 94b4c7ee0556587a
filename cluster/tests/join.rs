//! Nodes that join a running cluster, in process: the metadata group gives
//! each an id (the same one on a retry), adds it as a learner and promotes
//! it once caught up; a data replica moved to it serves; it restarts from
//! its own state without bootstrapping anything.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use pigeonhole_cluster::placement::META_SHARD;
use pigeonhole_cluster::{ClusterError, MembershipChange};

async fn meta_conf(c: &TestCluster) -> (Vec<u64>, Vec<u64>) {
    let leader = c.leader(META_SHARD).await;
    let Some(s) = c.status(leader, META_SHARD).await else {
        return (Vec::new(), Vec::new());
    };
    let mut v = s.voters.clone();
    v.sort_unstable();
    let mut l = s.learners.clone();
    l.sort_unstable();
    (v, l)
}

#[tokio::test]
async fn joined_nodes_get_ids_a_metadata_vote_and_data_replicas() {
    let mut tuning = fast_tuning();
    tuning.rebalance_every_ticks = 5;
    let mut c = TestCluster::new(3, 2, 3, tuning);
    c.leader(1).await;

    let four = c.join(2, "10.0.0.4:7070", 44).await;
    assert_eq!(four, 4, "the next id after the initial cluster's");
    // A retry with the same token (its answer was lost) gets the same id;
    // another token for the same address is refused, naming the holder.
    let (again, nodes) = pigeonhole_cluster::join::admit(c.node(3), "10.0.0.4:7070", 44)
        .await
        .unwrap();
    assert_eq!(again, 4);
    assert_eq!(nodes.get(&4).map(String::as_str), Some("10.0.0.4:7070"));
    let refused = pigeonhole_cluster::join::admit(c.node(1), "10.0.0.4:7070", 45)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ClusterError::Refused { reason } if reason.contains("node 4's address")),
        "{refused}"
    );
    let five = c.join(1, "10.0.0.5:7070", 55).await;
    assert_eq!(five, 5);

    // The metadata leader adds both as learners, then promotes them once
    // they hold the committed log: five voters.
    c.eventually("nodes 4 and 5 vote in the metadata group", 20, || async {
        meta_conf(&c).await == (vec![1, 2, 3, 4, 5], vec![])
    })
    .await;
    // The joined nodes read the map (with every address) from their own
    // metadata replica.
    for n in [4, 5] {
        c.eventually("a joined node's map lists both joined nodes", 10, || async {
            c.node(n)
                .shard_map()
                .is_ok_and(|m| m.nodes.contains_key(&4) && m.nodes.get(&5).map(String::as_str) == Some("10.0.0.5:7070"))
        })
        .await;
    }

    // Move shard 1's replica from node 1 to node 4: learner, catch-up,
    // promotion with the old replica's removal.
    let user = "joined-user";
    let shard = shard_of(c.node(1), user);
    append_retrying(c.node(2), shard, user, "k1", b"before", 10).await;
    let leader = c.leader(shard).await;
    c.node(leader)
        .change_membership(shard, &[MembershipChange::AddLearner(4)])
        .await
        .unwrap();
    c.eventually("node 4's learner catches up", 10, || async {
        let created = c.node(4).engine().shard_ids().unwrap().contains(&shard);
        created && read_all(c.node(4), shard, user).len() == 1
    })
    .await;
    let leader = c.leader(shard).await;
    let target = if leader == 1 { 2 } else { leader };
    if leader == 1 {
        c.node(1).transfer_leader(shard, 2).await.unwrap();
        c.eventually("leadership leaves node 1", 10, || async { c.leader(shard).await == 2 })
            .await;
    }
    c.node(target)
        .change_membership(shard, &[MembershipChange::AddVoter(4), MembershipChange::Remove(1)])
        .await
        .unwrap();
    append_retrying(c.node(4), shard, user, "k2", b"after", 10).await;
    c.eventually("node 4 applied both appends", 10, || async {
        read_all(c.node(4), shard, user).len() == 2
    })
    .await;

    // A restart starts from its own state (no bootstrap, same replicas).
    c.restart(4);
    append_retrying(c.node(4), shard, user, "k3", b"restarted", 10).await;
    let got = read_all(c.node(4), shard, user);
    assert_eq!(
        got.iter().map(|(s, p)| (*s, p.as_slice())).collect::<Vec<_>>(),
        vec![(1, &b"before"[..]), (2, &b"after"[..]), (3, &b"restarted"[..])]
    );
    let status = c.node(4).status().await.unwrap();
    let mut held: Vec<u64> = status.iter().map(|s| s.shard).collect();
    held.sort_unstable();
    assert_eq!(
        held,
        vec![META_SHARD, shard],
        "a joined node holds only what was moved to it"
    );
}
