//! Which 2025 sessions' resource subscriptions this replica follows upstream. A
//! `resources/subscribe` is followed by the replica that served it (its upstream connection
//! counts one subscription more); the session record says what the session subscribed to, for
//! whichever replica holds its GET stream. Letting go must reach the replica that follows: an
//! unsubscribe served elsewhere, and the session's end, are handed over the change bus; a
//! session that expires without either is noticed by a sweep (`SessionStore::exists`).

use crate::connectors::McpUpstream;
use crate::state::Inner;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// How often followed sessions are checked for expiry.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// One followed subscription: the connection (the very one that subscribed: a connection
/// replaced since took its subscriptions with it) and the URI as its upstream names it.
struct Subscription {
    connection: String,
    uri: String,
    upstream: Weak<McpUpstream>,
}

/// A session's followed subscriptions.
type SessionSubscriptions = Vec<Subscription>;

/// The subscriptions this replica follows, by session.
#[derive(Default)]
pub struct Followed(Mutex<HashMap<String, SessionSubscriptions>>);

impl Followed {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionSubscriptions>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that this replica subscribed to `uri` of `upstream` on behalf of `session`.
    pub fn add(&self, session: &str, upstream: &Arc<McpUpstream>, uri: &str) {
        let subscription = Subscription {
            connection: upstream.name.clone(),
            uri: uri.to_string(),
            upstream: Arc::downgrade(upstream),
        };
        self.entries().entry(session.to_string()).or_default().push(subscription);
    }

    /// Takes one subscription of `session`, if this replica follows it.
    fn take_one(&self, session: &str, connection: &str, uri: &str) -> Option<Subscription> {
        let mut entries = self.entries();
        let followed = entries.get_mut(session)?;
        let index = followed.iter().position(|s| s.connection == connection && s.uri == uri)?;
        let taken = followed.remove(index);
        if followed.is_empty() {
            entries.remove(session);
        }
        Some(taken)
    }

    /// Takes every subscription of `session` this replica follows.
    fn take_all(&self, session: &str) -> Option<SessionSubscriptions> {
        self.entries().remove(session)
    }

    /// How many subscriptions this replica follows.
    #[cfg(test)]
    fn count(&self) -> usize {
        self.entries().values().map(Vec::len).sum()
    }
}

/// Lets go upstream of `subscriptions` (those of a connection since replaced went with it).
async fn unsubscribe(subscriptions: Vec<Subscription>) {
    for subscription in subscriptions {
        if let Some(upstream) = subscription.upstream.upgrade() {
            upstream.unsubscribe(&subscription.uri).await;
        }
    }
}

/// Ends one subscription of `session` (a `resources/unsubscribe`): here if this replica follows
/// it, else by the replica that does (over the change bus).
pub async fn release(app: &Inner, tenant: &str, session: &str, connection: &str, uri: &str) {
    match app.followed.take_one(session, connection, uri) {
        Some(subscription) => unsubscribe(vec![subscription]).await,
        None => app.changes.release_subscription(tenant, session, connection, uri),
    }
}

/// Ends every subscription this replica follows for `session` (it ended).
pub async fn release_all(app: &Inner, session: &str) {
    if let Some(subscriptions) = app.followed.take_all(session) {
        unsubscribe(subscriptions).await;
    }
}

/// Lets go of the subscriptions of sessions that expired, now and then, for the process's life.
pub async fn sweep(app: Weak<Inner>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(app) = app.upgrade() else { return };
        let sessions: Vec<String> = app.followed.entries().keys().cloned().collect();
        for session in sessions {
            // When the store cannot tell, the subscriptions stay until the next sweep.
            if matches!(app.sessions.exists(&session).await, Ok(false)) {
                release_all(&app, &session).await;
            }
        }
    }
}

/// Handles what other replicas say about followed subscriptions (a session ended, one
/// subscription let go).
pub async fn handle(app: &Inner, message: &crate::changes::SessionMessage) {
    if message.ended() {
        release_all(app, &message.session).await;
    } else if let Some(released) = &message.released
        && let Some(subscription) = app.followed.take_one(&message.session, &released.connection, &released.uri)
    {
        unsubscribe(vec![subscription]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn followed(connection: &str, uri: &str) -> Subscription {
        Subscription { connection: connection.into(), uri: uri.into(), upstream: Weak::new() }
    }

    #[test]
    fn subscriptions_are_taken_once_per_session() {
        let all = Followed::default();
        for (session, uri) in [("s1", "u1"), ("s1", "u2"), ("s2", "u1")] {
            all.entries().entry(session.to_string()).or_default().push(followed("c", uri));
        }
        assert_eq!(all.count(), 3);
        assert!(all.take_one("s1", "c", "u1").is_some());
        assert!(all.take_one("s1", "c", "u1").is_none(), "taken once");
        assert!(all.take_one("s3", "c", "u1").is_none(), "not followed here");
        let rest: Vec<String> = all.take_all("s1").expect("s1").into_iter().map(|s| s.uri).collect();
        assert_eq!(rest, ["u2"]);
        assert!(all.take_all("s1").is_none());
        assert_eq!(all.count(), 1);
    }
}
