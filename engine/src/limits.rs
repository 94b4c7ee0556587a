//! Every limit the engine enforces, in one place, with the validation that
//! names the offending field. The defaults are the ones documented in
//! `proto/pigeonhole/v1/mailbox.proto`; a later release makes the size limits
//! configurable per namespace, which is why they live in a value and not in
//! constants sprinkled over the code.

use crate::error::OpError;
use pigeonhole_proto::internal::v1 as cmd;

/// Size and count limits. Units are last in every name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Namespace length, bytes of `[a-z0-9._-]`.
    pub namespace_bytes_max: usize,
    /// User id length, bytes.
    pub user_id_bytes_max: usize,
    /// Idempotency key length, bytes (the minimum is 1).
    pub idempotency_key_bytes_max: usize,
    /// Payload length, bytes.
    pub payload_bytes_max: usize,
    /// Device id length, bytes (the minimum is 1).
    pub device_id_bytes_max: usize,
    /// Device cursors per mailbox.
    pub cursors_per_mailbox_max: u32,
    /// Ops in one Raft command.
    pub ops_per_command_max: usize,
    /// Dedup entries one ExpireDedup op may remove.
    pub expire_dedup_entries_max: u32,
    /// Messages one Sync page may return.
    pub sync_messages_max: u32,
    /// Default messages per Sync page.
    pub sync_messages_default: u32,
    /// Payload bytes one Sync page may return.
    pub sync_bytes_max: u32,
    /// Default payload bytes per Sync page.
    pub sync_bytes_default: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            namespace_bytes_max: 64,
            user_id_bytes_max: 256,
            idempotency_key_bytes_max: 128,
            payload_bytes_max: 1 << 20,
            device_id_bytes_max: 128,
            cursors_per_mailbox_max: 1024,
            ops_per_command_max: 4096,
            expire_dedup_entries_max: 10_000,
            sync_messages_max: 1000,
            sync_messages_default: 100,
            sync_bytes_max: 4 << 20,
            sync_bytes_default: 1 << 20,
        }
    }
}

fn invalid(field: &'static str, reason: String) -> OpError {
    OpError::InvalidArgument { field, reason }
}

impl Limits {
    /// Checks that the limits fit the storage format: lengths are stored in
    /// u8 (namespace, idempotency key) and u16 (user id) fields, so larger
    /// limits would silently truncate. Called by `Engine::open`.
    pub fn validate(&self) -> Result<(), String> {
        let fits = |name: &str, v: usize, max: usize| {
            if v == 0 || v > max {
                Err(format!("limit {name} = {v} must be 1 to {max} (storage format)"))
            } else {
                Ok(())
            }
        };
        fits("namespace_bytes_max", self.namespace_bytes_max, usize::from(u8::MAX))?;
        fits(
            "idempotency_key_bytes_max",
            self.idempotency_key_bytes_max,
            usize::from(u8::MAX),
        )?;
        fits("user_id_bytes_max", self.user_id_bytes_max, usize::from(u16::MAX))?;
        fits("payload_bytes_max", self.payload_bytes_max, 64 << 20)?;
        fits("device_id_bytes_max", self.device_id_bytes_max, 4096)?;
        fits("ops_per_command_max", self.ops_per_command_max, 1 << 20)?;
        if self.sync_messages_default == 0 || self.sync_messages_default > self.sync_messages_max {
            return Err("sync_messages_default must be 1 to sync_messages_max".into());
        }
        if self.sync_bytes_default == 0 || self.sync_bytes_default > self.sync_bytes_max {
            return Err("sync_bytes_default must be 1 to sync_bytes_max".into());
        }
        Ok(())
    }

    /// A namespace is 1..=64 bytes of `[a-z0-9._-]`.
    pub fn check_namespace(&self, ns: &str) -> Result<(), OpError> {
        const FIELD: &str = "mailbox.namespace";
        if ns.is_empty() || ns.len() > self.namespace_bytes_max {
            return Err(invalid(
                FIELD,
                format!("must be 1 to {} bytes, got {}", self.namespace_bytes_max, ns.len()),
            ));
        }
        if let Some(c) = ns
            .bytes()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')))
        {
            return Err(invalid(FIELD, format!("must match [a-z0-9._-]+, found byte 0x{c:02x}")));
        }
        Ok(())
    }

    /// A user id is 1..=256 opaque bytes.
    pub fn check_user_id(&self, uid: &[u8]) -> Result<(), OpError> {
        check_len("mailbox.user_id", uid.len(), 1, self.user_id_bytes_max)
    }

