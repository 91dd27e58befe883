//! A 2025 upstream asks for client input (sampling, elicitation, roots) with a request of its
//! own in the middle of a call, and waits for the answer. A 2026-07-28 client cannot be sent
//! requests: it is answered `input_required` and retries. So the upstream call is held open in
//! the background, the client gets the upstream's request as an input request with a
//! `requestState` naming the held call (sealed by the MCP layer, so only this caller can use
//! it), and its retry's answer is posted to the upstream, which then finishes the call or asks
//! again.
//!
//! Held calls live in the process that started them; a retry reaching another replica is
//! handed to the holder over the change bus (`McpUpstream` does that), and the holder's outcome
//! comes back the same way. They end with the call, or after `HOLD_LIMIT` without a retry (then
//! the upstream is sent `notifications/cancelled`).

use super::legacy_calls::{AskClient, Refused};
use futures::future::BoxFuture;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long a held call waits for the client's retry.
pub const HOLD_LIMIT: Duration = Duration::from_secs(600);

/// The key of the one input request a held call asks at a time.
const INPUT_KEY: &str = "input";

/// Prefix of the (upstream-side) request state that names a held call.
const STATE_PREFIX: &str = "held:";

/// One request of the upstream for the client, with where its answer goes.
struct Need {
    method: String,
    params: Value,
    answer: oneshot::Sender<Result<Value, Refused>>,
}

/// Turns an upstream's requests for input into `Need`s for the held-call machinery, within what
/// the client declared it can answer.
pub struct ForwardNeeds {
    needs: mpsc::UnboundedSender<Need>,
    declared: Value,
}

impl AskClient for ForwardNeeds {
    fn ask<'a>(&'a self, method: &'a str, params: Value) -> BoxFuture<'a, Result<Value, Refused>> {
        Box::pin(async move {
            super::legacy_calls::require_declared(&self.declared, method)?;
            let (answer, answered) = oneshot::channel();
            let need = Need { method: method.to_string(), params, answer };
            if self.needs.send(need).is_err() {
                return Err(Refused { code: -32603, message: "the client is gone".into() });
            }
            answered.await.unwrap_or_else(|_| Err(Refused { code: -32603, message: "the client did not retry".into() }))
        })
    }
}

/// A call running in the background, with the upstream's pending request for input.
struct Held {
    call: tokio::task::JoinHandle<Result<Value, String>>,
    needs: mpsc::UnboundedReceiver<Need>,
    asked: Option<Need>,
    // When it is let go without a retry; each wait for the client starts a new one.
    deadline: tokio::time::Instant,
}

impl Drop for Held {
    fn drop(&mut self) {
        // Dropping the call sends notifications/cancelled upstream.
        self.call.abort();
    }
}

/// What a held call gave: its answer, or the next request for the client.
pub enum Outcome {
    /// The upstream's JSON-RPC answer, or why there is none.
    Answered(Result<Value, String>),
    /// An `input_required` result to hand to the client.
    InputRequired(Value),
    /// The call neither finished nor asked within the time given; it was cancelled.
    Waiting,
}

impl Outcome {
    /// The outcome as JSON, to send to another replica.
    pub fn to_json(&self) -> Value {
        match self {
            Outcome::Answered(Ok(answer)) => json!({ "answered": answer }),
            Outcome::Answered(Err(error)) => json!({ "failed": error }),
            Outcome::InputRequired(result) => json!({ "inputRequired": result }),
            Outcome::Waiting => json!({ "waiting": true }),
        }
    }

    /// An outcome sent by another replica; `None` when it says the call is gone.
    pub fn from_json(value: &Value) -> Option<Outcome> {
        if let Some(answer) = value.get("answered") {
            return Some(Outcome::Answered(Ok(answer.clone())));
        }
        if let Some(error) = value.get("failed") {
            return Some(Outcome::Answered(Err(error.as_str().unwrap_or("the call failed").to_string())));
        }
        if let Some(result) = value.get("inputRequired") {
            return Some(Outcome::InputRequired(result.clone()));
        }
        value.get("waiting").map(|_| Outcome::Waiting)
    }
}

/// The held calls of one upstream connection.
#[derive(Clone, Default)]
pub struct HeldCalls(Arc<Mutex<HashMap<String, Held>>>);

