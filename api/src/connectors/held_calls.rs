//! A 2025 upstream asks for client input (sampling, elicitation, roots) with a request of its
//! own in the middle of a call, and waits for the answer. A 2026-07-28 client cannot be sent
//! requests: it is answered `input_required` and retries. So the upstream call is held open in
//! the background, the client gets the upstream's request as an input request with a
//! `requestState` naming the held call (sealed by the MCP layer, so only this caller can use
//! it), and its retry's answer is posted to the upstream, which then finishes the call or asks
//! again.
//!
//! A server may ask several things at once (its requests arrive together): they are handed to
//! the client in one `input_required`, keyed `input`, `input-2`, …, and each answer goes back to
//! its request. A request for something the client did not declare it can answer ends the call
//! with -32021 (missing required client capability), as a 2026-07-28 server answers.
//!
//! A call of a tool that asks for its input before its task (`runAsTasks.inputFirst`) is held
//! the same way, but only while it asks: once it has its answers and works on without asking
//! for `ASK_FIRST_WITHIN`, or finishes, it becomes a task Portcullis runs (`task_runs`) and the
//! client gets the task instead.
//!
//! Held calls live in the process that started them; a retry reaching another replica is
//! handed to the holder over the change bus (`McpUpstream` does that), and the holder's outcome
//! comes back the same way. They end with the call, or after `HOLD_LIMIT` without a retry (then
//! the upstream is sent `notifications/cancelled`).

use super::legacy_calls::{AskClient, Refused, capability_for, declares};
use futures::future::BoxFuture;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long a held call waits for the client's retry.
pub const HOLD_LIMIT: Duration = Duration::from_secs(600);

/// How long after a first request for input others are taken as sent with it. Requests sent
/// together arrive within microseconds; this only delays an `input_required`, which waits on a
/// person anyway.
const GATHER_WITHIN: Duration = Duration::from_millis(50);

/// The key of the `index`th request asked at once: `input`, `input-2`, …
fn input_key(index: usize) -> String {
    if index == 0 { "input".to_string() } else { format!("input-{}", index + 1) }
}

/// The `_meta` key with which a 2025 server may name a request for input: a 2026-07-28 client
/// sees the request under that key (the one the server's 2026-07-28 form would use), and may
/// answer it under that key before being asked.
pub const INPUT_KEY_META: &str = "portcullis.dev/inputKey";

/// The key the server named `need` with (`_meta["portcullis.dev/inputKey"]`: 1 to 64 letters,
/// digits, `_`, `-`, `.`), taken off the request the client sees.
fn named_key(need: &mut Need) -> Option<String> {
    let params = need.params.as_object_mut()?;
    let meta = params.get_mut("_meta")?.as_object_mut()?;
    let named = meta.remove(INPUT_KEY_META)?;
    if meta.is_empty() {
        params.remove("_meta");
    }
    let key = named.as_str()?;
    let valid =
        (1..=64).contains(&key.len()) && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    valid.then(|| key.to_string())
}

/// Keys for `needs` asked together: each the one its server named it with, unless `taken` or
/// used by another of them, else the next of `fallback` that is free. With each, whether the
/// server named it (only such a key can have been answered before being asked).
pub(super) fn keyed(
    needs: Vec<Need>,
    taken: impl Fn(&str) -> bool,
    mut fallback: impl FnMut() -> String,
) -> Vec<(String, Need, bool)> {
    let mut keyed: Vec<(String, Need, bool)> = Vec::with_capacity(needs.len());
    for mut need in needs {
        let free = |key: &str, keyed: &[(String, Need, bool)]| !taken(key) && !keyed.iter().any(|(k, ..)| k == key);
        let (key, named) = match named_key(&mut need) {
            Some(named) if free(&named, &keyed) => (named, true),
            _ => loop {
                let key = fallback();
                if free(&key, &keyed) {
                    break (key, false);
                }
            },
        };
        keyed.push((key, need, named));
    }
    keyed
}

/// How long a call that asks for its input before its task is waited for to ask (or finish)
/// before its task is created.
const ASK_FIRST_WITHIN: Duration = Duration::from_millis(500);

/// Prefix of the (upstream-side) request state that names a held call.
const STATE_PREFIX: &str = "held:";

/// One request of the upstream for the client, with where its answer goes.
pub(super) struct Need {
    /// `sampling/createMessage`, `elicitation/create` or `roots/list`.
    pub method: String,
    /// Its params, as the upstream sent them.
    pub params: Value,
    /// Takes the client's answer.
    pub answer: oneshot::Sender<Result<Value, Refused>>,
}

