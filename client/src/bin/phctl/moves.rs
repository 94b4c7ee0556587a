//! `phctl shard move`: moves one replica of a shard from a node to another,
//! online, with the conf-change primitive (ChangeMembership) and leader
//! transfer, the way a placement driver does it:
//! 1. add the new node as a learner (it catches up by snapshot, within the
//!    nodes' snapshot send budget);
//! 2. wait until it has applied what the leader had committed;
//! 3. if the replica to move is the leader, hand leadership to another
//!    voter first;
//! 4. promote the learner and remove the old replica in ONE change (a joint
//!    configuration, which the group leaves by itself), so the group never
//!    has fewer voters than before;
//! 5. wait until the old node has deleted its replica (replica GC).
//!
//! Every step looks at the shard first and skips what is already done, so
//! a move cut short (phctl killed, a node restarted) is finished by running
//! the same command again.

use crate::commands::{all_status, connect, failed, Ctx, Failure};
use crate::{Output, EXIT_UNAVAILABLE};
use pigeonhole_client::{pb, Client};
use serde_json::json;
use std::future::Future;
use std::time::{Duration, Instant};

/// The shard as its leader sees it.
pub(crate) struct View {
    pub leader: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub commit: u64,
}

/// The leader's view of `shard`, from NodeStatus of every node.
pub(crate) async fn view(client: &Client, shard: u64) -> Option<View> {
    all_status(client, false).await.into_values().flatten().find_map(|s| {
        s.replicas
            .iter()
            .find(|r| r.shard == shard && r.role == pb::ReplicaRole::Leader as i32)
            .map(|r| View {
                leader: s.node_id,
                voters: r.voters.clone(),
                learners: r.learners.clone(),
                commit: r.commit_index,
            })
    })
}

/// The replica of `shard` on `node`, if the node answers and holds one.
async fn replica_on(client: &Client, node: u64, shard: u64) -> Result<Option<pb::ReplicaStatus>, String> {
    client
        .node_status(node, false)
        .await
        .map(|s| s.replicas.into_iter().find(|r| r.shard == shard))
        .map_err(|e| e.to_string())
}

/// Polls `f` until it yields a value or `deadline` passes.
pub(crate) async fn until<T, F, Fut>(what: &str, deadline: Instant, mut f: F) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(Failure {
                message: format!("timed out waiting for {what}; run the same command again to finish"),
                exit: EXIT_UNAVAILABLE,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn change(kind: pb::MembershipChangeKind, node: u64) -> pb::MembershipChange {
    pb::MembershipChange {
        kind: kind as i32,
        node,
    }
}

/// `shard move ID --from N --to M`.
pub async fn shard_move(ctx: &Ctx, id: u64, from: u64, to: u64, wait: Duration) -> Result<u8, Failure> {
    if from == to {
        return Err(failed(format!("--from and --to are both node {from}")));
    }
    let client = connect(ctx).await?;
    if client.routing().shard(id).is_none() {
        return Err(failed(format!("no shard {id}")));
    }
    if !client.routing().nodes.contains_key(&to) {
        return Err(failed(format!("node {to} is not in the cluster")));
    }
    let started = Instant::now();
    let (steps, v) = move_replica(&client, id, from, to, Instant::now() + wait).await?;
    let ms = started.elapsed().as_millis();
    match ctx.output {
        Output::Json => crate::render::json(&json!({
            "shard": id, "from": from, "to": to, "voters": v.voters, "leader": v.leader,
            "steps": steps, "ms": ms,
        })),
        Output::Table => {
            for s in &steps {
                out!("shard {id}: {s}");
            }
            out!(
                "shard {id}: moved from node {from} to node {to} in {ms} ms; voters {:?}, leader node {}",
                v.voters,
                v.leader
            );
        }
    }
    Ok(0)
}

/// Moves `shard`'s replica from `from` to `to` (steps 1 to 5 of the module
/// docs), skipping what is done already. Returns the steps taken and the
/// shard's configuration after the move.
pub(crate) async fn move_replica(
    client: &Client,
    id: u64,
    from: u64,
    to: u64,
    deadline: Instant,
) -> Result<(Vec<String>, View), Failure> {
    let mut steps: Vec<String> = Vec::new();
    let v = until("a leader of the shard", deadline, || view(client, id)).await?;
    let moved = |v: &View| v.voters.contains(&to) && !v.voters.contains(&from) && !v.learners.contains(&from);
    if !moved(&v) {
        if !v.voters.contains(&from) {
            return Err(failed(format!(
                "node {from} is not a voter of shard {id} (voters {:?})",
                v.voters
            )));
        }
        if !v.voters.contains(&to) && !v.learners.contains(&to) {
            client
                .change_membership(id, &[change(pb::MembershipChangeKind::AddLearner, to)])
                .await?;
            steps.push(format!("added node {to} as a learner"));
        }
        let target = v.commit;
        until(
            &format!("node {to} to catch up to index {target}"),
            deadline,
            || async {
                let r = replica_on(client, to, id).await.ok().flatten()?;
                (r.applied_index >= target).then_some(())
            },
        )
        .await?;
        steps.push(format!("node {to} caught up (applied ≥ {target})"));
        let v = until("a leader of the shard", deadline, || view(client, id)).await?;
        if !v.voters.contains(&from) && !moved(&v) {
            // Another change (the placement loop, another phctl) took the
            // replica off `from` meanwhile; promoting `to` now would give
            // the shard a voter too many. The servers refuse it too.
            return Err(failed(format!(
                "node {from} is no longer a voter of shard {id} (voters {:?}, learners {:?}): another change moved \
                 it meanwhile; node {to} stays a learner (phctl shard move {id} --from N --to {to} uses it, or the \
                 placement loop removes it)",
                v.voters, v.learners
            )));
        }
        if v.leader == from {
            let next = v
                .voters
                .iter()
                .copied()
                .find(|n| *n != from && *n != to)
                .ok_or_else(|| failed(format!("shard {id}: no other voter to lead while node {from} leaves")))?;
            client.transfer_leader(id, next).await?;
            until(&format!("node {next} to lead"), deadline, || async {
                view(client, id).await.filter(|v| v.leader != from).map(|_| ())
            })
            .await?;
            steps.push(format!("leadership moved from node {from} to node {next}"));
        }
        if !v.voters.contains(&to) || v.voters.contains(&from) {
            client
                .change_membership(
                    id,
                    &[
                        change(pb::MembershipChangeKind::AddVoter, to),
                        change(pb::MembershipChangeKind::Remove, from),
                    ],
                )
                .await?;
            steps.push(format!("node {to} promoted and node {from} removed (joint consensus)"));
        }
    }
    until("the new configuration", deadline, || async {
        view(client, id).await.filter(&moved).map(|_| ())
    })
    .await?;
    // Replica GC on the old node: it deletes its copy once it applies its
    // removal. A node that is down keeps it until it is back.
    let gc = match replica_on(client, from, id).await {
        Err(e) => format!("node {from} did not answer ({e}); it deletes its replica when it applies the removal"),
        Ok(_) => {
            until(&format!("node {from} to delete its replica"), deadline, || async {
                matches!(replica_on(client, from, id).await, Ok(None)).then_some(())
            })
            .await?;
            format!("node {from} deleted its replica")
        }
    };
    steps.push(gc);
    let v = until("a leader of the shard", deadline, || view(client, id)).await?;
    Ok((steps, v))
}
