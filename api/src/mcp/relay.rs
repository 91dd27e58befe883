//! What reaches the caller while its request runs, on the request's own event stream: the
//! upstream's notifications about it (progress, log messages) and, for a 2025 session, requests
//! to the client (sampling, elicitation, roots) whose answers the client POSTs back.
//!
//! A request that may hear something before its answer (`may_stream` in `mcp`), from a client
//! that accepts an event stream, runs beside a channel for those messages; as long as nothing
//! is sent before the answer, the answer goes as a plain response. The first message turns the
//! response into an event stream that carries the messages and then the answer. Closing that
//! stream cancels the request (the 2026-07-28 rule; a dropped call to a 2025 upstream sends it
//! `notifications/cancelled`), and the request is audited either way.
//!
//! Answers and cancellations a 2025 client sends to another replica reach this one over the
//! change bus (`deliver_forwarded`).

use super::protocol::{self, RpcError};
use crate::connectors::NotificationSink;
use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use futures::FutureExt;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Requests sent to 2025 clients that wait for the client's answer, by session and request id.
/// The answer must reach the replica that holds the request's stream: this is per process.
#[derive(Clone, Default)]
pub struct PendingReplies(Arc<Mutex<HashMap<ReplyKey, oneshot::Sender<Value>>>>);

/// A waiting request: (session id, request id).
type ReplyKey = (String, String);

impl PendingReplies {
    /// Delivers a client's answer (a JSON-RPC response POSTed on `session`); the answer comes
    /// back when no request of that session waits for it here.
    pub fn deliver(&self, session: &str, reply: Value) -> Result<(), Value> {
        let id = match reply.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => return Err(reply),
        };
        let waiting = self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&(session.to_string(), id));
        match waiting {
            Some(waiting) => waiting.send(reply),
            None => Err(reply),
        }
    }

    /// Waits for the answer to request `id` sent to the client of `session`: the answer
    /// arrives on the receiver while the guard is held.
    pub fn expect(&self, session: &str, id: &str) -> (Waiting<'_>, oneshot::Receiver<Value>) {
        let (answer, answered) = oneshot::channel();
        let key = (session.to_string(), id.to_string());
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), answer);
        (Waiting { pending: self, key }, answered)
    }
}

/// Removes a waiting request when its wait ends, however it ends.
pub struct Waiting<'a> {
    pending: &'a PendingReplies,
    key: ReplyKey,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.pending.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

/// Requests of 2025 sessions in progress on this replica, by session and request id, so that
/// the client's `notifications/cancelled` can stop them.
#[derive(Clone, Default)]
pub struct InFlight(Arc<Mutex<HashMap<ReplyKey, oneshot::Sender<()>>>>);

/// A request registered in `InFlight`; dropping it unregisters.
pub struct Running<'a> {
    in_flight: &'a InFlight,
    key: ReplyKey,
    /// Resolves when the client cancels the request.
    pub cancelled: oneshot::Receiver<()>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.in_flight.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

impl InFlight {
    /// Registers request `id` (its JSON text) of `session`.
    pub fn start(&self, session: &str, id: &Value) -> Running<'_> {
        let (cancel, cancelled) = oneshot::channel();
        let key = (session.to_string(), id.to_string());
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), cancel);
        Running { in_flight: self, key, cancelled }
    }

    /// Cancels request `id` of `session`; false when it is not running here.
    pub fn cancel(&self, session: &str, id: &Value) -> bool {
        let running = self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&(session.to_string(), id.to_string()));
        running.is_some_and(|r| r.send(()).is_ok())
    }
}

/// Messages a request's stream holds for a client that reads slowly; notifications beyond it
/// are dropped (requests to the client wait for room).
const STREAM_BUFFER: usize = 256;

/// The sending side of one request's stream.
#[derive(Clone)]
pub struct Relay {
    messages: mpsc::Sender<Value>,
}

impl Relay {
    /// Where the upstream's notifications about this request go, given what the caller asked
    /// for (`_meta.progressToken`, its log level).
    pub fn sink(&self, params: &Value, log_level: Option<&str>) -> NotificationSink {
        let progress_token = params
            .get("_meta")
            .and_then(|m| m.get("progressToken"))
            .filter(|t| t.is_string() || t.is_number())
            .cloned();
        NotificationSink::new(self.messages.clone(), progress_token, log_level)
    }

