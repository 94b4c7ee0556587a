//! The access-control book: identities, their grants and the bearer
//! tokens, as the metadata group stores them (one `AuthState` value,
//! storage-format.md), the rules every change must keep, and the lookups a
//! request's check makes.
//!
//! Pure: no I/O, no clock of its own (times are passed in), so the rules are
//! unit-tested here and the admin RPCs ([`super::admin`]) are a read, one of
//! these changes and a compare-and-set write.

use pigeonhole_proto::internal::v1::{AuthGrant, AuthIdentity, AuthState, AuthToken};
use pigeonhole_proto::v1 as pb;
use std::collections::BTreeMap;

/// Identities, at most. With [`GRANTS_PER_IDENTITY_MAX`] and
/// [`TOKENS_MAX`] this keeps the whole book under the 1 MiB a system value
/// may hold (worst case measured by a unit test: about 0.8 MiB).
pub const IDENTITIES_MAX: usize = 512;
/// Grants per identity, at most.
pub const GRANTS_PER_IDENTITY_MAX: usize = 16;
/// Tokens, at most (all identities together).
pub const TOKENS_MAX: usize = 1_024;
/// Identity and namespace names: 1 to this many bytes.
pub const NAME_BYTES_MAX: usize = 64;
/// Token descriptions, at most.
pub const DESCRIPTION_BYTES_MAX: usize = 64;
/// Longest token lifetime, in seconds (10 years).
pub const TOKEN_TTL_S_MAX: u64 = 10 * 365 * 24 * 3600;
/// The stored book's size, at most: a system value holds at most a
/// payload's 1 MiB (engine limits).
pub const STATE_BYTES_MAX: usize = 1 << 20;
/// The namespace that stands for every namespace in a grant.
pub const ALL_NAMESPACES: &str = "*";
/// Names no identity may take: the nodes' certificates and the CA
/// holder's superuser certificate carry them.
pub const RESERVED_NAMES: [&str; 2] = [pigeonhole_tls::NODE_COMMON_NAME, ROOT_NAME];
/// The superuser: a client certificate of the cluster CA with this common
/// name holds every role (it is how the first identities are made).
pub const ROOT_NAME: &str = "root";

/// A change the book (or the namespace records, [`crate::quota`])
/// refuses: the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The request field at fault.
    pub field: &'static str,
    /// The rule, with the limit.
    pub reason: String,
    /// Whether the thing named does not exist (NOT_FOUND rather than
    /// INVALID_ARGUMENT).
    pub not_found: bool,
    /// Whether a limit on the book's size was hit (RESOURCE_EXHAUSTED).
    pub full: bool,
}

pub(crate) fn bad(field: &'static str, reason: String) -> Refusal {
    Refusal {
        field,
        reason,
        not_found: false,
        full: false,
    }
}

fn missing(field: &'static str, reason: String) -> Refusal {
    Refusal {
        field,
        reason,
        not_found: true,
        full: false,
    }
}

pub(crate) fn full(field: &'static str, reason: String) -> Refusal {
    Refusal {
        field,
        reason,
        not_found: false,
        full: true,
    }
}

/// An identity name: 1 to 64 of `a-z 0-9 . _ -`, not reserved.
pub fn check_identity_name(name: &str) -> Result<(), Refusal> {
    check_name("name", name)?;
    if RESERVED_NAMES.contains(&name) {
        return Err(bad(
            "name",
            format!("{name:?} is reserved (nodes' and the CA holder's certificates)"),
        ));
    }
    Ok(())
}

fn check_name(field: &'static str, name: &str) -> Result<(), Refusal> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(bad(field, format!("{} bytes; 1 to {NAME_BYTES_MAX}", name.len())));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad(field, format!("{name:?}: only a-z 0-9 . _ - are allowed")));
    }
    Ok(())
}

