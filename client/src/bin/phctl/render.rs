//! Printing: tables for people, JSON for scripts. Every command builds a
//! `serde_json::Value` first and a table from the same data, so the two
//! formats never disagree.

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{ContentArrangement, Table};

/// A table with a header row.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().map(|h| (*h).to_string()));
    t
}

/// Writes one line to stdout. A closed stdout (the reader of a pipe went
/// away) ends the process with 0: the reader has all it wanted.
pub fn line(s: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{s}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("phctl: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// Prints a JSON document.
pub fn json(v: &serde_json::Value) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => line(&s),
        Err(e) => eprintln!("phctl: cannot print JSON: {e}"),
    }
}

/// Bytes as text when they are printable UTF-8, else as `0x…` hex.
pub fn bytes(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if !s.is_empty() && s.chars().all(|c| !c.is_control()) => s.to_string(),
        _ => format!("0x{}", hex(b)),
    }
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A byte count for people: 1.5 MiB.
pub fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    let unit = UNITS.get(u).copied().unwrap_or("B");
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {unit}")
    }
}

/// A hash range for people: the first 4 hex digits of each end.
pub fn range(start: u64, end: Option<u64>) -> String {
    let e = end.map_or_else(|| "end".to_string(), |e| format!("{:04x}…", e >> 48));
    format!("{:04x}…–{e}", start >> 48)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humans_get_readable_values() {
        assert_eq!(bytes(b"alice"), "alice");
        assert_eq!(bytes(&[0, 255]), "0x00ff");
        assert_eq!(bytes(b""), "0x");
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(range(0, Some(1 << 62)), "0000…–4000…");
        assert_eq!(range(1 << 63, None), "8000…–end");
    }
}