/// An `AskClient` whose requests arrive as `Need`s on the receiver.
pub(super) fn ask_through_channel() -> (Arc<dyn AskClient>, mpsc::UnboundedReceiver<Need>) {
    let (needs, receiver) = mpsc::unbounded_channel();
    (Arc::new(ForwardNeeds { needs }), receiver)
}

/// At most this many requests are taken as sent together.
const GATHER_AT_MOST: usize = 16;

/// `first` and the requests sent with it: those arriving within `GATHER_WITHIN` of the first,
/// `GATHER_AT_MOST` at most (an upstream that keeps asking does not hold the caller forever;
/// later requests wait for the next round).
pub(super) async fn gather(first: Need, needs: &mut mpsc::UnboundedReceiver<Need>) -> Vec<Need> {
    let mut gathered = vec![first];
    let until = tokio::time::Instant::now() + GATHER_WITHIN;
    while gathered.len() < GATHER_AT_MOST {
        match tokio::time::timeout_at(until, needs.recv()).await {
            Ok(Some(need)) => gathered.push(need),
            _ => break,
        }
    }
    gathered
}

/// The capability the first of `needs` that the client did not declare needs, if any.
pub(super) fn undeclared(needs: &[Need], declared: &Value) -> Option<&'static str> {
    needs.iter().find(|n| !declares(declared, &n.method)).and_then(|n| capability_for(&n.method))
}

/// Turns an upstream's requests for input into `Need`s for the held-call machinery (which
/// checks them against what the client declared).
pub struct ForwardNeeds {
    needs: mpsc::UnboundedSender<Need>,
}

impl AskClient for ForwardNeeds {
    fn ask<'a>(&'a self, method: &'a str, params: Value) -> BoxFuture<'a, Result<Value, Refused>> {
        Box::pin(async move {
            let (answer, answered) = oneshot::channel();
            let need = Need { method: method.to_string(), params, answer };
            if self.needs.send(need).is_err() {
                return Err(Refused { code: -32603, message: "the client is gone".into() });
            }
            answered.await.unwrap_or_else(|_| Err(Refused { code: -32603, message: "the client did not retry".into() }))
        })
    }
}

/// A call running in the background, with the upstream's pending requests for input.
struct Held {
    // Taken when the call becomes a task.
    call: Option<tokio::task::JoinHandle<Result<Value, String>>>,
    needs: mpsc::UnboundedReceiver<Need>,
    // Asked and not yet answered, by their keys.
    asked: Vec<(String, Need)>,
    // What the client declared it can be asked.
    declared: Value,
    // When it is let go without a retry; each wait for the client starts a new one.
    deadline: tokio::time::Instant,
    // Where it becomes a task once it works on without asking (an `inputFirst` tool).
    becomes_task: Option<super::task_runs::TaskRuns>,
    // Answers the client gave before being asked (a first call's `inputResponses`), by key:
    // each answers the request the server names with its key, once.
    offered: serde_json::Map<String, Value>,
}

impl Drop for Held {
    fn drop(&mut self) {
        // Dropping the call sends notifications/cancelled upstream.
        if let Some(call) = &self.call {
            call.abort();
        }
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
    /// The upstream asked for something the client did not declare (this capability); the
    /// call was cancelled.
    Missing(String),
    /// The call became a task Portcullis runs: its `CreateTaskResult`.
    Task(Value),
}

impl Outcome {
    /// The outcome as JSON, to send to another replica.
    pub fn to_json(&self) -> Value {
        match self {
            Outcome::Answered(Ok(answer)) => json!({ "answered": answer }),
            Outcome::Answered(Err(error)) => json!({ "failed": error }),
            Outcome::InputRequired(result) => json!({ "inputRequired": result }),
            Outcome::Waiting => json!({ "waiting": true }),
            Outcome::Missing(capability) => json!({ "missing": capability }),
            Outcome::Task(created) => json!({ "task": created }),
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
        if let Some(created) = value.get("task") {
            return Some(Outcome::Task(created.clone()));
        }
        if let Some(capability) = value.get("missing") {
            return Some(Outcome::Missing(capability.as_str().unwrap_or_default().to_string()));
        }
        value.get("waiting").map(|_| Outcome::Waiting)
    }
}

/// The held calls of one upstream connection.
#[derive(Clone, Default)]
pub struct HeldCalls(Arc<Mutex<HashMap<String, Held>>>);

impl HeldCalls {
    /// Starts `call` (given the `AskClient` it must use) in the background; its answer, or its
    /// first request for input, within `limit`. `offered` are answers the client gave before
    /// being asked.
    pub async fn start<F>(&self, declared: Value, call: F, offered: Option<Value>, limit: Duration) -> Outcome
    where
        F: FnOnce(Arc<dyn AskClient>) -> BoxFuture<'static, Result<Value, String>>,
    {
        self.hold(declared, call, None, offered, limit).await
    }

