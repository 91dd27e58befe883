//! Which 2025 sessions' resource subscriptions this replica follows upstream. A
//! `resources/subscribe` is followed by the replica that served it (its upstream connection
//! counts one subscription more); the session record says what the session subscribed to, for
//! whichever replica holds its GET stream. Letting go must reach the replica that follows: an
//! unsubscribe served elsewhere, and the session's end, are handed over the change bus; a
//! session that expires without either is noticed by a sweep (`SessionStore::exists`).

use crate::state::Inner;
use std::collections::HashMap;
use std::sync::{Mutex, Weak};
use std::time::Duration;

/// How often followed sessions are checked for expiry.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// A session's tenant and its followed (connection, upstream URI) pairs.
type SessionSubscriptions = (String, Vec<(String, String)>);

/// The subscriptions this replica follows, by session.
#[derive(Default)]
pub struct Followed(Mutex<HashMap<String, SessionSubscriptions>>);

impl Followed {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionSubscriptions>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that this replica subscribed upstream on behalf of `session`.
    pub fn add(&self, tenant: &str, session: &str, connection: &str, uri: &str) {
        let mut entries = self.entries();
        let (_, followed) = entries.entry(session.to_string()).or_insert_with(|| (tenant.to_string(), Vec::new()));
        followed.push((connection.to_string(), uri.to_string()));
    }

    /// Takes one subscription of `session`, if this replica follows it; its tenant.
    fn take_one(&self, session: &str, connection: &str, uri: &str) -> Option<String> {
        let mut entries = self.entries();
        let (tenant, followed) = entries.get_mut(session)?;
        let index = followed.iter().position(|(c, u)| c == connection && u == uri)?;
        followed.remove(index);
        let tenant = tenant.clone();
        if followed.is_empty() {
            entries.remove(session);
        }
        Some(tenant)
    }

    /// Takes every subscription of `session` this replica follows.
    fn take_all(&self, session: &str) -> Option<SessionSubscriptions> {
        self.entries().remove(session)
    }

    /// How many subscriptions this replica follows.
    #[cfg(test)]
    fn count(&self) -> usize {
        self.entries().values().map(|(_, followed)| followed.len()).sum()
    }
}

/// Lets go upstream of `subscriptions` of `tenant`.
async fn unsubscribe(app: &Inner, tenant: &str, subscriptions: Vec<(String, String)>) {
    for (connection, uri) in subscriptions {
        if let Some(upstream) = app.upstreams.get(tenant, &connection) {
            upstream.unsubscribe(&uri).await;
        }
    }
}

/// Ends one subscription of `session` (a `resources/unsubscribe`): here if this replica follows
/// it, else by the replica that does (over the change bus).
pub async fn release(app: &Inner, tenant: &str, session: &str, connection: &str, uri: &str) {
    match app.followed.take_one(session, connection, uri) {
        Some(tenant) => unsubscribe(app, &tenant, vec![(connection.to_string(), uri.to_string())]).await,
        None => app.changes.release_subscription(tenant, session, connection, uri),
    }
}

/// Ends every subscription this replica follows for `session` (it ended).
pub async fn release_all(app: &Inner, session: &str) {
    if let Some((tenant, subscriptions)) = app.followed.take_all(session) {
        unsubscribe(app, &tenant, subscriptions).await;
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
        && let Some(tenant) = app.followed.take_one(&message.session, &released.connection, &released.uri)
    {
        unsubscribe(app, &tenant, vec![(released.connection.clone(), released.uri.clone())]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriptions_are_taken_once_per_session() {
        let followed = Followed::default();
        followed.add("t", "s1", "c", "u1");
        followed.add("t", "s1", "c", "u2");
        followed.add("t", "s2", "c", "u1");
        assert_eq!(followed.count(), 3);
        assert_eq!(followed.take_one("s1", "c", "u1").as_deref(), Some("t"));
        assert_eq!(followed.take_one("s1", "c", "u1"), None, "taken once");
        assert_eq!(followed.take_one("s3", "c", "u1"), None, "not followed here");
        assert_eq!(followed.take_all("s1"), Some(("t".to_string(), vec![("c".to_string(), "u2".to_string())])));
        assert_eq!(followed.take_all("s1"), None);
        assert_eq!(followed.count(), 1);
    }
}