    /// Both halves of a mailbox id.
    pub fn check_mailbox(&self, ns: &str, uid: &[u8]) -> Result<(), OpError> {
        self.check_namespace(ns)?;
        self.check_user_id(uid)
    }

    /// An idempotency key is 1..=128 bytes.
    pub fn check_idempotency_key(&self, key: &[u8]) -> Result<(), OpError> {
        check_len("idempotency_key", key.len(), 1, self.idempotency_key_bytes_max)
    }

    /// A payload is 0..=1 MiB.
    pub fn check_payload(&self, payload: &[u8]) -> Result<(), OpError> {
        check_len("payload", payload.len(), 0, self.payload_bytes_max)
    }

    /// A device id is 1..=128 bytes.
    pub fn check_device_id(&self, device: &[u8]) -> Result<(), OpError> {
        check_len("device_id", device.len(), 1, self.device_id_bytes_max)
    }

    /// Every check of one client op that depends on the op alone, in the
    /// order apply makes them. Apply calls it (so every replica rejects the
    /// same ops: D6), and the serving layer calls it BEFORE proposing, so a
    /// request over a limit never reaches the Raft log. Ops only the node
    /// itself makes (PutSystem, ExpireDedup) are checked in apply only.
    pub fn check_op(&self, op: &cmd::op::Op) -> Result<(), OpError> {
        use cmd::op::Op;
        match op {
            Op::Append(a) => {
                self.check_mailbox(&a.namespace, &a.user_id)?;
                self.check_idempotency_key(&a.idempotency_key)?;
                self.check_payload(&a.payload)
            }
            Op::Ack(a) => {
                self.check_mailbox(&a.namespace, &a.user_id)?;
                self.check_device_id(&a.device_id)
            }
            Op::Trim(t) => {
                self.check_mailbox(&t.namespace, &t.user_id)?;
                check_dedup_window("trim.dedup_window_ms", t.dedup_window_ms)
            }
            Op::Delete(d) => {
                self.check_mailbox(&d.namespace, &d.user_id)?;
                check_dedup_window("delete.dedup_window_ms", d.dedup_window_ms)
            }
            Op::Retain(r) => self.check_retain(r),
            Op::Hold(h) => self.check_mailbox(&h.namespace, &h.user_id),
            Op::ExpireDedup(_) | Op::PutSystem(_) | Op::Split(_) => Ok(()),
        }
    }

