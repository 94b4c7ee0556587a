//! Namespaces' limits and retention (`Admin.ListNamespaces`,
//! `Admin.SetNamespace`, `Admin.SetMailboxHold`; docs/operations.md
//! "Quotas" and "Retention"). A namespace over its limit answers
//! appends with RESOURCE_EXHAUSTED and a RetryInfo delay, which the
//! client's retry loop waits out ([`retry_delay`]).

use super::{with_timeout, Client};
use crate::{pb, Error};
use std::time::Duration;
use tonic::Status;

/// The delay a RESOURCE_EXHAUSTED status asks for (its RetryInfo), if any.
pub fn retry_delay(s: &Status) -> Option<Duration> {
    if s.code() != tonic::Code::ResourceExhausted {
        return None;
    }
    tonic_types::StatusExt::get_error_details(s)
        .retry_info()
        .and_then(|r| r.retry_delay)
}

impl Client {
    /// Every namespace record and its limits.
    pub async fn namespaces(&self) -> Result<Vec<pb::NamespaceInfo>, Error> {
        self.call_any(|mut admin, budget| {
            let req = with_timeout(pb::ListNamespacesRequest {}, budget);
            async move { admin.list_namespaces(req).await.map(|r| r.into_inner().namespaces) }
        })
        .await
    }

    /// Creates a namespace's record or changes its rate limits (`None`
    /// keeps a limit, 0 lifts it).
    pub async fn set_namespace(
        &self,
        name: &str,
        appends_per_s: Option<u32>,
        bytes_per_s: Option<u64>,
    ) -> Result<pb::SetNamespaceResponse, Error> {
        self.set_namespace_fields(pb::SetNamespaceRequest {
            name: name.to_string(),
            appends_per_s,
            bytes_per_s,
            ..pb::SetNamespaceRequest::default()
        })
        .await
    }

    /// Creates a namespace's record or changes any of its fields, limits
    /// and retention policy alike (a field left `None` keeps its value).
    pub async fn set_namespace_fields(&self, r: pb::SetNamespaceRequest) -> Result<pb::SetNamespaceResponse, Error> {
        self.call_any(|mut admin, budget| {
            let req = with_timeout(r.clone(), budget);
            async move { admin.set_namespace(req).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Puts a mailbox under a legal hold (`held`) or releases it.
    pub async fn set_mailbox_hold(
        &self,
        namespace: &str,
        user_id: &[u8],
        held: bool,
    ) -> Result<pb::SetMailboxHoldResponse, Error> {
        self.call_any(|mut admin, budget| {
            let req = with_timeout(
                pb::SetMailboxHoldRequest {
                    mailbox: Some(pb::MailboxId {
                        namespace: namespace.to_string(),
                        user_id: user_id.to_vec(),
                    }),
                    held,
                },
                budget,
            );
            async move { admin.set_mailbox_hold(req).await.map(tonic::Response::into_inner) }
        })
        .await
    }
}