impl HeldCalls {
    /// Starts `call` (given the `AskClient` it must use) in the background; its answer, or its
    /// first request for input, within `limit`.
    pub async fn start<F>(&self, declared: Value, call: F, limit: Duration) -> Outcome
    where
        F: FnOnce(Arc<dyn AskClient>) -> BoxFuture<'static, Result<Value, String>>,
    {
        let (needs, receiver) = mpsc::unbounded_channel();
        let asker: Arc<dyn AskClient> = Arc::new(ForwardNeeds { needs, declared });
        let held = Held {
            call: tokio::spawn(call(asker)),
            needs: receiver,
            asked: None,
            deadline: tokio::time::Instant::now(),
        };
        self.wait(held, limit).await
    }

    /// Whether this process holds the call `handle`.
    pub fn holds(&self, handle: &str) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).contains_key(handle)
    }

    /// Whether `state` names a held call; its handle.
    pub fn handle(state: &str) -> Option<&str> {
        state.strip_prefix(STATE_PREFIX)
    }

    /// Continues the held call `handle` with the client's `responses`. A retry without the
    /// answer is asked again; an unknown handle is `None`.
    pub async fn resume(&self, handle: &str, responses: Option<&Value>, limit: Duration) -> Option<Outcome> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(handle)?;
        let answer = responses.and_then(|r| r.get(INPUT_KEY)).cloned();
        match (answer, held.asked.take()) {
            (Some(answer), Some(asked)) => {
                let _ = asked.answer.send(Ok(answer));
            }
            (None, Some(asked)) => {
                // Missing the answer: ask again, as the specification recommends.
                let result = input_required(&asked, handle);
                held.asked = Some(asked);
                self.keep(handle.to_string(), held);
                return Some(Outcome::InputRequired(result));
            }
            (_, None) => {}
        }
        Some(self.wait(held, limit).await)
    }

    async fn wait(&self, mut held: Held, limit: Duration) -> Outcome {
        let next = tokio::time::timeout(limit, async {
            tokio::select! {
                answer = &mut held.call => Ok(answer.unwrap_or_else(|e| Err(format!("the call failed: {e}")))),
                need = held.needs.recv() => Err(need),
            }
        })
        .await;
        match next {
            Err(_) => Outcome::Waiting,
            Ok(Ok(answer)) => Outcome::Answered(answer),
            // The call ended without asking (its answer comes next).
            Ok(Err(None)) => {
                Outcome::Answered((&mut held.call).await.unwrap_or_else(|e| Err(format!("the call failed: {e}"))))
            }
            Ok(Err(Some(need))) => {
                let handle = uuid::Uuid::new_v4().simple().to_string();
                let result = input_required(&need, &handle);
                held.asked = Some(need);
                self.keep(handle, held);
                Outcome::InputRequired(result)
            }
        }
    }

    fn keep(&self, handle: String, mut held: Held) {
        let deadline = tokio::time::Instant::now() + HOLD_LIMIT;
        held.deadline = deadline;
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(handle.clone(), held);
        let calls = self.0.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            let mut calls = calls.lock().unwrap_or_else(|e| e.into_inner());
            // Only if it is still the wait this timer was started for.
            if calls.get(&handle).is_some_and(|held| held.deadline == deadline) {
                calls.remove(&handle);
            }
        });
    }
}

fn input_required(need: &Need, handle: &str) -> Value {
    json!({
        "resultType": "input_required",
        "inputRequests": { INPUT_KEY: { "method": need.method, "params": need.params } },
        "requestState": format!("{STATE_PREFIX}{handle}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_cross_replicas_unchanged() {
        let outcomes = [
            Outcome::Answered(Ok(json!({"jsonrpc": "2.0", "id": 1, "result": {"content": []}}))),
            Outcome::Answered(Err("HTTP status 500".into())),
            Outcome::InputRequired(json!({"resultType": "input_required", "requestState": "held:x"})),
            Outcome::Waiting,
        ];
        for outcome in outcomes {
            let back = Outcome::from_json(&outcome.to_json()).expect("an outcome");
            assert_eq!(back.to_json(), outcome.to_json());
        }
        assert!(Outcome::from_json(&json!({"gone": true})).is_none());
    }
}