    /// Sends `method` to the client of 2025 session `session` and waits (at most `timeout`) for
    /// its result.
    pub async fn ask(
        &self,
        pending: &PendingReplies,
        session: &str,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, RpcError> {
        let id = format!("portcullis-{}", uuid::Uuid::new_v4().simple());
        let (_waiting, answered) = pending.expect(session, &id);
        let request = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        if self.messages.send(request).await.is_err() {
            return Err(RpcError::internal("the client's stream closed"));
        }
        let reply = match tokio::time::timeout(timeout, answered).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => return Err(RpcError::internal("the client's stream closed")),
            Err(_) => {
                return Err(RpcError::internal(format!(
                    "the client did not answer {method} within {} s",
                    timeout.as_secs()
                )));
            }
        };
        if let Some(result) = reply.get("result") {
            return Ok(result.clone());
        }
        let message = reply.get("error").and_then(|e| e.get("message")).and_then(Value::as_str).unwrap_or("no reason");
        Err(RpcError::internal(format!("the client refused {method}: {message}")))
    }
}

/// The client of a 2025 session, asked on the stream of one of its requests for what an
/// upstream needs (sampling, elicitation, roots), within what it declared at `initialize`.
pub struct SessionClient {
    /// The request's stream.
    pub relay: Relay,
    /// Where its answers arrive.
    pub pending: PendingReplies,
    /// The session.
    pub session: String,
    /// Its capabilities from `initialize`.
    pub declared: Value,
    /// How long it may take to answer.
    pub timeout: Duration,
}

impl crate::connectors::AskClient for SessionClient {
    fn ask<'a>(
        &'a self,
        method: &'a str,
        params: Value,
    ) -> futures::future::BoxFuture<'a, Result<Value, crate::connectors::Refused>> {
        Box::pin(async move {
            crate::connectors::legacy_calls::require_declared(&self.declared, method)?;
            self.relay
                .ask(&self.pending, &self.session, method, params, self.timeout)
                .await
                .map_err(|e| crate::connectors::Refused { code: e.code, message: e.message })
        })
    }
}

/// Runs a request that may stream: `work` gets the relay and the signal that the client went
/// away; the answer is a plain response unless something was relayed before it.
pub async fn run<W>(work: W) -> Response
where
    W: FnOnce(Relay, oneshot::Receiver<()>) -> futures::future::BoxFuture<'static, Response>,
{
    let (messages, mut relayed) = mpsc::channel(STREAM_BUFFER);
    let (client_gone, gone) = oneshot::channel::<()>();
    // Run in this task, not a task of its own: a spawned task would cost a wake-up and a
    // hand-over per request, most of which relay nothing.
    let mut work = work(Relay { messages }, gone);
    let first = tokio::select! {
        biased;
        Some(first) = relayed.recv() => Some(first),
        answer = &mut work => {
            match relayed.try_recv() {
                Ok(first) => {
                    return stream(Some(first), relayed, futures::future::ready(answer).boxed(), client_gone);
                }
                Err(_) => return answer,
            }
        }
    };
    stream(first, relayed, work, client_gone)
}

/// The event stream of relayed messages, then the answer. Dropping it (the client closed the
/// connection) drops `client_gone`, which cancels the request.
fn stream(
    first: Option<Value>,
    relayed: mpsc::Receiver<Value>,
    answer: futures::future::BoxFuture<'static, Response>,
    client_gone: oneshot::Sender<()>,
) -> Response {
    struct State {
        first: Option<Value>,
        relayed: mpsc::Receiver<Value>,
        answer: Option<futures::future::BoxFuture<'static, Response>>,
        _client_gone: oneshot::Sender<()>,
    }
    let state = State { first, relayed, answer: Some(answer), _client_gone: client_gone };
    let body = futures::stream::unfold(state, |mut state| async move {
        if let Some(first) = state.first.take() {
            return Some((Ok::<_, std::io::Error>(protocol::sse_event(&first)), state));
        }
        let answer = state.answer.as_mut()?;
        tokio::select! {
            biased;
            Some(message) = state.relayed.recv() => Some((Ok(protocol::sse_event(&message)), state)),
            response = answer => {
                state.answer = None;
                // What was relayed before the answer goes before it.
                let mut bytes = Vec::new();
                while let Ok(message) = state.relayed.try_recv() {
                    bytes.extend_from_slice(&protocol::sse_event(&message));
                }
                bytes.extend_from_slice(&as_event(response).await);
                Some((Ok(Bytes::from(bytes)), state))
            }
        }
    });
    let mut response = Body::from_stream(body).into_response();
    protocol::event_stream_headers(&mut response);
    response
}