    /// Starts `call` like `start`, but as a tool that asks for its input before its task: once
    /// it works on without asking, or finishes, it becomes a task of `runs` (`Outcome::Task`).
    pub async fn start_before_task<F>(
        &self,
        declared: Value,
        call: F,
        runs: super::task_runs::TaskRuns,
        offered: Option<Value>,
        limit: Duration,
    ) -> Outcome
    where
        F: FnOnce(Arc<dyn AskClient>) -> BoxFuture<'static, Result<Value, String>>,
    {
        self.hold(declared, call, Some(runs), offered, limit).await
    }

    async fn hold<F>(
        &self,
        declared: Value,
        call: F,
        becomes_task: Option<super::task_runs::TaskRuns>,
        offered: Option<Value>,
        limit: Duration,
    ) -> Outcome
    where
        F: FnOnce(Arc<dyn AskClient>) -> BoxFuture<'static, Result<Value, String>>,
    {
        let (asker, receiver) = ask_through_channel();
        let held = Held {
            call: Some(tokio::spawn(call(asker))),
            needs: receiver,
            asked: Vec::new(),
            declared,
            deadline: tokio::time::Instant::now(),
            becomes_task,
            offered: match offered {
                Some(Value::Object(offered)) => offered,
                _ => serde_json::Map::new(),
            },
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

    /// Continues the held call `handle` with the client's `responses`: each answer goes to
    /// the request it answers; what is still unanswered is asked again (as the specification
    /// recommends); keys that answer nothing are ignored. An unknown handle is `None`.
    pub async fn resume(&self, handle: &str, responses: Option<&Value>, limit: Duration) -> Option<Outcome> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(handle)?;
        let mut unanswered = Vec::new();
        for (key, need) in std::mem::take(&mut held.asked) {
            match responses.and_then(|r| r.get(&key)) {
                Some(answer) => {
                    let _ = need.answer.send(Ok(answer.clone()));
                }
                None => unanswered.push((key, need)),
            }
        }
        if !unanswered.is_empty() {
            let result = input_required(&unanswered, handle);
            held.asked = unanswered;
            self.keep(handle.to_string(), held);
            return Some(Outcome::InputRequired(result));
        }
        Some(self.wait(held, limit).await)
    }

    async fn wait(&self, mut held: Held, limit: Duration) -> Outcome {
        // One limit however many rounds were answered in advance.
        let deadline = tokio::time::Instant::now() + limit;
        let answer = loop {
            let Some(call) = held.call.as_mut() else { return Outcome::Answered(Err("the call is gone".into())) };
            // A call that becomes a task is waited for only as long as it may still ask first.
            let until = match held.becomes_task {
                Some(_) => deadline.min(tokio::time::Instant::now() + ASK_FIRST_WITHIN),
                None => deadline,
            };
            let next = tokio::time::timeout_at(until, async {
                tokio::select! {
                    answer = &mut *call => Ok(answer.unwrap_or_else(|e| Err(format!("the call failed: {e}")))),
                    need = held.needs.recv() => Err(need),
                }
            })
            .await;
            break match next {
                Err(_) => None,
                Ok(Ok(answer)) => Some(answer),
                // The call ended without asking (its answer comes next).
                Ok(Err(None)) => Some(call.await.unwrap_or_else(|e| Err(format!("the call failed: {e}")))),
                Ok(Err(Some(first))) => match self.asked(held, first).await {
                    Ok(outcome) => return outcome,
                    // Answered with what the client gave before being asked: wait on.
                    Err(answered) => {
                        held = answered;
                        continue;
                    }
                },
            };
        };
        match (held.becomes_task.take(), answer) {
            // Answered, or working on without asking: a task from now on (a failure to reach
            // the upstream stays an error of this request).
            (Some(runs), answer) if !matches!(answer, Some(Err(_))) => {
                let call = held.call.take();
                let needs = std::mem::replace(&mut held.needs, mpsc::unbounded_channel().1);
                let declared = std::mem::take(&mut held.declared);
                match (call, answer) {
                    (Some(call), None) => Outcome::Task(runs.adopt(declared, call, needs)),
                    (_, answer) => {
                        let finished = answer.unwrap_or_else(|| Err("the call is gone".into()));
                        Outcome::Task(runs.adopt(declared, tokio::spawn(async move { finished }), needs))
                    }
                }
            }
            (_, Some(answer)) => Outcome::Answered(answer),
            (_, None) => Outcome::Waiting,
        }
    }

    /// The call asked (`first`, and what it asked with it): `input_required`, or `Missing`; or,
    /// when the client had answered all of it before being asked, the call back to wait on.
    async fn asked(&self, mut held: Held, first: Need) -> Result<Outcome, Held> {
        let needs = gather(first, &mut held.needs).await;
        if let Some(missing) = undeclared(&needs, &held.declared) {
            // Dropping the held call cancels it upstream.
            return Ok(Outcome::Missing(missing.to_string()));
        }
        let mut index = 0;
        let fallback = || {
            index += 1;
            input_key(index - 1)
        };
        for (key, need, named) in keyed(needs, |_| false, fallback) {
            // Keys of Portcullis's own were never shown to the client: nothing can answer them yet.
            let offered = if named { held.offered.remove(&key) } else { None };
            match offered.filter(Value::is_object) {
                Some(answer) => {
                    let _ = need.answer.send(Ok(answer));
                }
                None => held.asked.push((key, need)),
            }
        }
        if held.asked.is_empty() {
            return Err(held);
        }
        let handle = uuid::Uuid::new_v4().simple().to_string();
        let result = input_required(&held.asked, &handle);
        self.keep(handle, held);
        Ok(Outcome::InputRequired(result))
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

fn input_required(asked: &[(String, Need)], handle: &str) -> Value {
    let requests: serde_json::Map<String, Value> = asked
        .iter()
        .map(|(key, need)| (key.clone(), json!({ "method": need.method, "params": need.params })))
        .collect();
    json!({
        "resultType": "input_required",
        "inputRequests": requests,
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
            Outcome::Missing("sampling".into()),
            Outcome::Task(json!({"resultType": "task", "taskId": "portcullis-run-x", "status": "working"})),
        ];
        for outcome in outcomes {
            let back = Outcome::from_json(&outcome.to_json()).expect("an outcome");
            assert_eq!(back.to_json(), outcome.to_json());
        }
        assert!(Outcome::from_json(&json!({"gone": true})).is_none());
    }

    fn all_declared() -> Value {
        json!({"sampling": {}, "elicitation": {}, "roots": {}})
    }

    #[tokio::test]
    async fn requests_sent_together_are_asked_together_and_each_answer_reaches_its_request() {
        let calls = HeldCalls::default();
        let limit = Duration::from_secs(5);
        let outcome = calls
            .start(
                all_declared(),
                |asker| {
                    Box::pin(async move {
                        let (name, roots) = tokio::join!(
                            asker.ask("elicitation/create", json!({"message": "Your name?"})),
                            asker.ask("roots/list", json!({}))
                        );
                        Ok(json!({"name": name.map_err(|e| e.message)?, "roots": roots.map_err(|e| e.message)?}))
                    })
                },
                None,
                limit,
            )
            .await;
        let Outcome::InputRequired(first) = outcome else { panic!("expected input_required") };
        let requests = first["inputRequests"].as_object().expect("input requests").clone();
        assert_eq!(requests.len(), 2, "both requests in one input_required: {first}");
        let key_of =
            |method: &str| requests.iter().find(|(_, r)| r["method"] == method).map(|(k, _)| k.clone()).expect("asked");
        let (elicit, roots) = (key_of("elicitation/create"), key_of("roots/list"));
        assert_ne!(elicit, roots);
        let handle =
            HeldCalls::handle(first["requestState"].as_str().expect("state")).expect("a held call").to_string();

        // One answer (and a stray key): the other request is asked again, alone.
        let partial = json!({ roots.as_str(): {"roots": []}, "stray": {"action": "accept"} });
        let Some(Outcome::InputRequired(again)) = calls.resume(&handle, Some(&partial), limit).await else {
            panic!("expected the unanswered request again")
        };
        let again_keys: Vec<&String> = again["inputRequests"].as_object().expect("requests").keys().collect();
        assert_eq!(again_keys, vec![&elicit]);

        let rest = json!({ elicit.as_str(): {"action": "accept", "content": {"name": "Ada"}} });
        let Some(Outcome::Answered(Ok(answer))) = calls.resume(&handle, Some(&rest), limit).await else {
            panic!("expected the call's answer")
        };
        assert_eq!(answer, json!({"name": {"action": "accept", "content": {"name": "Ada"}}, "roots": {"roots": []}}));
        assert!(!calls.holds(&handle), "an answered call is no longer held");
    }

    #[tokio::test]
    async fn at_most_sixteen_requests_are_asked_at_once_and_the_rest_next_round() {
        let calls = HeldCalls::default();
        let outcome = calls
            .start(
                all_declared(),
                |asker| {
                    Box::pin(async move {
                        let asks = (0..20).map(|i| asker.ask("roots/list", json!({ "i": i })));
                        let answers = futures::future::join_all(asks).await;
                        Ok(json!({ "answered": answers.iter().filter(|a| a.is_ok()).count() }))
                    })
                },
                None,
                Duration::from_secs(5),
            )
            .await;
        let Outcome::InputRequired(first) = outcome else { panic!("expected input_required") };
        let requests = first["inputRequests"].as_object().expect("requests").clone();
        assert_eq!(requests.len(), 16, "{first}");
        let handle = HeldCalls::handle(first["requestState"].as_str().expect("state")).expect("held").to_string();
        let answers: serde_json::Map<String, Value> =
            requests.keys().map(|k| (k.clone(), json!({"roots": []}))).collect();
        let Some(Outcome::InputRequired(next)) =
            calls.resume(&handle, Some(&Value::Object(answers)), Duration::from_secs(5)).await
        else {
            panic!("expected the other four")
        };
        assert_eq!(next["inputRequests"].as_object().expect("requests").len(), 4, "{next}");
    }

    #[tokio::test]
    async fn a_server_may_name_its_requests_and_answers_given_before_being_asked_answer_them() {
        let calls = HeldCalls::default();
        let limit = Duration::from_secs(5);
        let named = |key: &str| json!({"message": "Your name?", "_meta": {INPUT_KEY_META: key, "other": 1}});
        let asking = move |asker: Arc<dyn AskClient>| -> BoxFuture<'static, Result<Value, String>> {
            Box::pin(async move {
                let (name, city, roots) = tokio::join!(
                    asker.ask("elicitation/create", named("user_name")),
                    // The same name twice, and one without: keys of Portcullis's own.
                    asker.ask("elicitation/create", named("user_name")),
                    asker.ask("roots/list", json!({}))
                );
                let answers = [name, city, roots].map(|a| a.map_err(|e| e.message));
                Ok(json!({"answers": answers.into_iter().collect::<Result<Vec<_>, _>>()?}))
            })
        };
        let Outcome::InputRequired(first) = calls.start(all_declared(), asking, None, limit).await else {
            panic!("asked")
        };
        let requests = first["inputRequests"].as_object().expect("requests").clone();
        let mut keys: Vec<&String> = requests.keys().collect();
        keys.sort();
        assert_eq!(keys, ["input", "input-2", "user_name"], "{first}");
        assert_eq!(requests["user_name"]["params"]["_meta"], json!({"other": 1}), "the naming is taken off");

        // Answered before being asked, under the server's key (extra keys ignored): the call
        // goes on without an input_required.
        let offered =
            json!({"user_name": {"action": "accept", "content": {"name": "Ada"}}, "unknown": {"action": "accept"}});
        let asks_once = move |asker: Arc<dyn AskClient>| -> BoxFuture<'static, Result<Value, String>> {
            Box::pin(async move {
                let name = asker.ask("elicitation/create", named("user_name")).await.map_err(|e| e.message)?;
                Ok(json!({"jsonrpc": "2.0", "id": 1, "result": {"name": name["content"]["name"]}}))
            })
        };
        let Outcome::Answered(Ok(answer)) = calls.start(all_declared(), asks_once, Some(offered), limit).await else {
            panic!("answered with what was offered")
        };
        assert_eq!(answer["result"]["name"], "Ada");
        // Offered under another key: asked as usual.
        let offered = json!({"name": {"action": "accept", "content": {"name": "Ada"}}});
        let outcome = calls.start(all_declared(), asks_once, Some(offered), limit).await;
        assert!(matches!(outcome, Outcome::InputRequired(_)), "{:?}", outcome.to_json());
        // Offered under a key of Portcullis's own, which no client has seen: asked as usual.
        let unnamed = move |asker: Arc<dyn AskClient>| -> BoxFuture<'static, Result<Value, String>> {
            Box::pin(async move {
                asker.ask("sampling/createMessage", json!({"messages": []})).await.map_err(|e| e.message)?;
                Ok(json!({"jsonrpc": "2.0", "id": 1, "result": {}}))
            })
        };
        let offered = json!({"input": {"action": "accept", "content": {"name": "Ada"}}});
        let outcome = calls.start(all_declared(), unnamed, Some(offered), limit).await;
        assert!(matches!(outcome, Outcome::InputRequired(_)), "{:?}", outcome.to_json());
    }

