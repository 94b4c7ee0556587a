//! `flush`: a flush covers the applied index every replica had when it
//! started, only ever raises the durable applied index, and its thread
//! never outlives a stopping driver.
use super::*;

/// Waits (bounded) for the flush thread's answer in the inbox.
fn flushed(d: &Driver) -> (Vec<(u64, u64)>, bool) {
    match d.rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Inbound::Flushed { applied, ok }) => (applied, ok),
        Ok(_) => panic!("something other than the flush's answer arrived"),
        Err(e) => panic!("the flush never answered: {e}"),
    }
}

#[test]
fn a_flush_makes_every_replicas_applied_index_durable_and_never_lowers_one() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    for i in 0..3 {
        drop(propose(&mut d, 1, vec![append_op(&format!("k{i}"))]));
    }
    settle(&mut d);
    let applied: Vec<(u64, u64)> = d
        .replicas
        .iter()
        .map(|(s, r)| (*s, r.raw.raft.raft_log.applied))
        .collect();
    assert!(applied.iter().all(|(_, a)| *a > 0), "{applied:?}");

    d.start_flush();
    assert!(d.flush_job.is_some());
    let (covered, ok) = flushed(&d);
    assert!(ok);
    assert_eq!(
        covered, applied,
        "the flush covers what each replica had applied when it started"
    );
    d.on_flushed(covered, ok);
    assert!(d.flush_job.is_none(), "the finished thread is joined");
    for (shard, index) in &applied {
        assert_eq!(d.replicas[shard].durable_applied, *index, "shard {shard}");
        assert!(d.applied_now.contains(shard), "shard {shard} may compact now");
    }

    // An older flush's answer (lower indexes) never lowers what is durable,
    // a failed flush raises nothing, and a shard this node no longer holds
    // is ignored.
    let durable = d.replicas[&1].durable_applied;
    d.on_flushed(vec![(1, 1)], true);
    assert_eq!(d.replicas[&1].durable_applied, durable, "lowered by an older flush");
    d.on_flushed(vec![(1, durable + 10)], false);
    assert_eq!(d.replicas[&1].durable_applied, durable, "raised by a failed flush");
    d.on_flushed(vec![(99, 5)], true);
    assert!(!d.replicas.contains_key(&99));
}

/// A flush thread whose answer cannot be delivered (the inbox is full and
/// nobody reads it: the driver is stopping) gives up when it is joined
/// instead of holding the driver's stop for ever.
#[test]
fn a_flush_thread_whose_inbox_is_full_gives_up_when_the_driver_stops() {
    let (_dir, mut d) = driver(RaftTuning::default());
    settle(&mut d);
    // Fill the inbox (bounded at 64 by the harness).
    let mut filled = 0;
    while d.tx.try_send(Inbound::Stop).is_ok() {
        filled += 1;
        assert!(filled <= 64, "the inbox is unbounded");
    }
    d.start_flush();
    let job = d.flush_job.take().unwrap();
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        job.join();
        let _ = done_tx.send(());
    });
    assert!(
        done_rx.recv_timeout(Duration::from_secs(10)).is_ok(),
        "joining the flush thread hung on its undeliverable answer"
    );
}

/// The state machine is written without a WAL (D26): the log must
/// never be compacted past what a flush made durable, and compaction
/// must resume once a flush did.
#[test]
fn the_log_is_never_compacted_past_the_durable_applied_index() {
    let tuning = RaftTuning {
        log_entries_max: 16,
        log_retain_entries: 0,
        ..RaftTuning::default()
    };
    let (_dir, mut d) = driver(tuning);
    settle(&mut d);
    let check = |d: &Driver| {
        for (shard, r) in &d.replicas {
            let first = r.raw.store().first_index().unwrap();
            assert!(
                first - 1 <= r.durable_applied,
                "shard {shard}: log compacted to {} past the durable applied index {}",
                first - 1,
                r.durable_applied
            );
        }
    };
    let mut flushes = 0;
    for i in 0..200 {
        drop(propose(&mut d, 1, vec![append_op(&format!("k{i}"))]));
        turn(&mut d);
        flushes += usize::from(d.flush_job.is_some());
        check(&d);
    }
    assert!(flushes > 0, "a long log asked for a flush");
    // Once flushes land, compaction catches up.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        turn(&mut d);
        check(&d);
        let first = d.replicas[&1].raw.store().first_index().unwrap();
        if first > 150 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the log never compacted (first index {first})"
        );
        std::thread::sleep(Duration::from_millis(10));
        drop(propose(&mut d, 1, vec![append_op("more")]));
    }
}
