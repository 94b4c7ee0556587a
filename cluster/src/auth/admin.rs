//! The access-control admin RPCs' reads and writes: a read barrier on the
//! metadata group, the book as this node's replica then has it, one
//! [`Change`](super::book::Change), and a compare-and-set write of the whole
//! book at the next version (a concurrent writer makes it BUSY: retry).

use super::book::{self, Change, Refusal, STATE_BYTES_MAX};
use super::check::STATE_KEY;
use crate::error::ClusterError;
use crate::Node;
use pigeonhole_proto::internal::v1::AuthState;
use prost::Message as _;

/// What a change came to.
#[derive(Debug)]
pub enum Outcome {
    /// Written (or nothing to write: `changed` false); the book after it.
    Done { state: AuthState, changed: bool },
    /// The book refuses the change.
    Refused(Refusal),
}

impl Node {
    /// The book and its version, after a read barrier on the metadata group
    /// (so it holds every change acknowledged before the call).
    pub async fn auth_state(&self) -> Result<(u64, AuthState), ClusterError> {
        self.read_meta_value(STATE_KEY).await
    }

    /// Applies `change` to the book and writes it back.
    pub async fn change_auth(&self, change: &Change) -> Result<Outcome, ClusterError> {
        let (version, mut state) = self.auth_state().await?;
        match book::apply(&mut state, change) {
            Err(r) => return Ok(Outcome::Refused(r)),
            Ok(false) => return Ok(Outcome::Done { state, changed: false }),
            Ok(true) => {}
        }
        let value = state.encode_to_vec();
        if value.len() > STATE_BYTES_MAX {
            return Ok(Outcome::Refused(Refusal {
                field: "identity",
                reason: format!(
                    "the access-control book would take {} bytes, over {STATE_BYTES_MAX}",
                    value.len()
                ),
                not_found: false,
                full: true,
            }));
        }
        self.write_meta_value(STATE_KEY, version, value, "the access-control book")
            .await?;
        Ok(Outcome::Done { state, changed: true })
    }
}