/// The answer (a JSON-RPC message framed as JSON or as an event stream) as one event.
async fn as_event(response: Response) -> Bytes {
    let event_stream = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap_or_default();
    if event_stream {
        return body;
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(message) => protocol::sse_event(&message),
        Err(_) => protocol::sse_event(&protocol::response_message(
            &Value::Null,
            &Err(RpcError::internal("the request failed")),
        )),
    }
}

/// Delivers the client messages other replicas forward (answers to requests sent on a stream
/// this replica holds, cancellations of requests running here). Runs for the process's life.
pub async fn deliver_forwarded(app: std::sync::Weak<crate::state::Inner>) {
    let Some(mut changes) = app.upgrade().map(|app| app.changes.subscribe()) else { return };
    loop {
        match changes.recv().await {
            Ok(change) => {
                let Some(app) = app.upgrade() else { return };
                if app.changes.is_local(&change) {
                    continue;
                }
                if let Some(message) = change.session {
                    // A session ended, or let go of a subscription this replica may follow. Not
                    // awaited here: letting go upstream must not hold up clients' answers.
                    tokio::spawn(async move { super::subscriptions::handle(&app, &message).await });
                    continue;
                }
                let Some(client) = change.client else { continue };
                match client.kind {
                    crate::changes::ClientMessageKind::Reply => {
                        let _ = app.client_replies.deliver(&client.session, client.message);
                    }
                    crate::changes::ClientMessageKind::Cancel => {
                        app.in_flight.cancel(&client.session, &client.message);
                    }
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_reaches_only_the_request_waiting_for_it() {
        let pending = PendingReplies::default();
        let (messages, mut sent) = mpsc::channel(16);
        let relay = Relay { messages };
        let asking = {
            let pending = pending.clone();
            tokio::spawn(
                async move { relay.ask(&pending, "s1", "roots/list", json!({}), Duration::from_secs(5)).await },
            )
        };
        let request = sent.recv().await.unwrap();
        assert_eq!(request["method"], json!("roots/list"));
        let id = request["id"].clone();
        // Another session's answer with the same id, and an unknown id, reach nothing.
        assert!(pending.deliver("s2", json!({"id": id, "result": {"roots": []}})).is_err());
        assert!(pending.deliver("s1", json!({"id": "other", "result": {}})).is_err());
        assert!(pending.deliver("s1", json!({"id": id, "result": {"roots": [{"uri": "file:///x"}]}})).is_ok());
        let result = asking.await.unwrap().unwrap();
        assert_eq!(result["roots"][0]["uri"], json!("file:///x"));
        // Answered once; a second answer finds nobody waiting.
        assert!(pending.deliver("s1", json!({"id": id, "result": {}})).is_err());
    }

    #[tokio::test]
    async fn a_refusal_and_a_silent_client_are_errors() {
        let pending = PendingReplies::default();
        let (messages, mut sent) = mpsc::channel(16);
        let relay = Relay { messages };
        let waiting = pending.clone();
        let refused = tokio::spawn({
            let relay = relay.clone();
            async move { relay.ask(&waiting, "s", "elicitation/create", json!({}), Duration::from_secs(5)).await }
        });
        let id = sent.recv().await.unwrap()["id"].clone();
        let _ = pending.deliver("s", json!({"id": id, "error": {"code": -1, "message": "user declined"}}));
        let error = refused.await.unwrap().unwrap_err();
        assert!(error.message.contains("user declined"), "{}", error.message);
        let silent = relay.ask(&pending, "s", "roots/list", json!({}), Duration::from_millis(50)).await.unwrap_err();
        assert!(silent.message.contains("did not answer"), "{}", silent.message);
        assert!(pending.0.lock().unwrap().is_empty(), "waiting requests are cleaned up");
    }
}
