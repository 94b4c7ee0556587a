//! Value encoding. Every stored value is framed as
//! `crc32:u32be | body`, where the crc32 (IEEE, crc32fast) covers the key
//! followed by the body. Covering the key means a value that ends up under the
//! wrong key (a misdirected write, a corrupted key) fails its check too.
//! Bodies start with a one-byte version so that each record type can evolve.
//! Layouts are in docs/storage-format.md.

use crate::error::EngineError;

/// The framed value for `body` stored under `key`.
pub(crate) fn seal(key: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + body.len());
    v.extend_from_slice(&checksum(key, body).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn checksum(key: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(key);
    h.update(body);
    h.finalize()
}

/// Checks the frame of a value read from `cf` under `key` and returns its body.
pub(crate) fn open<'v>(cf: &'static str, key: &[u8], value: &'v [u8]) -> Result<&'v [u8], EngineError> {
    let (head, body) = value.split_first_chunk::<4>().ok_or_else(|| {
        EngineError::corruption(
            cf,
            key,
            format!("value of {} bytes is too short for its checksum", value.len()),
        )
    })?;
    let stored = u32::from_be_bytes(*head);
    let actual = checksum(key, body);
    if stored != actual {
        return Err(EngineError::corruption(
            cf,
            key,
            format!("checksum mismatch: stored {stored:08x}, computed {actual:08x}"),
        ));
    }
    Ok(body)
}

/// Appends fixed-width big-endian fields to a body.
#[derive(Debug, Default)]
pub(crate) struct Writer(pub Vec<u8>);

impl Writer {
    pub fn with_version(version: u8, capacity: usize) -> Self {
        let mut v = Vec::with_capacity(1 + capacity);
        v.push(version);
        Writer(v)
    }
    pub fn u8(mut self, x: u8) -> Self {
        self.0.push(x);
        self
    }
    pub fn u32(mut self, x: u32) -> Self {
        self.0.extend_from_slice(&x.to_be_bytes());
        self
    }
    pub fn u64(mut self, x: u64) -> Self {
        self.0.extend_from_slice(&x.to_be_bytes());
        self
    }
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// Reads fixed-width fields from a body; any shortfall is a corruption error
/// naming the key.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    cf: &'static str,
    key: &'a [u8],
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Starts reading `body` and checks its version byte.
    pub fn new(cf: &'static str, key: &'a [u8], body: &'a [u8], version: u8) -> Result<Self, EngineError> {
        let mut r = Reader { cf, key, rest: body };
        let v = r.u8()?;
        if v != version {
            return Err(r.err(format!("unknown record version {v}, expected {version}")));
        }
        Ok(r)
    }
    /// Starts reading `body` whose version byte is one of `versions`;
    /// returns the reader and the version found.
    pub fn versioned(
        cf: &'static str,
        key: &'a [u8],
        body: &'a [u8],
        versions: &[u8],
    ) -> Result<(Self, u8), EngineError> {
        let mut r = Reader { cf, key, rest: body };
        let v = r.u8()?;
        if !versions.contains(&v) {
            return Err(r.err(format!("unknown record version {v}, expected one of {versions:?}")));
        }
        Ok((r, v))
    }
    pub fn err(&self, reason: String) -> EngineError {
        EngineError::corruption(self.cf, self.key, reason)
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], EngineError> {
        if self.rest.len() < n {
            return Err(self.err(format!(
                "record truncated: needed {n} more bytes, have {}",
                self.rest.len()
            )));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    pub fn u8(&mut self) -> Result<u8, EngineError> {
        Ok(self.take(1)?.first().copied().unwrap_or_default())
    }
    pub fn u32(&mut self) -> Result<u32, EngineError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes(b.try_into().map_err(|_| self.err("u32".into()))?))
    }
    pub fn u64(&mut self) -> Result<u64, EngineError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().map_err(|_| self.err("u64".into()))?))
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }
    /// Fails unless every byte was consumed.
    pub fn finish(self) -> Result<(), EngineError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.err(format!("{} trailing bytes", self.rest.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_roundtrip_and_detects_flips() {
        let v = seal(b"key", b"body");
        assert_eq!(open("data", b"key", &v).unwrap(), b"body");
        for i in 0..v.len() {
            let mut bad = v.clone();
            bad[i] ^= 0x40;
            let e = open("data", b"key", &bad).unwrap_err();
            assert!(e.to_string().contains("checksum mismatch"), "{e}");
            assert!(e.to_string().contains("6b6579"), "names the key: {e}");
        }
        // The same value under another key fails too.
        assert!(open("data", b"kez", &v).is_err());
        assert!(open("data", b"key", &v[..3]).is_err());
    }

    #[test]
    fn reader_reports_truncation() {
        let body = Writer::with_version(1, 8).u32(7).0;
        let mut r = Reader::new("data", b"k", &body, 1).unwrap();
        assert_eq!(r.u32().unwrap(), 7);
        assert!(r.u64().is_err());
        assert!(Reader::new("data", b"k", &body, 2).is_err());
    }
}
