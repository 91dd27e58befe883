//! `Idempotency-Key` for POSTs that create or execute: the same key and body within 24 h get the
//! stored response (marked `Idempotent-Replayed: true`); the same key with another body is a 422;
//! a duplicate that arrives while the first is still running gets a 409 and does not execute.
//! Keys are scoped to the caller (tenant and subject). In Redis in production, in process in dev.

use base64::Engine;
use futures::future::BoxFuture;
use portcullis_store::secret_box::SecretKey;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a response is kept for replays.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);
// A claimed key blocks duplicates for the longest a call may run (toolTimeoutSeconds is at most
// 3600) plus a margin; only a request whose pod died holds it that long.
const PENDING_TTL: Duration = Duration::from_secs(3_700);

/// A stored response.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// Content type.
    pub content_type: String,
    /// Body.
    pub body: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "state", rename_all = "lowercase")]
enum Entry {
    Pending { body_hash: String },
    Done { body_hash: String, response: StoredResponse },
}

/// What to do with a request carrying a key.
#[derive(Debug, PartialEq)]
pub enum Begin {
    /// First time: run it, then `complete` or `abandon`.
    Fresh,
    /// Answered before: send this again.
    Replay(StoredResponse),
    /// The same key is running right now.
    InFlight,
    /// The key was used with a different body.
    Mismatch,
}

/// The store cannot answer; the request is refused rather than risk running twice.
#[derive(Debug, thiserror::Error)]
#[error("the idempotency store is unavailable")]
pub struct StoreUnavailable;

/// Storage of idempotency keys.
pub trait IdempotencyStore: Send + Sync {
    /// Claims `key` for a request whose body hashes to `body_hash`.
    fn begin<'a>(&'a self, key: &'a str, body_hash: &'a str) -> BoxFuture<'a, Result<Begin, StoreUnavailable>>;
    /// Stores the response of a claimed key.
    fn complete<'a>(
        &'a self,
        key: &'a str,
        body_hash: &'a str,
        response: StoredResponse,
    ) -> BoxFuture<'a, Result<(), StoreUnavailable>>;
    /// Releases a claimed key without a response (the request may be retried).
    fn abandon<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreUnavailable>>;
}

fn decide(existing: &Entry, body_hash: &str) -> Begin {
    match existing {
        Entry::Pending { body_hash: h } | Entry::Done { body_hash: h, .. } if h != body_hash => Begin::Mismatch,
        Entry::Pending { .. } => Begin::InFlight,
        Entry::Done { response, .. } => Begin::Replay(response.clone()),
    }
}

/// In-process keys (dev mode).
#[derive(Default)]
pub struct MemoryIdempotency {
    entries: Mutex<HashMap<String, (Entry, Instant)>>,
}

impl IdempotencyStore for MemoryIdempotency {
    fn begin<'a>(&'a self, key: &'a str, body_hash: &'a str) -> BoxFuture<'a, Result<Begin, StoreUnavailable>> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        entries.retain(|_, (_, expires)| *expires > now);
        let outcome = match entries.get(key) {
            Some((entry, _)) => decide(entry, body_hash),
            None => {
                entries
                    .insert(key.to_string(), (Entry::Pending { body_hash: body_hash.to_string() }, now + PENDING_TTL));
                Begin::Fresh
            }
        };
        Box::pin(async move { Ok(outcome) })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        body_hash: &'a str,
        response: StoredResponse,
    ) -> BoxFuture<'a, Result<(), StoreUnavailable>> {
        let entry = Entry::Done { body_hash: body_hash.to_string(), response };
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), (entry, Instant::now() + RETENTION));
        Box::pin(async { Ok(()) })
    }

    fn abandon<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreUnavailable>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        Box::pin(async { Ok(()) })
    }
}

/// Keys in Redis, shared by every replica. Stored response bodies are sealed with the snapshot
/// encryption key: they can hold tool results and freshly minted API keys.
pub struct RedisIdempotency {
    connection: redis::aio::ConnectionManager,
    prefix: String,
    seal: SecretKey,
}

