//! The routing tier's use of Pigeonhole in one page: append with an
//! idempotency key (and retry it safely), read from a cursor, acknowledge,
//! and follow a mailbox live.
//!
//! Start a server (`scripts/run`, or `scripts/local-cluster` for three
//! nodes), then:
//!
//! ```text
//! cargo run -p pigeonhole-client --example quickstart
//! PIGEONHOLE_ENDPOINTS=127.0.0.1:7071 cargo run -p pigeonhole-client --example quickstart
//! ```

use pigeonhole_client::{mailbox, new_idempotency_key, Client, ClientConfig, Event, SyncOptions};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoints = std::env::var("PIGEONHOLE_ENDPOINTS").unwrap_or_else(|_| "127.0.0.1:7070".into());
    let client = Client::connect(ClientConfig::new(endpoints.split(','))).await?;
    let inbox = mailbox("messenger", b"alice");

    // Append. The key makes a retry safe: a second call with the same key
    // returns the first call's seq instead of storing a copy.
    let key = new_idempotency_key();
    let first = client.append(&inbox, b"ciphertext #1".to_vec(), key.clone()).await?;
    let again = client.append(&inbox, b"ciphertext #1".to_vec(), key).await?;
    assert_eq!(first.seq, again.seq);
    println!("appended seq {} (retry: duplicate = {})", first.seq, again.duplicate);

    // Sync from a cursor: everything after seq N.
    let page = client.sync(&inbox, first.seq - 1, SyncOptions::default()).await?;
    println!(
        "sync after {}: {} message(s), last seq {}",
        first.seq - 1,
        page.messages.len(),
        page.last_seq
    );

    // A device acknowledges what it has.
    client.ack(&inbox, b"alice-phone", first.seq).await?;

    // Follow the mailbox: this delivers every message after the cursor
    // exactly once, in order, and resumes by itself if a node fails.
    let mut sub = client.subscribe(vec![(inbox.clone(), first.seq)], 0)?;
    client
        .append(&inbox, b"ciphertext #2".to_vec(), new_idempotency_key())
        .await?;
    if let Ok(Some(Ok(Event::Messages { messages, .. }))) =
        tokio::time::timeout(Duration::from_secs(5), sub.next()).await
    {
        for m in messages {
            println!("live: seq {} ({} bytes)", m.seq, m.payload.len());
        }
    }
    Ok(())
}