    #[tokio::test]
    async fn a_tool_that_asks_first_is_held_while_it_asks_then_becomes_a_task() {
        let (calls, runs) = (HeldCalls::default(), super::super::task_runs::TaskRuns::default());
        let limit = Duration::from_secs(30);
        // Asks, then works for longer than it may take to ask again.
        let slow = |asker: Arc<dyn AskClient>| -> BoxFuture<'static, Result<Value, String>> {
            Box::pin(async move {
                let name =
                    asker.ask("elicitation/create", json!({"message": "Your name?"})).await.map_err(|e| e.message)?;
                tokio::time::sleep(ASK_FIRST_WITHIN * 2).await;
                Ok(
                    json!({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": name["content"]["name"]}]}}),
                )
            })
        };
        let Outcome::InputRequired(first) =
            calls.start_before_task(all_declared(), slow, runs.clone(), None, limit).await
        else {
            panic!("its input first, before any task")
        };
        assert!(first.get("taskId").is_none(), "{first}");
        let handle = HeldCalls::handle(first["requestState"].as_str().expect("state")).expect("held").to_string();
        let answer = json!({"input": {"action": "accept", "content": {"name": "Ada"}}});
        let started = tokio::time::Instant::now();
        let Some(Outcome::Task(created)) = calls.resume(&handle, Some(&answer), limit).await else {
            panic!("a task once it works on without asking")
        };
        assert!(started.elapsed() < ASK_FIRST_WITHIN * 2, "the task is made while the call still runs");
        assert_eq!((created["resultType"].as_str(), created["status"].as_str()), (Some("task"), Some("working")));
        assert!(!calls.holds(&handle), "no longer held: the task has it");
        let id = created["taskId"].as_str().expect("task id").to_string();
        let get = || runs.serve("tasks/get", &serde_json::Map::from_iter([("taskId".to_string(), json!(id))]));
        let done = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let task = get().expect("the run");
                if task["status"] == "completed" {
                    return task;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("completed");
        assert_eq!(done["result"]["content"][0]["text"], "Ada", "{done}");

        // One that finishes at once after its answer is a task too (already ended).
        let quick = |asker: Arc<dyn AskClient>| -> BoxFuture<'static, Result<Value, String>> {
            Box::pin(async move {
                asker.ask("roots/list", json!({})).await.map_err(|e| e.message)?;
                Ok(json!({"jsonrpc": "2.0", "id": 2, "result": {"content": []}}))
            })
        };
        let Outcome::InputRequired(first) =
            calls.start_before_task(all_declared(), quick, runs.clone(), None, limit).await
        else {
            panic!("input first")
        };
        let handle = HeldCalls::handle(first["requestState"].as_str().expect("state")).expect("held").to_string();
        let answer = json!({"input": {"roots": []}});
        let Some(Outcome::Task(created)) = calls.resume(&handle, Some(&answer), limit).await else {
            panic!("a task, whatever its speed")
        };
        assert_eq!(created["resultType"], "task");
    }

    #[tokio::test]
    async fn a_request_for_what_the_client_did_not_declare_cancels_the_call_as_missing() {
        let calls = HeldCalls::default();
        let (running, cancelled) = oneshot::channel::<()>();
        let outcome = calls
            .start(
                json!({"elicitation": {}}),
                move |asker| {
                    Box::pin(async move {
                        let _running = running;
                        asker.ask("sampling/createMessage", json!({})).await.map_err(|e| e.message)?;
                        Ok(json!({}))
                    })
                },
                None,
                Duration::from_secs(5),
            )
            .await;
        assert!(
            matches!(&outcome, Outcome::Missing(capability) if capability == "sampling"),
            "{:?}",
            outcome.to_json()
        );
        let ended = tokio::time::timeout(Duration::from_secs(5), cancelled).await.expect("the call is dropped");
        assert!(ended.is_err(), "the call never finished: it was cancelled");
    }
}
