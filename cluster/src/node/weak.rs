//! A weak handle on a node, for its background tasks (the size checker):
//! the node stops when the last [`Node`] goes, whatever tasks still run.

use super::{Node, NodeInner};
use std::sync::Arc;

/// A handle that does not keep the node running (for its background
/// tasks: the node stops when the last [`Node`] goes).
#[derive(Clone)]
pub struct WeakNode {
    inner: std::sync::Weak<NodeInner>,
}

impl std::fmt::Debug for WeakNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeakNode").finish_non_exhaustive()
    }
}

impl WeakNode {
    /// The node, if it still runs.
    pub fn upgrade(&self) -> Option<Node> {
        self.inner.upgrade().map(|inner| Node { inner })
    }
}

impl Node {
    /// A handle that does not keep the node running.
    pub fn downgrade(&self) -> WeakNode {
        WeakNode {
            inner: Arc::downgrade(&self.inner),
        }
    }
}
