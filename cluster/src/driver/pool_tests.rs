//! The pool's routing and its ownership table.
use super::*;
use crate::config::InitialCluster;
use crate::placement::{ShardDesc, ShardMap};
use crossbeam_channel::Receiver;
use pigeonhole_engine::raft::eraftpb::Message;

fn pool(count: usize) -> (Arc<Drivers>, Vec<Receiver<Inbound>>, Arc<Routing>) {
    let cluster = InitialCluster::parse("1=127.0.0.1:1").unwrap();
    let routing = Arc::new(Routing::new(Arc::new(ShardMap::bootstrap(&cluster, 4, 1))));
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..count).map(|_| crossbeam_channel::bounded(8)).unzip();
    (Drivers::new(txs, routing.clone()), rxs, routing)
}

fn msg(shard: u64) -> ShardMsg {
    ShardMsg {
        shard,
        msg: Message::default(),
    }
}

/// The shards of each envelope that reached each driver.
fn received(rxs: &[Receiver<Inbound>]) -> Vec<Vec<Vec<u64>>> {
    rxs.iter()
        .map(|rx| {
            rx.try_iter()
                .map(|m| match m {
                    Inbound::Raft(env) => env.msgs.iter().map(|m| m.shard).collect(),
                    _ => panic!("not an envelope"),
                })
                .collect()
        })
        .collect()
}

#[test]
fn shards_start_on_driver_shard_mod_count() {
    let got: Vec<usize> = (0..6).map(|s| Drivers::start_owner(s, 3)).collect();
    assert_eq!(got, vec![0, 1, 2, 0, 1, 2]);
    assert_eq!(Drivers::start_owner(7, 0), 0, "no drivers counts as one");
}

#[test]
fn a_shard_is_claimed_by_one_driver_until_that_driver_releases_it() {
    let (d, _rxs, _) = pool(3);
    assert!(d.claim(5, 1));
    assert!(d.claim(5, 1), "a claim by its holder holds");
    assert!(!d.claim(5, 2), "another driver cannot claim it");
    assert!(!d.claim_new(5, 1), "not new, even for its holder");
    d.release(5, 2);
    assert_eq!(d.holder(5), Some(1), "only its holder releases it");
    d.release(5, 1);
    assert_eq!(d.holder(5), None);
    assert!(d.claim_new(5, 2));
    assert_eq!(d.owner(5), 2);
}

/// A shard this node does not hold goes to the driver of its nearest held
/// ancestor (that replica's split makes it), else by the start rule.
#[test]
fn an_unheld_shard_is_routed_to_its_held_ancestors_driver() {
    let (d, _rxs, routing) = pool(3);
    routing.update(|m| {
        let mut m = m.clone();
        for (id, parent) in [(10, 1), (11, 10)] {
            m.shards.push(ShardDesc {
                id,
                range_start: 0,
                range_end: Some(1),
                replicas: vec![1],
                learners: Vec::new(),
                leader_hint: 0,
                preferred_leader: 1,
                epoch: 1,
                parent,
            });
        }
        m
    });
    assert_eq!(d.owner(11), Drivers::start_owner(11, 3), "no ancestor held");
    assert!(d.claim(1, 2));
    assert_eq!(d.owner(10), 2, "its parent's driver");
    assert_eq!(d.owner(11), 2, "its grandparent's driver");
    assert!(d.claim(10, 0));
    assert_eq!(d.owner(11), 0, "the nearest held ancestor");
}

#[test]
fn an_envelope_is_split_by_shard_and_one_without_messages_reaches_every_driver() {
    let (d, rxs, _) = pool(2);
    assert!(d.claim(4, 1));
    let env = Envelope {
        from: 2,
        to: 1,
        msgs: vec![msg(1), msg(4), msg(2), msg(3)],
    };
    assert!(d.deliver(env).unwrap());
    // 1 and 3 go to driver 1 by the start rule, 4 is held by driver 1.
    assert_eq!(received(&rxs), vec![vec![vec![2]], vec![vec![1, 4, 3]]]);
    let heartbeat = Envelope {
        from: 2,
        to: 1,
        msgs: Vec::new(),
    };
    assert!(d.deliver(heartbeat).unwrap());
    let none: Vec<u64> = Vec::new();
    assert_eq!(received(&rxs), vec![vec![none.clone()], vec![none]]);
}

#[test]
fn requests_go_to_their_shards_driver_and_a_full_inbox_says_so() {
    let (d, rxs, _) = pool(2);
    let read = |shard: u64| Inbound::Read {
        shard,
        reply: tokio::sync::oneshot::channel().0,
        deadline: std::time::Instant::now(),
    };
    d.try_send(read(3)).unwrap();
    assert!(matches!(rxs[1].try_recv(), Ok(Inbound::Read { shard: 3, .. })));
    assert!(rxs[0].is_empty());
    d.try_send(Inbound::Placement {
        reply: tokio::sync::oneshot::channel().0,
    })
    .unwrap();
    assert!(
        matches!(rxs[0].try_recv(), Ok(Inbound::Placement { .. })),
        "the metadata shard's driver"
    );
    for _ in 0..8 {
        d.try_send(read(1)).unwrap();
    }
    assert!(matches!(d.try_send(read(1)), Err(TrySendError::Full(_))));
    let env = Envelope {
        from: 2,
        to: 1,
        msgs: vec![msg(1)],
    };
    assert!(!d.deliver(env).unwrap(), "dropped: the inbox is full");
    drop(rxs);
    assert!(matches!(d.try_send(read(2)), Err(TrySendError::Disconnected(_))));
}

#[test]
fn the_replica_gauges_are_the_sum_over_drivers() {
    let (d, _rxs, _) = pool(2);
    d.report_replicas(0, 3, 1, 10);
    d.report_replicas(1, 2, 2, 5);
    d.report_replicas(7, 100, 100, 100); // no such driver: ignored
    d.report_replicas(0, 4, 0, 1); // a later report replaces the driver's own
    let g = sum(&d.gauges.lock().unwrap());
    assert_eq!((g.awake, g.asleep, g.apply_lag), (6, 2, 6));
}
