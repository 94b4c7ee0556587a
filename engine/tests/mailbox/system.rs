//! System values (the metadata rows shard 0 keeps through the same state
//! machine): versions only move forward, and a conditional write applies
//! only over the version it expects.

use super::common::*;
use pigeonhole_engine::{EngineOptions, OpError, OpOutput};

fn put_system(key: &[u8], value: &[u8], version: u64) -> pigeonhole_engine::command::Op {
    pigeonhole_engine::command::Op {
        op: Some(pigeonhole_engine::command::op::Op::PutSystem(
            pigeonhole_engine::command::PutSystemOp {
                key: key.to_vec(),
                value: value.to_vec(),
                version,
                if_version: None,
            },
        )),
    }
}

#[test]
fn system_values_only_move_forward_in_version() {
    let mut s = Shard::new();
    assert_eq!(
        s.one(put_system(b"shard/1", b"a", 3)),
        Ok(OpOutput::SystemPut { version: 3 })
    );
    // Same version: a later write of the same writer wins.
    assert_eq!(
        s.one(put_system(b"shard/1", b"b", 3)),
        Ok(OpOutput::SystemPut { version: 3 })
    );
    // Older version: refused, value unchanged.
    assert_eq!(
        s.one(put_system(b"shard/1", b"old", 2)),
        Err(OpError::StaleVersion { given: 2, stored: 3 })
    );
    s.one(put_system(b"shard/2", b"c", 1)).unwrap();
    s.one(put_system(b"other", b"d", 1)).unwrap();
    let got: Vec<(Vec<u8>, u64, Vec<u8>)> = s
        .engine()
        .system_scan(s.id, b"shard/", 10)
        .unwrap()
        .into_iter()
        .map(|v| (v.key, v.version, v.value))
        .collect();
    assert_eq!(
        got,
        vec![
            (b"shard/1".to_vec(), 3, b"b".to_vec()),
            (b"shard/2".to_vec(), 1, b"c".to_vec())
        ]
    );
    assert_eq!(s.engine().system_scan(s.id, b"shard/", 1).unwrap().len(), 1, "limit");
    // Limits name the field.
    let e = s.one(put_system(b"", b"x", 1)).unwrap_err().to_string();
    assert!(e.contains("put_system.key"), "{e}");
    let e = s.one(put_system(&[b'k'; 257], b"x", 1)).unwrap_err().to_string();
    assert!(e.contains("put_system.key") && e.contains("256"), "{e}");
    let e = s
        .one(put_system(b"k", &vec![0u8; (1 << 20) + 1], 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("put_system.value"), "{e}");
    // Survives a reopen.
    s.reopen(EngineOptions::default());
    assert_eq!(
        s.engine().system_scan(s.id, b"shard/1", 10).unwrap()[0].value,
        b"b".to_vec()
    );
}

fn put_system_if(key: &[u8], value: &[u8], version: u64, if_version: u64) -> pigeonhole_engine::command::Op {
    let mut op = put_system(key, value, version);
    if let Some(pigeonhole_engine::command::op::Op::PutSystem(p)) = &mut op.op {
        p.if_version = Some(if_version);
    }
    op
}

#[test]
fn a_conditional_system_write_applies_only_over_the_version_it_expects() {
    let mut s = Shard::new();
    // A create (expects no value) wins once; the second create is refused
    // even at an equal version, which an unconditional write would accept.
    assert_eq!(
        s.one(put_system_if(b"node/4", b"first", 1, 0)),
        Ok(OpOutput::SystemPut { version: 1 })
    );
    assert_eq!(
        s.one(put_system_if(b"node/4", b"second", 1, 0)),
        Err(OpError::VersionConflict { expected: 0, stored: 1 })
    );
    // An update over the version it read; a stale reader is refused.
    assert_eq!(
        s.one(put_system_if(b"node/4", b"update", 2, 1)),
        Ok(OpOutput::SystemPut { version: 2 })
    );
    assert_eq!(
        s.one(put_system_if(b"node/4", b"stale", 2, 1)),
        Err(OpError::VersionConflict { expected: 1, stored: 2 })
    );
    let got = s.engine().system_scan(s.id, b"node/4", 10).unwrap();
    assert_eq!((got[0].version, got[0].value.as_slice()), (2, &b"update"[..]));
}
