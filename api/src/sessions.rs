//! Sessions of the stateful (2025) MCP protocol versions, behind a store trait: in process in
//! dev mode; the Redis store of the production data plane implements the same trait.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// What a 2025 session remembers between requests.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Session {
    /// The `Mcp-Session-Id`.
    pub id: String,
    /// Tenant of the endpoint.
    pub tenant: String,
    /// Endpoint name.
    pub endpoint: String,
    /// Subject that initialised it; other credentials cannot use it.
    pub subject: String,
    /// Negotiated protocol version.
    pub protocol_version: String,
    /// Client name and version from `initialize`.
    pub client_name: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// The client's capabilities from `initialize`: which requests (sampling, elicitation,
    /// roots) may be sent to it.
    #[serde(default)]
    pub client_capabilities: Option<serde_json::Value>,
    /// The level set with `logging/setLevel`; log notifications below it are not relayed.
    #[serde(default)]
    pub log_level: Option<String>,
    /// Resources subscribed to with `resources/subscribe`.
    #[serde(default)]
    pub subscriptions: Vec<Subscription>,
}

/// One `resources/subscribe` of a session.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Subscription {
    /// The URI as the client named it.
    pub uri: String,
    /// The connection that serves it.
    pub connection: String,
    /// The URI as that connection's upstream names it.
    pub upstream_uri: String,
}

/// Storage of sessions, shared by every replica in production.
pub trait SessionStore: Send + Sync {
    /// Stores a new session.
    fn create(&self, session: Session) -> BoxFuture<'_, anyhow::Result<()>>;
    /// Loads a live session and extends its idle deadline.
    fn touch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, anyhow::Result<Option<Session>>>;
    /// Saves a changed session, only if it still exists (a session deleted meanwhile stays
    /// deleted); true if it was saved.
    fn save(&self, session: Session) -> BoxFuture<'_, anyhow::Result<bool>>;
    /// Ends a session; true if it existed.
    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, anyhow::Result<bool>>;
    /// Whether a session lives, without extending it.
    fn exists<'a>(&'a self, id: &'a str) -> BoxFuture<'a, anyhow::Result<bool>>;
}

/// In-process sessions with an idle timeout.
pub struct MemorySessions {
    idle: Duration,
    sessions: Mutex<HashMap<String, (Session, std::time::Instant)>>,
}

impl MemorySessions {
    /// Sessions expire after `idle` without requests.
    pub fn new(idle: Duration) -> Self {
        Self { idle, sessions: Mutex::default() }
    }
}

impl SessionStore for MemorySessions {
    fn create(&self, session: Session) -> BoxFuture<'_, anyhow::Result<()>> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        sessions.retain(|_, (_, seen)| now.duration_since(*seen) < self.idle);
        sessions.insert(session.id.clone(), (session, now));
        Box::pin(async { Ok(()) })
    }

    fn touch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, anyhow::Result<Option<Session>>> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let found = match sessions.get_mut(id) {
            Some((session, seen)) if now.duration_since(*seen) < self.idle => {
                *seen = now;
                Some(session.clone())
            }
            Some(_) => {
                sessions.remove(id);
                None
            }
            None => None,
        };
        Box::pin(async move { Ok(found) })
    }

    fn save(&self, session: Session) -> BoxFuture<'_, anyhow::Result<bool>> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let saved = match sessions.get_mut(&session.id) {
            Some((stored, seen)) => {
                *stored = session;
                *seen = std::time::Instant::now();
                true
            }
            None => false,
        };
        Box::pin(async move { Ok(saved) })
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, anyhow::Result<bool>> {
        let existed = self.sessions.lock().unwrap_or_else(|e| e.into_inner()).remove(id).is_some();
        Box::pin(async move { Ok(existed) })
    }

    fn exists<'a>(&'a self, id: &'a str) -> BoxFuture<'a, anyhow::Result<bool>> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let live = sessions.get(id).is_some_and(|(_, seen)| seen.elapsed() < self.idle);
        Box::pin(async move { Ok(live) })
    }
}