    /// A retention op's bounds: what one op may examine and remove, so that
    /// one Raft entry's apply stays small whatever the policy.
    pub fn check_retain(&self, r: &cmd::RetainOp) -> Result<(), OpError> {
        self.check_namespace(&r.namespace)?;
        check_dedup_window("retain.dedup_window_ms", r.dedup_window_ms)?;
        if r.mailboxes_max == 0 || r.mailboxes_max > RETAIN_MAILBOXES_MAX {
            return Err(invalid(
                "retain.mailboxes_max",
                format!("must be 1 to {RETAIN_MAILBOXES_MAX}, got {}", r.mailboxes_max),
            ));
        }
        if r.messages_max == 0 || r.messages_max > RETAIN_MESSAGES_MAX {
            return Err(invalid(
                "retain.messages_max",
                format!("must be 1 to {RETAIN_MESSAGES_MAX}, got {}", r.messages_max),
            ));
        }
        if !r.from_mailbox.is_empty() {
            let ours = crate::keys::split_mailbox(&r.from_mailbox)
                .filter(|(_, rest)| rest.is_empty())
                .and_then(|(mb, _)| crate::keys::mailbox_namespace(mb))
                == Some(r.namespace.as_bytes());
            if !ours {
                return Err(invalid(
                    "retain.from_mailbox",
                    "must be empty or an encoded mailbox id of the op's namespace".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Mailboxes one retention op examines, at most.
pub const RETAIN_MAILBOXES_MAX: u32 = 1_000;
/// Messages one retention op removes, at most.
pub const RETAIN_MESSAGES_MAX: u32 = 10_000;
/// The longest dedup window a policy may set: 366 days, in ms.
pub const DEDUP_WINDOW_MS_MAX: u64 = 366 * 24 * 3_600 * 1_000;

fn check_dedup_window(field: &'static str, ms: u64) -> Result<(), OpError> {
    if ms > DEDUP_WINDOW_MS_MAX {
        return Err(invalid(
            field,
            format!("must be at most {DEDUP_WINDOW_MS_MAX} ms (366 days; 0 = the default), got {ms}"),
        ));
    }
    Ok(())
}

/// A 64-bit fingerprint of a mailbox id (FNV-1a over the namespace, a 0xff
/// separator that no namespace byte can be, and the user id). Apply reports
/// the fingerprints of the mailboxes it changed, so that the node wakes only
/// the readers that follow them. Two mailboxes may share a fingerprint; that
/// costs a spurious wake-up, never a missed one.
pub fn mailbox_fingerprint(namespace: &str, user_id: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in namespace.as_bytes().iter().chain(&[0xff]).chain(user_id) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

fn check_len(field: &'static str, len: usize, min: usize, max: usize) -> Result<(), OpError> {
    if len < min || len > max {
        return Err(invalid(field, format!("must be {min} to {max} bytes, got {len}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_must_fit_the_format() {
        assert!(Limits::default().validate().is_ok());
        let l = Limits {
            idempotency_key_bytes_max: 256,
            ..Limits::default()
        };
        assert!(l.validate().unwrap_err().contains("idempotency_key_bytes_max"));
        let l = Limits {
            user_id_bytes_max: 70_000,
            ..Limits::default()
        };
        assert!(l.validate().is_err());
    }

    #[test]
    fn namespace_rules() {
        let l = Limits::default();
        assert!(l.check_namespace("messenger").is_ok());
        assert!(l.check_namespace("a.b_c-9").is_ok());
        assert!(l.check_namespace(&"a".repeat(64)).is_ok());
        for bad in ["", "Messenger", "what sapp", "ns/1", "é"] {
            let err = l.check_namespace(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    OpError::InvalidArgument {
                        field: "mailbox.namespace",
                        ..
                    }
                ),
                "{bad:?}: {err}"
            );
        }
        let err = l.check_namespace(&"a".repeat(65)).unwrap_err();
        assert!(err.to_string().contains("1 to 64 bytes"), "{err}");
    }

    #[test]
    fn byte_length_limits_name_field_and_limit() {
        let l = Limits::default();
        assert!(l.check_user_id(&[0u8; 256]).is_ok());
        assert!(l.check_user_id(&[]).is_err());
        let e = l.check_user_id(&[0u8; 257]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid argument mailbox.user_id: must be 1 to 256 bytes, got 257"
        );
        assert!(l.check_idempotency_key(&[1]).is_ok());
        assert!(l.check_idempotency_key(&[0u8; 128]).is_ok());
        assert!(l.check_idempotency_key(&[]).is_err());
        assert!(l.check_idempotency_key(&[0u8; 129]).is_err());
        assert!(l.check_payload(&[]).is_ok());
        assert!(l.check_payload(&vec![0u8; 1 << 20]).is_ok());
        let e = l.check_payload(&vec![0u8; (1 << 20) + 1]).unwrap_err();
        assert!(matches!(e, OpError::InvalidArgument { field: "payload", .. }));
        assert!(l.check_device_id(&[]).is_err());
        assert!(l.check_device_id(&[0u8; 129]).is_err());
        assert!(l.check_device_id(&[0u8; 128]).is_ok());
    }

    #[test]
    fn check_op_names_the_first_broken_field() {
        let l = Limits::default();
        let append = |ns: &str, key: &[u8], payload: usize| {
            cmd::op::Op::Append(cmd::AppendOp {
                namespace: ns.into(),
                user_id: b"u".to_vec(),
                idempotency_key: key.to_vec(),
                payload: vec![0; payload].into(),
                expected_last_seq: None,
            })
        };
        assert!(l.check_op(&append("ns", b"k", 10)).is_ok());
        let field = |op| match l.check_op(&op) {
            Err(OpError::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(append("ns", b"k", (1 << 20) + 1)), "payload");
        assert_eq!(field(append("ns", b"", 10)), "idempotency_key");
        assert_eq!(field(append("NS", b"", (1 << 20) + 1)), "mailbox.namespace");
        let ack = cmd::op::Op::Ack(cmd::AckOp {
            namespace: "ns".into(),
            user_id: b"u".to_vec(),
            device_id: Vec::new(),
            seq: 1,
        });
        assert_eq!(field(ack), "device_id");
    }

    #[test]
    fn fingerprints_separate_namespace_from_user_id() {
        assert_ne!(mailbox_fingerprint("ab", b"c"), mailbox_fingerprint("a", b"bc"));
        assert_eq!(mailbox_fingerprint("ns", b"u"), mailbox_fingerprint("ns", b"u"));
    }
}
