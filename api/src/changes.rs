//! The change bus: "what a tenant's callers see may have changed" (a new configuration, or an
//! upstream's catalog), and "a resource some session subscribed to was updated". Listen streams
//! (`subscriptions/listen`) and 2025 GET streams turn changes into `list_changed`
//! notifications, and updates into `notifications/resources/updated` for the sessions that
//! subscribed. In production the bus spans replicas through Redis
//! pub/sub, so a change one pod notices reaches clients whose stream another pod holds.

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// One change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The tenant whose callers may see something different.
    pub tenant: String,
    /// The pod the change was noticed on.
    pub origin: String,
    /// Which lists changed; all of them when unset (a configuration change, a pod that does not
    /// tell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lists: Option<Lists>,
    /// Set when this is not a list change but an update of one resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<ResourceUpdated>,
    /// Set when this is not a change at all but a 2025 client's message for the replica that
    /// holds the request it is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientMessage>,
    /// Set when this is a retry of a call held for a 2026-07-28 client on another replica, or
    /// the holding replica's answer to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<HeldMessage>,
    /// Set when this is not a change but a message for one 2025 session's GET stream (from
    /// the upstream session Portcullis keeps for it), or the news that the session ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionMessage>,
}

/// A message for one 2025 client session, whichever replica holds its GET stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionMessage {
    /// The session.
    pub session: String,
    /// A JSON-RPC message (a notification, or a request for input) for its GET stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<serde_json::Value>,
    /// The log level the session set (`logging/setLevel`), for the upstream sessions kept for
    /// it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// A resource subscription it let go (`resources/unsubscribe`), for the replica that
    /// follows it upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<ReleasedSubscription>,
    /// The session ended (DELETE): every replica lets go of what it kept for it. Explicit, so
    /// that a kind of message added later is not taken for an end.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ended: bool,
}

/// A resource subscription a 2025 session let go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReleasedSubscription {
    /// The tenant's connection.
    pub connection: String,
    /// The resource, as the upstream names it.
    pub uri: String,
}

impl SessionMessage {
    fn for_session(session: &str) -> Self {
        Self { session: session.to_string(), message: None, log_level: None, released: None, ended: false }
    }

    /// Whether it says the session ended (DELETE): every replica lets go of what it kept for
    /// it.
    pub fn ended(&self) -> bool {
        self.ended
    }
}

/// A retry of a held call (see `connectors::held_calls`) that reached a replica other than the
/// one holding the call, and what the holder answers. One exchange: the holder says it has the
/// call (`Accepted`), then sends its outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HeldMessage {
    /// The client's retry, for whichever replica holds `handle` on `connection`.
    Retry {
        /// The tenant's connection.
        connection: String,
        /// Names this exchange.
        exchange: String,
        /// The held call.
        handle: String,
        /// The retry's `inputResponses`.
        responses: Option<serde_json::Value>,
        /// How long the holder may wait for the call's next step (ms).
        limit_ms: u64,
    },
    /// `tasks/get`, `tasks/update` or `tasks/cancel` about a task Portcullis runs (see
    /// `connectors::task_runs`), for whichever replica runs it; answered with an `Outcome`
    /// (`{"answer": …}`).
    Task {
        /// The tenant's connection.
        connection: String,
        /// Names this exchange.
        exchange: String,
        /// The method.
        method: String,
        /// Its params (`taskId`, and for an update `inputResponses`).
        params: serde_json::Map<String, serde_json::Value>,
    },
    /// The holder has the call and is resuming it.
    Accepted {
        /// The exchange.
        exchange: String,
    },
    /// The holder's outcome (`held_calls::Outcome` as JSON).
    Outcome {
        /// The exchange.
        exchange: String,
        /// The outcome.
        outcome: serde_json::Value,
    },
}

/// A 2025 client's message that the replica receiving it could not deliver: an answer to a
/// request sent on another replica's stream, or a cancellation of a request running there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientMessage {
    /// The session.
    pub session: String,
    /// What it is.
    pub kind: ClientMessageKind,
    /// The answer (a JSON-RPC response), or the id of the request to cancel.
    pub message: serde_json::Value,
}

/// What a `ClientMessage` carries.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientMessageKind {
    /// An answer to a request Portcullis sent the client.
    Reply,
    /// `notifications/cancelled` of one of the client's requests.
    Cancel,
}

/// Which lists a change concerns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Lists {
    /// Tools.
    pub tools: bool,
    /// Resources and resource templates.
    pub resources: bool,
    /// Prompts.
    pub prompts: bool,
}

impl Lists {
    /// Whether any list changed.
    pub fn any(&self) -> bool {
        self.tools || self.resources || self.prompts
    }
}

/// An upstream said one of its resources changed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResourceUpdated {
    /// The tenant's connection.
    pub connection: String,
    /// The resource, as the upstream names it.
    pub uri: String,
}

/// The bus of this process.
#[derive(Clone)]
pub struct Changes {
    sender: broadcast::Sender<Change>,
    pod: String,
}

impl Changes {
    /// A bus for this pod.
    pub fn new() -> Self {
        let pod = uuid::Uuid::new_v4().simple().to_string();
        Self { sender: broadcast::channel(1024).0, pod }
    }