/// Sessions in Redis, shared by every replica; idle expiry is the key's TTL.
pub struct RedisSessions {
    connection: redis::aio::ConnectionManager,
    prefix: String,
    idle: Duration,
}

impl RedisSessions {
    /// Uses `connection`; keys start with `prefix`.
    pub fn new(connection: redis::aio::ConnectionManager, prefix: &str, idle: Duration) -> Self {
        Self { connection, prefix: prefix.to_string(), idle }
    }

    fn key(&self, id: &str) -> String {
        format!("{}session:{id}", self.prefix)
    }
}

const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

async fn bounded<T>(call: impl std::future::Future<Output = redis::RedisResult<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(REDIS_TIMEOUT, call)
        .await
        .map_err(|_| anyhow::anyhow!("Redis did not answer within {REDIS_TIMEOUT:?}"))?
        .map_err(anyhow::Error::from)
}

impl SessionStore for RedisSessions {
    fn create(&self, session: Session) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let body = serde_json::to_string(&session)?;
            let key = self.key(&session.id);
            bounded(redis::AsyncCommands::set_ex::<_, _, ()>(&mut connection, key, body, self.idle.as_secs().max(1)))
                .await
        })
    }

    fn touch<'a>(&'a self, id: &'a str) -> BoxFuture<'a, anyhow::Result<Option<Session>>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let mut command = redis::cmd("GETEX");
            command.arg(self.key(id)).arg("EX").arg(self.idle.as_secs().max(1));
            let body: Option<String> = bounded(command.query_async(&mut connection)).await?;
            Ok(body.and_then(|b| serde_json::from_str(&b).ok()))
        })
    }

    fn save(&self, session: Session) -> BoxFuture<'_, anyhow::Result<bool>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let body = serde_json::to_string(&session)?;
            let mut command = redis::cmd("SET");
            command.arg(self.key(&session.id)).arg(body).arg("EX").arg(self.idle.as_secs().max(1)).arg("XX");
            let reply: Option<String> = bounded(command.query_async(&mut connection)).await?;
            Ok(reply.is_some())
        })
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, anyhow::Result<bool>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let removed: i64 = bounded(redis::AsyncCommands::del(&mut connection, self.key(id))).await?;
            Ok(removed > 0)
        })
    }

    fn exists<'a>(&'a self, id: &'a str) -> BoxFuture<'a, anyhow::Result<bool>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let found: i64 = bounded(redis::AsyncCommands::exists(&mut connection, self.key(id))).await?;
            Ok(found > 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str) -> Session {
        Session {
            id: id.into(),
            tenant: "t".into(),
            endpoint: "e".into(),
            subject: "apikey:k".into(),
            protocol_version: "2025-11-25".into(),
            client_name: None,
            created_at: Utc::now(),
            client_capabilities: None,
            log_level: None,
            subscriptions: Vec::new(),
        }
    }

    #[tokio::test]
    async fn sessions_expire_when_idle_and_can_be_deleted() {
        let store = MemorySessions::new(Duration::from_millis(50));
        store.create(session("a")).await.unwrap();
        assert!(store.touch("a").await.unwrap().is_some());
        assert!(store.exists("a").await.unwrap() && !store.exists("z").await.unwrap());
        let mut changed = session("a");
        changed.log_level = Some("debug".into());
        assert!(store.save(changed).await.unwrap());
        assert_eq!(store.touch("a").await.unwrap().unwrap().log_level.as_deref(), Some("debug"));
        assert!(store.delete("a").await.unwrap());
        assert!(store.touch("a").await.unwrap().is_none());
        // A session deleted meanwhile is not brought back by a save.
        assert!(!store.save(session("a")).await.unwrap());
        assert!(store.touch("a").await.unwrap().is_none());
        store.create(session("b")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(!store.exists("b").await.unwrap(), "expired");
        assert!(store.touch("b").await.unwrap().is_none());
    }
}