/// A grant's namespace and role: the namespace as mailboxes name it (1 to
/// 64 bytes) or "*"; `admin` only on "*".
pub fn check_grant(namespace: &str, role: i32) -> Result<pb::Role, Refusal> {
    let role = match pb::Role::try_from(role) {
        Ok(pb::Role::Unspecified) | Err(_) => {
            return Err(bad("role", format!("{role} is not a role (append, read, trim, admin)")))
        }
        Ok(r) => r,
    };
    if namespace != ALL_NAMESPACES && (namespace.is_empty() || namespace.len() > NAME_BYTES_MAX) {
        return Err(bad(
            "namespace",
            format!(
                "{} bytes; 1 to {NAME_BYTES_MAX}, or \"*\" for every namespace",
                namespace.len()
            ),
        ));
    }
    if role == pb::Role::Admin && namespace != ALL_NAMESPACES {
        return Err(bad(
            "namespace",
            "the admin role is cluster-wide: grant it on \"*\"".to_string(),
        ));
    }
    Ok(role)
}

/// A role's name as errors and phctl show it.
pub fn role_name(role: pb::Role) -> &'static str {
    match role {
        pb::Role::Append => "append",
        pb::Role::Read => "read",
        pb::Role::Trim => "trim",
        pb::Role::Admin => "admin",
        pb::Role::Unspecified => "unspecified",
    }
}

/// The changes an admin RPC can make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Create an identity (no change if it exists).
    PutIdentity { name: String },
    /// Delete an identity, its grants and its tokens.
    DeleteIdentity { name: String },
    /// Add a grant.
    Grant {
        identity: String,
        namespace: String,
        role: i32,
    },
    /// Remove a grant.
    Revoke {
        identity: String,
        namespace: String,
        role: i32,
    },
    /// Add a token (its id and hashed secret drawn by the caller).
    AddToken(AuthToken),
    /// Remove a token.
    RevokeToken { token_id: String },
}

/// Applies `change` to `state`. `Ok(false)`: nothing to write (already so).
pub fn apply(state: &mut AuthState, change: &Change) -> Result<bool, Refusal> {
    match change {
        Change::PutIdentity { name } => {
            check_identity_name(name)?;
            if state.identities.iter().any(|i| &i.name == name) {
                return Ok(false);
            }
            if state.identities.len() >= IDENTITIES_MAX {
                return Err(full(
                    "name",
                    format!("the cluster holds {IDENTITIES_MAX} identities, the limit"),
                ));
            }
            state.identities.push(AuthIdentity {
                name: name.clone(),
                grants: Vec::new(),
            });
            state.identities.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(true)
        }
        Change::DeleteIdentity { name } => {
            let before = state.identities.len();
            state.identities.retain(|i| &i.name != name);
            if state.identities.len() == before {
                return Err(missing("name", format!("no identity {name:?}")));
            }
            state.tokens.retain(|t| &t.identity != name);
            Ok(true)
        }
        Change::Grant {
            identity,
            namespace,
            role,
        } => {
            check_grant(namespace, *role)?;
            let id = identity_mut(state, identity)?;
            if id.grants.iter().any(|g| &g.namespace == namespace && g.role == *role) {
                return Ok(false);
            }
            if id.grants.len() >= GRANTS_PER_IDENTITY_MAX {
                return Err(full(
                    "namespace",
                    format!("identity {identity:?} holds {GRANTS_PER_IDENTITY_MAX} grants, the limit"),
                ));
            }
            id.grants.push(AuthGrant {
                namespace: namespace.clone(),
                role: *role,
            });
            id.grants
                .sort_by(|a, b| (&a.namespace, a.role).cmp(&(&b.namespace, b.role)));
            Ok(true)
        }
        Change::Revoke {
            identity,
            namespace,
            role,
        } => {
            check_grant(namespace, *role)?;
            let id = identity_mut(state, identity)?;
            let before = id.grants.len();
            id.grants.retain(|g| !(&g.namespace == namespace && g.role == *role));
            Ok(id.grants.len() != before)
        }
        Change::AddToken(t) => {
            if !state.identities.iter().any(|i| i.name == t.identity) {
                return Err(missing("identity", format!("no identity {:?}", t.identity)));
            }
            if t.description.len() > DESCRIPTION_BYTES_MAX {
                return Err(bad(
                    "description",
                    format!("{} bytes; at most {DESCRIPTION_BYTES_MAX}", t.description.len()),
                ));
            }
            if state.tokens.len() >= TOKENS_MAX {
                return Err(full(
                    "identity",
                    format!("the cluster holds {TOKENS_MAX} tokens, the limit"),
                ));
            }
            if state.tokens.iter().any(|x| x.token_id == t.token_id) {
                // 64 random bits: a clash is a broken random source.
                return Err(bad("token_id", "drawn twice; retry".to_string()));
            }
            state.tokens.push(t.clone());
            Ok(true)
        }
        Change::RevokeToken { token_id } => {
            let before = state.tokens.len();
            state.tokens.retain(|t| &t.token_id != token_id);
            if state.tokens.len() == before {
                return Err(missing("token_id", format!("no token {token_id:?}")));
            }
            Ok(true)
        }
    }
}

