//! `phbench`'s clients, one per system compared: how each connects
//! (JetStream's stream is created here, once its meta leader is elected)
//! and what one "append" is for it (the crate docs of `phbench` list them).
//! Apart from the run loop so that the three systems' requests can be read
//! side by side.

use super::{namespace, now_us, RunArgs, System};
use std::time::{Duration, Instant};

/// One connected client of any system.
#[derive(Clone)]
pub(super) enum Target {
    Pigeonhole(pigeonhole_client::Client),
    Etcd(etcd_client::KvClient),
    Nats(async_nats::jetstream::Context),
}

impl Target {
    pub(super) async fn connect(a: &RunArgs) -> Result<Target, String> {
        Ok(match a.system {
            System::Pigeonhole => {
                let mut cfg = pigeonhole_client::ClientConfig::new(a.endpoints.clone());
                cfg.coalesce.enabled = a.coalesce;
                cfg.tls =
                    pigeonhole_client::TlsFiles::from_flags(a.tls_ca.clone(), a.tls_cert.clone(), a.tls_key.clone())?;
                let c = pigeonhole_client::Client::connect(cfg)
                    .await
                    .map_err(|e| e.to_string())?;
                Target::Pigeonhole(c)
            }
            System::Etcd => {
                let c = etcd_client::Client::connect(a.endpoints.clone(), None)
                    .await
                    .map_err(|e| e.to_string())?;
                Target::Etcd(c.kv_client())
            }
            System::Nats => {
                let addrs = a
                    .endpoints
                    .iter()
                    .map(|e| e.parse::<async_nats::ServerAddr>().map_err(|err| format!("{e}: {err}")))
                    .collect::<Result<Vec<_>, _>>()?;
                let c = async_nats::connect(addrs).await.map_err(|e| e.to_string())?;
                let js = async_nats::jetstream::new(c);
                // A fresh JetStream cluster needs a few seconds to elect its
                // meta leader before it can create a stream.
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let created = js
                        .get_or_create_stream(async_nats::jetstream::stream::Config {
                            name: "MBOX".into(),
                            subjects: vec!["mbox.>".into()],
                            num_replicas: 3,
                            storage: async_nats::jetstream::stream::StorageType::File,
                            duplicate_window: Duration::from_secs(120),
                            ..Default::default()
                        })
                        .await;
                    match created {
                        Ok(_) => break,
                        Err(e) if Instant::now() > deadline => return Err(format!("stream: {e}")),
                        Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                    }
                }
                Target::Nats(js)
            }
        })
    }

    pub(super) async fn append(&mut self, user: u64, worker: u64, n: u64, payload: &[u8]) -> Result<(), String> {
        // The first 8 bytes carry the send time, for delivery latency; the
        // rest is random, fresh for every message: real payloads are
        // end-to-end encrypted, so no store may gain from compressing them
        // (a repeated payload let RocksDB's block compression shrink
        // Pigeonhole's bytes written per append).
        let mut stamped = payload.to_vec();
        if let Some(tail) = stamped.get_mut(8..) {
            rand::RngCore::fill_bytes(&mut rand::thread_rng(), tail);
        }
        if let Some(head) = stamped.get_mut(..8) {
            head.copy_from_slice(&now_us().to_le_bytes());
        }
        let payload = stamped.as_slice();
        match self {
            Target::Pigeonhole(c) => {
                let mb = pigeonhole_client::mailbox(&namespace(), format!("user-{user}").as_bytes());
                c.append(&mb, payload.to_vec(), format!("w{worker}-{n}").into_bytes())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Target::Etcd(kv) => kv
                .put(
                    format!("m/{}/user-{user}/w{worker}-{n}", namespace()),
                    payload.to_vec(),
                    None,
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Target::Nats(js) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("{}-w{worker}-{n}", namespace()).as_str());
                let ack = js
                    .publish_with_headers(format!("mbox.user-{user}"), headers, payload.to_vec().into())
                    .await
                    .map_err(|e| e.to_string())?;
                ack.await.map(|_| ()).map_err(|e| e.to_string())
            }
        }
    }
}
