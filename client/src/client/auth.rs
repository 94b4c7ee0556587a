//! The access-control Admin RPCs (docs/security.md): identities, grants
//! and bearer tokens. Each needs the admin role; any node answers.
//!
//! Calls are retried on retryable errors, so a change whose first answer
//! was lost can be made twice: a retried CreateToken may have made a token
//! the caller never saw (listed by [`Client::auth`], revocable, never
//! usable without its secret), and a retried DeleteIdentity or RevokeToken
//! whose first attempt did the work answers NOT_FOUND.

use super::{with_timeout, Client};
use crate::{pb, Error};
use tonic::transport::Channel;
use tonic::{Request, Status};

/// A connection with this client's credentials on every call.
pub type Conn = tonic::service::interceptor::InterceptedService<Channel, Credentials>;

/// Adds the `authorization: Bearer <token>` header to every call, when the
/// client has a token.
#[derive(Clone)]
pub struct Credentials(pub(super) Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for Credentials {
    /// Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Credentials(token)"
        } else {
            "Credentials(none)"
        })
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

impl Client {
    /// Every identity with its grants, and every token (never secrets).
    pub async fn auth(&self) -> Result<pb::GetAuthResponse, Error> {
        self.call_any(|mut admin, budget| {
            let req = with_timeout(pb::GetAuthRequest {}, budget);
            async move { admin.get_auth(req).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Creates an identity (an existing one is left as it is).
    pub async fn put_identity(&self, name: &str) -> Result<pb::PutIdentityResponse, Error> {
        self.call_any(|mut admin, budget| {
            let req = with_timeout(pb::PutIdentityRequest { name: name.to_string() }, budget);
            async move { admin.put_identity(req).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Deletes an identity, its grants and its tokens.
    pub async fn delete_identity(&self, name: &str) -> Result<pb::DeleteIdentityResponse, Error> {
        self.call_any(|mut admin, budget| {
            let req = with_timeout(pb::DeleteIdentityRequest { name: name.to_string() }, budget);
            async move { admin.delete_identity(req).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Gives `identity` `role` on `namespace` ("*": every namespace).
    pub async fn grant(&self, identity: &str, namespace: &str, role: pb::Role) -> Result<pb::Identity, Error> {
        let r = self
            .call_any(|mut admin, budget| {
                let req = with_timeout(
                    pb::GrantRequest {
                        identity: identity.to_string(),
                        namespace: namespace.to_string(),
                        role: role as i32,
                    },
                    budget,
                );
                async move { admin.grant(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
        r.identity
            .ok_or_else(|| Error::Protocol("GrantResponse without its identity".into()))
    }

    /// Takes `role` on `namespace` away from `identity`.
    pub async fn revoke(&self, identity: &str, namespace: &str, role: pb::Role) -> Result<pb::Identity, Error> {
        let r = self
            .call_any(|mut admin, budget| {
                let req = with_timeout(
                    pb::RevokeRequest {
                        identity: identity.to_string(),
                        namespace: namespace.to_string(),
                        role: role as i32,
                    },
                    budget,
                );
                async move { admin.revoke(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
        r.identity
            .ok_or_else(|| Error::Protocol("RevokeResponse without its identity".into()))
    }

    /// A new token for `identity` (`ttl_s` 0: never expires). The answer is
    /// the only time its secret is shown.
    pub async fn create_token(
        &self,
        identity: &str,
        ttl_s: u64,
        description: &str,
    ) -> Result<pb::CreateTokenResponse, Error> {
        self.call_any(|mut admin, budget| {
            let req = with_timeout(
                pb::CreateTokenRequest {
                    identity: identity.to_string(),
                    ttl_s,
                    description: description.to_string(),
                },
                budget,
            );
            async move { admin.create_token(req).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Revokes a token by its id.
    pub async fn revoke_token(&self, token_id: &str) -> Result<(), Error> {
        self.call_any(|mut admin, budget| {
            let req = with_timeout(
                pb::RevokeTokenRequest {
                    token_id: token_id.to_string(),
                },
                budget,
            );
            async move { admin.revoke_token(req).await.map(|_| ()) }
        })
        .await
    }
}