    /// A change of `tenant` from this pod that says nothing yet (an unqualified change: every
    /// list).
    fn noticed_here(&self, tenant: &str) -> Change {
        Change {
            tenant: tenant.to_string(),
            origin: self.pod.clone(),
            lists: None,
            updated: None,
            client: None,
            held: None,
            session: None,
        }
    }

    /// Announces a change noticed here.
    pub fn announce(&self, tenant: &str) {
        let _ = self.sender.send(self.noticed_here(tenant));
    }

    /// Announces that some of the lists a tenant's callers see may have changed.
    pub fn announce_lists(&self, tenant: &str, lists: Lists) {
        let _ = self.sender.send(Change { lists: Some(lists), ..self.noticed_here(tenant) });
    }

    /// Hands a client's message to the other replicas (one of them holds what it is about).
    pub fn forward_client_message(&self, tenant: &str, message: ClientMessage) {
        let _ = self.sender.send(Change { client: Some(message), ..self.noticed_here(tenant) });
    }

    /// Sends a message about a held call to the other replicas.
    pub fn send_held(&self, tenant: &str, message: HeldMessage) {
        let _ = self.sender.send(Change { held: Some(message), ..self.noticed_here(tenant) });
    }

    /// Sends `message` (a notification) to the GET stream of 2025 session `session`.
    pub fn send_to_session(&self, tenant: &str, session: &str, message: serde_json::Value) {
        let session = SessionMessage { message: Some(message), ..SessionMessage::for_session(session) };
        self.send_session_message(tenant, session);
    }

    /// Tells every replica that 2025 session `session` ended.
    pub fn end_session(&self, tenant: &str, session: &str) {
        self.send_session_message(tenant, SessionMessage { ended: true, ..SessionMessage::for_session(session) });
    }

    /// Tells every replica that 2025 session `session` set its log level.
    pub fn set_session_level(&self, tenant: &str, session: &str, level: &str) {
        let session = SessionMessage { log_level: Some(level.to_string()), ..SessionMessage::for_session(session) };
        self.send_session_message(tenant, session);
    }

    /// Tells the replica that follows it that 2025 session `session` let go of its subscription
    /// to `uri` of `connection`.
    pub fn release_subscription(&self, tenant: &str, session: &str, connection: &str, uri: &str) {
        let released = ReleasedSubscription { connection: connection.to_string(), uri: uri.to_string() };
        let session = SessionMessage { released: Some(released), ..SessionMessage::for_session(session) };
        self.send_session_message(tenant, session);
    }

    fn send_session_message(&self, tenant: &str, session: SessionMessage) {
        // `lists` says "none": a replica that predates session messages takes this for a change
        // of nothing instead of a change of every list.
        let change = Change { session: Some(session), lists: Some(Lists::default()), ..self.noticed_here(tenant) };
        let _ = self.sender.send(change);
    }

    /// Whether `change` says what a tenant's callers see may have changed (a configuration or
    /// catalog change, or a resource update), rather than carrying a message for someone.
    pub fn is_change(change: &Change) -> bool {
        change.client.is_none() && change.held.is_none() && change.session.is_none()
    }

    /// Whether `change` was announced by this pod.
    pub fn is_local(&self, change: &Change) -> bool {
        change.origin == self.pod
    }

    /// Announces that `connection` of `tenant` updated its resource `uri`.
    pub fn announce_updated(&self, tenant: &str, connection: &str, uri: &str) {
        let updated = ResourceUpdated { connection: connection.to_string(), uri: uri.to_string() };
        let _ = self.sender.send(Change { updated: Some(updated), ..self.noticed_here(tenant) });
    }

    /// Receives every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.sender.subscribe()
    }

    /// Relays changes between this pod and the others through Redis pub/sub on `channel`:
    /// local ones out, remote ones in. Reconnects by itself.
    pub async fn relay(self, client: redis::Client, channel: String) {
        use futures::StreamExt;
        loop {
            let mut outgoing = self.subscribe();
            let publisher = match client.get_multiplexed_async_connection().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "Change relay cannot reach Redis; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut pubsub = match client.get_async_pubsub().await {
                Ok(p) => p,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            if pubsub.subscribe(&channel).await.is_err() {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            let mut incoming = pubsub.on_message();
            loop {
                tokio::select! {
                    local = outgoing.recv() => match local {
                        Ok(change) if change.origin == self.pod => {
                            let mut p = publisher.clone();
                            let text = serde_json::to_string(&change).unwrap_or_default();
                            let _: Result<i64, _> = redis::cmd("PUBLISH").arg(&channel).arg(text).query_async(&mut p).await;
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    remote = incoming.next() => match remote {
                        Some(message) => {
                            let payload: String = message.get_payload().unwrap_or_default();
                            if let Ok(change) = serde_json::from_str::<Change>(&payload)
                                && change.origin != self.pod
                            {
                                let _ = self.sender.send(change);
                            }
                        }
                        None => break,
                    },
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

impl Default for Changes {
    fn default() -> Self {
        Self::new()
    }
}
