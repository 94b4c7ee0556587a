//! Nodes that join a running cluster, in process: the metadata group gives
//! each an id (the same one on a retry), adds it as a learner and promotes
//! it once caught up; a data replica moved to it serves; it restarts from
//! its own state without bootstrapping anything.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::*;
use pigeonhole_cluster::placement::META_SHARD;
use pigeonhole_cluster::{ClusterError, MembershipChange};

/// Two joins at once, through two nodes: they read the same records and
/// pick the same id, and only the conditional write keeps them apart.
#[tokio::test]
async fn concurrent_joins_get_distinct_ids() {
    let c = TestCluster::new(3, 1, 3, fast_tuning());
    c.leader(META_SHARD).await;
    let admit = |via: u64, address: &'static str, token: u64| {
        let node = c.node(via).clone();
        async move {
            loop {
                match pigeonhole_cluster::join::admit(&node, address, token, "").await {
                    Ok((id, _)) => return id,
                    Err(e) if e.is_retryable() => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                    Err(e) => panic!("join of {address} failed: {e}"),
                }
            }
        }
    };
    for round in 0..5u64 {
        let (a, b) = tokio::join!(
            admit(1, leak(format!("10.1.{round}.1:1")), 1 + round * 2),
            admit(2, leak(format!("10.1.{round}.2:1")), 2 + round * 2)
        );
        assert_ne!(a, b, "round {round}: two joins got one id");
    }
    c.node(3).read_barrier(META_SHARD).await.unwrap();
    let states = c.node(3).node_states().unwrap();
    let mut addresses: Vec<&str> = states.values().map(|e| e.address.as_str()).collect();
    addresses.sort_unstable();
    addresses.dedup();
    assert_eq!(addresses.len(), 10, "every join kept its own record: {states:?}");
}

/// Makes `changes(leader)` on the shard's leader, asking again while the
/// leadership moves (the rebalancer hands it to the preferred node).
/// Returns the changes made.
async fn change_on_leader(
    c: &TestCluster,
    shard: u64,
    changes: impl Fn(u64) -> Vec<MembershipChange>,
) -> Vec<MembershipChange> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let leader = c.leader(shard).await;
        let want = changes(leader);
        match c.node(leader).change_membership(shard, &want).await {
            Ok(_) => return want,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("{want:?} not made yet ({e}); again");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{want:?} failed: {e}"),
        }
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
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
    let (again, nodes) = pigeonhole_cluster::join::admit(c.node(3), "10.0.0.4:7070", 44, "")
        .await
        .unwrap();
    assert_eq!(again, 4);
    assert_eq!(nodes.get(&4).map(String::as_str), Some("10.0.0.4:7070"));
    let refused = pigeonhole_cluster::join::admit(c.node(1), "10.0.0.4:7070", 45, "")
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

    // Move one of the shard's replicas to node 4: learner, catch-up, then
    // promotion with the removal of a voter that does not lead.
    let user = "joined-user";
    let shard = shard_of(c.node(1), user);
    append_retrying(c.node(2), shard, user, "k1", b"before", 10).await;
    change_on_leader(&c, shard, |_| vec![MembershipChange::AddLearner(4)]).await;
    c.eventually("node 4's learner catches up", 10, || async {
        let created = c.node(4).engine().shard_ids().unwrap().contains(&shard);
        created && read_all(c.node(4), shard, user).len() == 1
    })
    .await;
    let removed = change_on_leader(&c, shard, |leader| {
        let victim = [1, 2, 3].into_iter().find(|n| *n != leader).unwrap();
        vec![MembershipChange::AddVoter(4), MembershipChange::Remove(victim)]
    })
    .await
    .into_iter()
    .find_map(|ch| match ch {
        MembershipChange::Remove(n) => Some(n),
        _ => None,
    })
    .unwrap();
    c.eventually("the removed voter deletes its replica", 10, || async {
        !c.node(removed).engine().shard_ids().unwrap().contains(&shard)
    })
    .await;
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
