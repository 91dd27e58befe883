//! Short-lived OAuth state (login requests, authorization codes, refresh-token families, revoked
//! token ids): in Redis in production, so every pod serves every step of a flow; in process in
//! dev mode. `take` is atomic, so a code can be redeemed once even when two pods race.

use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The store cannot answer; the flow step fails closed.
#[derive(Debug, thiserror::Error)]
#[error("the OAuth state store is unavailable")]
pub struct Unavailable;

/// Key-value state with expiry.
pub trait Ephemeral: Send + Sync {
    /// Stores `value` under `key` for `ttl`.
    fn put<'a>(&'a self, key: &'a str, value: String, ttl: Duration) -> BoxFuture<'a, Result<(), Unavailable>>;
    /// Reads `key`.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, Unavailable>>;
    /// Reads and deletes `key` in one step.
    fn take<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, Unavailable>>;
}

/// In-process state (dev mode).
#[derive(Default)]
pub struct MemoryEphemeral {
    entries: Mutex<HashMap<String, (String, Instant)>>,
}

impl Ephemeral for MemoryEphemeral {
    fn put<'a>(&'a self, key: &'a str, value: String, ttl: Duration) -> BoxFuture<'a, Result<(), Unavailable>> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        entries.retain(|_, (_, until)| *until > now);
        entries.insert(key.to_string(), (value, now + ttl));
        Box::pin(async { Ok(()) })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, Unavailable>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let found = entries.get(key).filter(|(_, until)| *until > Instant::now()).map(|(v, _)| v.clone());
        Box::pin(async move { Ok(found) })
    }

    fn take<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, Unavailable>> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let found = entries.remove(key).filter(|(_, until)| *until > Instant::now()).map(|(v, _)| v);
        Box::pin(async move { Ok(found) })
    }
}

/// State in Redis, shared by every pod.
pub struct RedisEphemeral {
    connection: redis::aio::ConnectionManager,
    prefix: String,
}

impl RedisEphemeral {
    /// Keys start with `<prefix>oauth:`.
    pub fn new(connection: redis::aio::ConnectionManager, prefix: &str) -> Self {
        Self { connection, prefix: format!("{prefix}oauth:") }
    }
}

async fn bounded<T>(call: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, Unavailable> {
    match tokio::time::timeout(Duration::from_secs(1), call).await {
        Ok(Ok(v)) => Ok(v),
        _ => Err(Unavailable),
    }
}

impl Ephemeral for RedisEphemeral {
    fn put<'a>(&'a self, key: &'a str, value: String, ttl: Duration) -> BoxFuture<'a, Result<(), Unavailable>> {
        Box::pin(async move {
            let mut c = self.connection.clone();
            let mut cmd = redis::cmd("SET");
            cmd.arg(format!("{}{key}", self.prefix)).arg(value).arg("PX").arg(ttl.as_millis().max(1) as u64);
            bounded(cmd.query_async::<()>(&mut c)).await
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, Unavailable>> {
        Box::pin(async move {
            let mut c = self.connection.clone();
            bounded(redis::cmd("GET").arg(format!("{}{key}", self.prefix)).query_async(&mut c)).await
        })
    }

    fn take<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, Unavailable>> {
        Box::pin(async move {
            let mut c = self.connection.clone();
            bounded(redis::cmd("GETDEL").arg(format!("{}{key}", self.prefix)).query_async(&mut c)).await
        })
    }
}
