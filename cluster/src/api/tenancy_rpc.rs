//! The tenancy Admin RPCs: access control (GetAuth, PutIdentity,
//! DeleteIdentity, Grant, Revoke, CreateToken, RevokeToken) and namespaces'
//! limits and retention (ListNamespaces, SetNamespace, SetMailboxHold):
//! request checks, the change, and
//! the answer. The admin role is checked by the caller
//! ([`super::AdminService`]); the rules live in [`crate::auth::book`] and
//! [`crate::quota`].

use super::status::cluster_error;
use crate::auth::admin::Outcome;
use crate::auth::book::{Change, Refusal, TOKEN_TTL_S_MAX};
use crate::auth::check::TOKEN_PREFIX;
use crate::Node;
use pigeonhole_proto::internal::v1::{AuthIdentity, AuthState, AuthToken};
use pigeonhole_proto::v1 as pb;
use rand::RngCore as _;
use tonic::Status;

fn refused(r: &Refusal) -> Status {
    let msg = format!("{}: {}", r.field, r.reason);
    if r.not_found {
        Status::not_found(msg)
    } else if r.full {
        Status::resource_exhausted(msg)
    } else {
        Status::invalid_argument(msg)
    }
}

fn identity(i: &AuthIdentity) -> pb::Identity {
    pb::Identity {
        name: i.name.clone(),
        grants: i
            .grants
            .iter()
            .map(|g| pb::Grant {
                namespace: g.namespace.clone(),
                role: g.role,
            })
            .collect(),
    }
}

fn token_info(t: &AuthToken) -> pb::TokenInfo {
    pb::TokenInfo {
        token_id: t.token_id.clone(),
        identity: t.identity.clone(),
        created_unix_ms: t.created_unix_ms,
        expires_unix_ms: t.expires_unix_ms,
        description: t.description.clone(),
    }
}

fn named(state: &AuthState, name: &str) -> Result<pb::Identity, Status> {
    state
        .identities
        .iter()
        .find(|i| i.name == name)
        .map(identity)
        .ok_or_else(|| Status::not_found(format!("identity: no identity {name:?}")))
}

async fn change(node: &Node, c: &Change) -> Result<(AuthState, bool), Status> {
    match node.change_auth(c).await.map_err(|e| cluster_error(&e))? {
        Outcome::Done { state, changed } => Ok((state, changed)),
        Outcome::Refused(r) => Err(refused(&r)),
    }
}

pub(super) async fn get_auth(node: &Node) -> Result<pb::GetAuthResponse, Status> {
    let (_, state) = node.auth_state().await.map_err(|e| cluster_error(&e))?;
    Ok(pb::GetAuthResponse {
        identities: state.identities.iter().map(identity).collect(),
        tokens: state.tokens.iter().map(token_info).collect(),
    })
}

pub(super) async fn put_identity(node: &Node, r: pb::PutIdentityRequest) -> Result<pb::PutIdentityResponse, Status> {
    let (state, created) = change(node, &Change::PutIdentity { name: r.name.clone() }).await?;
    Ok(pb::PutIdentityResponse {
        identity: Some(named(&state, &r.name)?),
        created,
    })
}

pub(super) async fn delete_identity(
    node: &Node,
    r: pb::DeleteIdentityRequest,
) -> Result<pb::DeleteIdentityResponse, Status> {
    let (_, before) = node.auth_state().await.map_err(|e| cluster_error(&e))?;
    let tokens = before.tokens.iter().filter(|t| t.identity == r.name).count();
    change(node, &Change::DeleteIdentity { name: r.name }).await?;
    Ok(pb::DeleteIdentityResponse {
        tokens_revoked: u32::try_from(tokens).unwrap_or(u32::MAX),
    })
}

pub(super) async fn grant(node: &Node, r: pb::GrantRequest) -> Result<pb::GrantResponse, Status> {
    let (state, _) = change(
        node,
        &Change::Grant {
            identity: r.identity.clone(),
            namespace: r.namespace,
            role: r.role,
        },
    )
    .await?;
    Ok(pb::GrantResponse {
        identity: Some(named(&state, &r.identity)?),
    })
}

pub(super) async fn revoke(node: &Node, r: pb::RevokeRequest) -> Result<pb::RevokeResponse, Status> {
    let (state, _) = change(
        node,
        &Change::Revoke {
            identity: r.identity.clone(),
            namespace: r.namespace,
            role: r.role,
        },
    )
    .await?;
    Ok(pb::RevokeResponse {
        identity: Some(named(&state, &r.identity)?),
    })
}