fn identity_mut<'a>(state: &'a mut AuthState, name: &str) -> Result<&'a mut AuthIdentity, Refusal> {
    state
        .identities
        .iter_mut()
        .find(|i| i.name == name)
        .ok_or_else(|| missing("identity", format!("no identity {name:?}")))
}

/// The book as a request's check reads it: roles by identity and
/// namespace, tokens by id.
#[derive(Debug, Default, Clone)]
pub struct Book {
    /// At most [`GRANTS_PER_IDENTITY_MAX`] grants each: a scan, with no
    /// allocation on the append path.
    roles: BTreeMap<String, Vec<(String, i32)>>,
    tokens: BTreeMap<String, AuthToken>,
}

impl Book {
    /// Indexes a stored state.
    pub fn new(state: &AuthState) -> Book {
        let mut b = Book::default();
        for i in &state.identities {
            b.roles.insert(
                i.name.clone(),
                i.grants.iter().map(|g| (g.namespace.clone(), g.role)).collect(),
            );
        }
        for t in &state.tokens {
            b.tokens.insert(t.token_id.clone(), t.clone());
        }
        b
    }

    /// Whether `identity` holds `role` on `namespace` (directly or on "*").
    pub fn allows(&self, identity: &str, namespace: &str, role: pb::Role) -> bool {
        let r = role as i32;
        self.roles.get(identity).is_some_and(|grants| {
            grants
                .iter()
                .any(|(ns, g)| *g == r && (ns == namespace || ns == ALL_NAMESPACES))
        })
    }

    /// Whether `identity` exists.
    pub fn has_identity(&self, identity: &str) -> bool {
        self.roles.contains_key(identity)
    }