impl RedisIdempotency {
    /// Uses `connection`; keys start with `prefix`; bodies are sealed with `seal`.
    pub fn new(connection: redis::aio::ConnectionManager, prefix: &str, seal: SecretKey) -> Self {
        Self { connection, prefix: prefix.to_string(), seal }
    }

    fn open(&self, entry: Entry) -> Option<Entry> {
        match entry {
            Entry::Done { body_hash, mut response } => {
                let sealed = base64::engine::general_purpose::STANDARD.decode(&response.body).ok()?;
                response.body = String::from_utf8(self.seal.open(&sealed).ok()?).ok()?;
                Some(Entry::Done { body_hash, response })
            }
            pending => Some(pending),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}idem:{key}", self.prefix)
    }
}

async fn bounded<T>(call: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, StoreUnavailable> {
    match tokio::time::timeout(Duration::from_secs(1), call).await {
        Ok(Ok(value)) => Ok(value),
        _ => Err(StoreUnavailable),
    }
}

impl IdempotencyStore for RedisIdempotency {
    fn begin<'a>(&'a self, key: &'a str, body_hash: &'a str) -> BoxFuture<'a, Result<Begin, StoreUnavailable>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let pending =
                serde_json::to_string(&Entry::Pending { body_hash: body_hash.to_string() }).unwrap_or_default();
            // SET NX claims the key atomically: of two concurrent duplicates only one runs.
            let mut set = redis::cmd("SET");
            set.arg(self.key(key)).arg(pending).arg("NX").arg("EX").arg(PENDING_TTL.as_secs());
            let claimed: Option<String> = bounded(set.query_async(&mut connection)).await?;
            if claimed.is_some() {
                return Ok(Begin::Fresh);
            }
            let existing: Option<String> =
                bounded(redis::cmd("GET").arg(self.key(key)).query_async(&mut connection)).await?;
            match existing.and_then(|e| serde_json::from_str::<Entry>(&e).ok()) {
                Some(entry) => match self.open(entry) {
                    Some(entry) => Ok(decide(&entry, body_hash)),
                    // Sealed with another key (rotated): the stored answer cannot be replayed.
                    None => Err(StoreUnavailable),
                },
                // Expired in between: treat as in flight; the client retries.
                None => Ok(Begin::InFlight),
            }
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        body_hash: &'a str,
        response: StoredResponse,
    ) -> BoxFuture<'a, Result<(), StoreUnavailable>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let mut response = response;
            response.body = base64::engine::general_purpose::STANDARD.encode(self.seal.seal(response.body.as_bytes()));
            let done =
                serde_json::to_string(&Entry::Done { body_hash: body_hash.to_string(), response }).unwrap_or_default();
            let mut set = redis::cmd("SET");
            set.arg(self.key(key)).arg(done).arg("EX").arg(RETENTION.as_secs());
            bounded(set.query_async::<()>(&mut connection)).await
        })
    }

    fn abandon<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreUnavailable>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            bounded(redis::cmd("DEL").arg(self.key(key)).query_async::<()>(&mut connection)).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(body: &str) -> StoredResponse {
        StoredResponse { status: 200, content_type: "application/json".into(), body: body.into() }
    }

    #[tokio::test]
    async fn first_runs_duplicates_wait_replay_or_mismatch() {
        let store = MemoryIdempotency::default();
        assert_eq!(store.begin("k", "h1").await.unwrap(), Begin::Fresh);
        assert_eq!(store.begin("k", "h1").await.unwrap(), Begin::InFlight);
        assert_eq!(store.begin("k", "h2").await.unwrap(), Begin::Mismatch);
        store.complete("k", "h1", response("{}")).await.unwrap();
        assert_eq!(store.begin("k", "h1").await.unwrap(), Begin::Replay(response("{}")));
        assert_eq!(store.begin("k", "h2").await.unwrap(), Begin::Mismatch);
        assert_eq!(store.begin("other", "h1").await.unwrap(), Begin::Fresh);
        store.abandon("other").await.unwrap();
        assert_eq!(store.begin("other", "h1").await.unwrap(), Begin::Fresh);
    }
}