pub(super) async fn create_token(node: &Node, r: pb::CreateTokenRequest) -> Result<pb::CreateTokenResponse, Status> {
    if r.ttl_s > TOKEN_TTL_S_MAX {
        return Err(Status::invalid_argument(format!(
            "ttl_s: {} is more than {TOKEN_TTL_S_MAX} (10 years); 0 is never",
            r.ttl_s
        )));
    }
    // 64 bits of id, 128 of secret, from the OS's generator.
    let mut rng = rand::rngs::OsRng;
    let token_id = format!("{:016x}", rng.next_u64());
    let secret = format!("{:016x}{:016x}", rng.next_u64(), rng.next_u64());
    let now = crate::auth::now_unix_ms();
    let t = AuthToken {
        token_id: token_id.clone(),
        identity: r.identity,
        secret_sha256: crate::auth::sha256(secret.as_bytes()),
        created_unix_ms: now,
        expires_unix_ms: if r.ttl_s == 0 {
            0
        } else {
            now.saturating_add(r.ttl_s.saturating_mul(1_000))
        },
        description: r.description,
    };
    let info = token_info(&t);
    change(node, &Change::AddToken(t)).await?;
    Ok(pb::CreateTokenResponse {
        token: format!("{TOKEN_PREFIX}{token_id}.{secret}"),
        info: Some(info),
    })
}

pub(super) async fn revoke_token(node: &Node, r: pb::RevokeTokenRequest) -> Result<pb::RevokeTokenResponse, Status> {
    change(node, &Change::RevokeToken { token_id: r.token_id }).await?;
    Ok(pb::RevokeTokenResponse {})
}

fn namespace_info(
    r: &pigeonhole_proto::internal::v1::NamespaceRecord,
    stored: &std::collections::HashMap<String, u64>,
) -> pb::NamespaceInfo {
    pb::NamespaceInfo {
        name: r.name.clone(),
        appends_per_s: r.appends_per_s,
        bytes_per_s: r.bytes_per_s,
        ttl_ms: r.ttl_ms,
        messages_per_mailbox_max: r.messages_per_mailbox_max,
        trim_acked: r.trim_acked,
        legal_hold: r.legal_hold,
        dedup_window_ms: r.dedup_window_ms,
        storage_bytes_max: r.storage_bytes_max,
        stored_bytes: stored.get(&r.name).copied().unwrap_or(0),
    }
}

pub(super) async fn list_namespaces(node: &Node) -> Result<pb::ListNamespacesResponse, Status> {
    let state = node.namespaces().await.map_err(|e| cluster_error(&e))?;
    Ok(pb::ListNamespacesResponse {
        namespaces: {
            let stored = crate::quota::stored_bytes(node);
            state.namespaces.iter().map(|r| namespace_info(r, &stored)).collect()
        },
    })
}

pub(super) async fn set_namespace(node: &Node, r: pb::SetNamespaceRequest) -> Result<pb::SetNamespaceResponse, Status> {
    match node.set_namespace(&r.name, &r).await.map_err(|e| cluster_error(&e))? {
        Ok((record, created)) => Ok(pb::SetNamespaceResponse {
            namespace: Some(namespace_info(&record, &crate::quota::stored_bytes(node))),
            created,
        }),
        Err(refusal) => Err(refused(&refusal)),
    }
}

/// SetMailboxHold: a `HoldOp` through the mailbox's shard, so the hold is
/// in the state machine of every replica from its answer on.
pub(super) async fn set_mailbox_hold(
    node: &Node,
    r: pb::SetMailboxHoldRequest,
) -> Result<pb::SetMailboxHoldResponse, Status> {
    let mb = r
        .mailbox
        .ok_or_else(|| super::status::invalid("mailbox", "is required"))?;
    node.engine()
        .options()
        .limits
        .check_mailbox(&mb.namespace, &mb.user_id)
        .map_err(|e| super::status::op_error(&e))?;
    let shard = node
        .routing()
        .shard_for_user(&mb.user_id)
        .map(|s| s.id)
        .ok_or_else(|| Status::internal("no shard covers this user id"))?;
    let op = pigeonhole_engine::command::Op {
        op: Some(pigeonhole_engine::command::op::Op::Hold(
            pigeonhole_engine::command::HoldOp {
                namespace: mb.namespace,
                user_id: mb.user_id,
                held: r.held,
            },
        )),
    };
    let mut res = node.propose(shard, vec![op]).await.map_err(|e| cluster_error(&e))?;
    match res.pop() {
        Some(Ok(pigeonhole_engine::OpOutput::Held { held, changed })) => {
            Ok(pb::SetMailboxHoldResponse { held, changed })
        }
        Some(Ok(other)) => Err(Status::internal(format!("hold returned {other:?}"))),
        Some(Err(e)) => Err(super::status::op_error(&e)),
        None => Err(Status::internal("the state machine returned no result")),
    }
}