    /// The token with this id, if it exists and has not expired at `now_ms`.
    pub fn token(&self, token_id: &str, now_ms: u64) -> Option<&AuthToken> {
        self.tokens
            .get(token_id)
            .filter(|t| t.expires_unix_ms == 0 || now_ms < t.expires_unix_ms)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn token(id: &str, identity: &str, expires: u64) -> AuthToken {
        AuthToken {
            token_id: id.into(),
            identity: identity.into(),
            secret_sha256: vec![0; 32],
            created_unix_ms: 1,
            expires_unix_ms: expires,
            description: String::new(),
        }
    }

    #[test]
    fn grants_allow_their_role_on_their_namespace_only() {
        let mut s = AuthState::default();
        for c in [
            Change::PutIdentity {
                name: "wa-router".into(),
            },
            Change::Grant {
                identity: "wa-router".into(),
                namespace: "whatsapp".into(),
                role: pb::Role::Append as i32,
            },
            Change::Grant {
                identity: "wa-router".into(),
                namespace: "messenger".into(),
                role: pb::Role::Append as i32,
            },
            Change::PutIdentity { name: "ops".into() },
            Change::Grant {
                identity: "ops".into(),
                namespace: "*".into(),
                role: pb::Role::Read as i32,
            },
        ] {
            assert!(apply(&mut s, &c).unwrap(), "{c:?}");
        }
        let b = Book::new(&s);
        assert!(b.allows("wa-router", "whatsapp", pb::Role::Append));
        assert!(
            b.allows("wa-router", "messenger", pb::Role::Append),
            "cross-namespace append"
        );
        assert!(!b.allows("wa-router", "messenger", pb::Role::Read));
        assert!(!b.allows("wa-router", "instagram", pb::Role::Append));
        assert!(b.allows("ops", "instagram", pb::Role::Read));
        assert!(!b.allows("ops", "instagram", pb::Role::Trim));
        assert!(!b.allows("nobody", "whatsapp", pb::Role::Append));
        // Revoke, then the grant is gone; revoking again changes nothing.
        let revoke = Change::Revoke {
            identity: "wa-router".into(),
            namespace: "messenger".into(),
            role: pb::Role::Append as i32,
        };
        assert!(apply(&mut s, &revoke).unwrap());
        assert!(!apply(&mut s, &revoke).unwrap());
        assert!(!Book::new(&s).allows("wa-router", "messenger", pb::Role::Append));
    }

    #[test]
    fn tokens_expire_and_go_with_their_identity() {
        let mut s = AuthState::default();
        apply(&mut s, &Change::PutIdentity { name: "a".into() }).unwrap();
        apply(&mut s, &Change::AddToken(token("t1", "a", 0))).unwrap();
        apply(&mut s, &Change::AddToken(token("t2", "a", 1_000))).unwrap();
        let b = Book::new(&s);
        assert!(b.token("t1", u64::MAX).is_some());
        assert!(b.token("t2", 999).is_some());
        assert!(b.token("t2", 1_000).is_none(), "expired");
        let e = apply(&mut s, &Change::AddToken(token("t3", "zz", 0))).unwrap_err();
        assert!(e.not_found && e.field == "identity", "{e:?}");
        apply(&mut s, &Change::DeleteIdentity { name: "a".into() }).unwrap();
        assert!(s.tokens.is_empty(), "an identity's tokens go with it");
        let e = apply(&mut s, &Change::RevokeToken { token_id: "t1".into() }).unwrap_err();
        assert!(e.not_found, "{e:?}");
    }

    #[test]
    fn bad_changes_are_named() {
        let mut s = AuthState::default();
        for (c, field) in [
            (Change::PutIdentity { name: "root".into() }, "name"),
            (Change::PutIdentity { name: "node".into() }, "name"),
            (Change::PutIdentity { name: "Upper".into() }, "name"),
            (Change::PutIdentity { name: String::new() }, "name"),
            (Change::PutIdentity { name: "x".repeat(65) }, "name"),
        ] {
            assert_eq!(apply(&mut s, &c).unwrap_err().field, field, "{c:?}");
        }
        apply(&mut s, &Change::PutIdentity { name: "a".into() }).unwrap();
        let g = |ns: &str, role: pb::Role| Change::Grant {
            identity: "a".into(),
            namespace: ns.into(),
            role: role as i32,
        };
        assert_eq!(
            apply(&mut s, &g("chat", pb::Role::Admin)).unwrap_err().field,
            "namespace"
        );
        assert_eq!(
            apply(&mut s, &g("chat", pb::Role::Unspecified)).unwrap_err().field,
            "role"
        );
        assert_eq!(apply(&mut s, &g("", pb::Role::Read)).unwrap_err().field, "namespace");
        assert!(apply(&mut s, &g("*", pb::Role::Admin)).unwrap());
        for n in 1..GRANTS_PER_IDENTITY_MAX {
            apply(&mut s, &g(&format!("ns{n}"), pb::Role::Read)).unwrap();
        }
        let e = apply(&mut s, &g("one-more", pb::Role::Read)).unwrap_err();
        assert!(e.full, "{e:?}");
    }

    #[test]
    fn a_full_book_fits_in_a_system_value() {
        use prost::Message as _;
        let mut s = AuthState::default();
        for i in 0..IDENTITIES_MAX {
            let name = format!("{i:0>64}");
            apply(&mut s, &Change::PutIdentity { name: name.clone() }).unwrap();
            for g in 0..GRANTS_PER_IDENTITY_MAX {
                apply(
                    &mut s,
                    &Change::Grant {
                        identity: name.clone(),
                        namespace: format!("{g:0>64}"),
                        role: pb::Role::Read as i32,
                    },
                )
                .unwrap();
            }
        }
        for t in 0..TOKENS_MAX {
            let mut tk = token(&format!("{t:016x}"), &format!("{:0>64}", t % IDENTITIES_MAX), u64::MAX);
            tk.description = "d".repeat(DESCRIPTION_BYTES_MAX);
            tk.created_unix_ms = u64::MAX;
            apply(&mut s, &Change::AddToken(tk)).unwrap();
        }
        assert!(
            apply(&mut s, &Change::PutIdentity { name: "more".into() })
                .unwrap_err()
                .full
        );
        let len = s.encoded_len();
        assert!(len < STATE_BYTES_MAX, "{len}");
    }
}
