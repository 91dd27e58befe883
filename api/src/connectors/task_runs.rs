//! Tasks Portcullis runs itself (the 2026-07-28 tasks extension) for tools of a 2025 upstream,
//! which has no tasks: the connection's `runAsTasks` names them. For a client that takes
//! tasks, such a `tools/call` becomes an ordinary 2025 call running in the background, and the
//! client gets a task at once; it polls `tasks/get`, answers the upstream's requests for input
//! (sampling, elicitation, roots) with `tasks/update` and may `tasks/cancel` it, exactly as if
//! the upstream offered tasks. The MCP layer seals the run's id into a task handle like any
//! upstream's task id, so what the caller sees is the same either way.
//!
//! A run lives in the process that started it, for `TTL` after its creation; requests about it
//! reaching another replica are handed over the change bus (`McpUpstream` does that). A run is
//! lost if its replica restarts (the task is then unknown).

use super::held_calls::{self, Need};
use super::legacy_calls::AskClient;
use chrono::{SecondsFormat, Utc};
use futures::future::BoxFuture;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// How long a run, and then its outcome, is kept after its creation: its `ttlMs`.
pub const TTL: Duration = Duration::from_secs(3600);

/// How often clients are told to poll.
const POLL_INTERVAL_MS: u64 = 500;

/// Runs kept at once per connection and replica; beyond, calls are answered as ordinary calls.
const MOST_RUNS: usize = 1000;

/// Prefix of run ids, which tells them from an upstream's own task ids.
const ID_PREFIX: &str = "portcullis-run-";

/// Whether `task_id` names a run of Portcullis's (and not an upstream's task).
pub fn is_run(task_id: &str) -> bool {
    task_id.starts_with(ID_PREFIX)
}

enum State {
    Working,
    InputRequired,
    Completed(Value),
    Failed(Value),
    Cancelled,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Working => "working",
            State::InputRequired => "input_required",
            State::Completed(_) => "completed",
            State::Failed(_) => "failed",
            State::Cancelled => "cancelled",
        }
    }

    fn is_terminal(&self) -> bool {
        matches!(self, State::Completed(_) | State::Failed(_) | State::Cancelled)
    }
}

struct Run {
    created_at: String,
    last_updated_at: String,
    state: State,
    // The upstream's pending requests for input, by the keys the client answers them under.
    asked: Vec<(String, Need)>,
    next_key: usize,
    // Stops the call (dropping it sends notifications/cancelled upstream).
    stop: Option<oneshot::Sender<()>>,
}

impl Run {
    fn set(&mut self, state: State) {
        self.state = state;
        self.last_updated_at = now();
    }
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The runs of one connection in this process.
#[derive(Clone, Default)]
pub struct TaskRuns(Arc<Mutex<HashMap<String, Run>>>);

impl TaskRuns {
    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Run>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `call` (given the `AskClient` it must use) as a run for a client that declared
    /// `declared`; the `CreateTaskResult`, or `None` when this process runs too many already.
    pub fn start<F>(&self, declared: Value, call: F) -> Option<Value>
    where
        F: FnOnce(Arc<dyn AskClient>) -> BoxFuture<'static, Result<Value, String>>,
    {
        let (asker, needs) = held_calls::ask_through_channel();
        if self.is_full() {
            return None;
        }
        Some(self.adopt(declared, tokio::spawn(call(asker)), needs))
    }

    /// Whether this process runs as many as it keeps (`MOST_RUNS`).
    pub fn is_full(&self) -> bool {
        self.runs().len() >= MOST_RUNS
    }

    /// Makes a call already running (one whose requests for input arrive on `needs`) a run;
    /// its `CreateTaskResult`. Not bounded by `MOST_RUNS` (callers check `is_full` before they
    /// start a call that may become one; a few may pass at once).
    pub(super) fn adopt(
        &self,
        declared: Value,
        call: tokio::task::JoinHandle<Result<Value, String>>,
        needs: tokio::sync::mpsc::UnboundedReceiver<Need>,
    ) -> Value {
        let id = format!("{ID_PREFIX}{}", uuid::Uuid::new_v4().simple());
        let (stop, stopped) = oneshot::channel();
        {
            let mut runs = self.runs();
            let created_at = now();
            let run = Run {
                last_updated_at: created_at.clone(),
                created_at,
                state: State::Working,
                asked: Vec::new(),
                next_key: 1,
                stop: Some(stop),
            };
            runs.insert(id.clone(), run);
        }
        tokio::spawn(drive(self.clone(), id.clone(), declared, call, needs, stopped));
        let mut created = self.get(&id).unwrap_or_else(|| json!({ "taskId": id, "status": "working" }));
        created["resultType"] = json!("task");
        created
    }

    /// Answers `tasks/get`, `tasks/update` or `tasks/cancel` about a run of this process; `None`
    /// when it has no such run.
    pub fn serve(&self, method: &str, params: &Map<String, Value>) -> Option<Value> {
        let id = params.get("taskId").and_then(Value::as_str)?;
        match method {
            "tasks/get" => self.get(id),
            "tasks/update" => {
                self.update(id, params.get("inputResponses").unwrap_or(&Value::Null))?;
                Some(json!({}))
            }
            "tasks/cancel" => {
                self.cancel(id)?;
                Some(json!({}))
            }
            _ => None,
        }
    }

    /// The task as `tasks/get` shows it.
    fn get(&self, id: &str) -> Option<Value> {
        let runs = self.runs();
        let run = runs.get(id)?;
        let mut task = json!({
            "taskId": id,
            "status": run.state.name(),
            "createdAt": run.created_at,
            "lastUpdatedAt": run.last_updated_at,
            "ttlMs": TTL.as_millis() as u64,
            "pollIntervalMs": POLL_INTERVAL_MS,
        });
        match &run.state {
            State::InputRequired => {
                let requests: Map<String, Value> = run
                    .asked
                    .iter()
                    .map(|(key, need)| (key.clone(), json!({ "method": need.method, "params": need.params })))
                    .collect();
                task["inputRequests"] = Value::Object(requests);
            }
            State::Completed(result) => task["result"] = result.clone(),
            State::Failed(error) => task["error"] = error.clone(),
            State::Working | State::Cancelled => {}
        }
        Some(task)
    }

    /// Hands each answer to the request it answers; the run works on once none is pending.
    /// Keys that answer nothing, and answers that are not objects, are ignored.
    fn update(&self, id: &str, responses: &Value) -> Option<()> {
        let mut runs = self.runs();
        let run = runs.get_mut(id)?;
        let mut answered = false;
        for (key, need) in std::mem::take(&mut run.asked) {
            match responses.get(&key).filter(|answer| answer.is_object()) {
                Some(answer) => {
                    let _ = need.answer.send(Ok(answer.clone()));
                    answered = true;
                }
                None => run.asked.push((key, need)),
            }
        }
        if answered && run.asked.is_empty() && matches!(run.state, State::InputRequired) {
            run.set(State::Working);
        }
        Some(())
    }

    /// Cancels a run that has not ended (the upstream is told to stop); an ended one stays as
    /// it ended.
    fn cancel(&self, id: &str) -> Option<()> {
        let mut runs = self.runs();
        let run = runs.get_mut(id)?;
        if !run.state.is_terminal() {
            run.asked.clear();
            run.set(State::Cancelled);
            if let Some(stop) = run.stop.take() {
                let _ = stop.send(());
            }
        }
        Some(())
    }

    /// Stops every run that has not ended and forgets them all (the connection is going away:
    /// nobody could reach them any more).
    pub fn stop_all(&self) {
        for (_, mut run) in self.runs().drain() {
            if let Some(stop) = run.stop.take() {
                let _ = stop.send(());
            }
        }
    }

    /// Records how the run ended, unless it was cancelled meanwhile.
    fn end(&self, id: &str, state: State) {
        if let Some(run) = self.runs().get_mut(id)
            && !run.state.is_terminal()
        {
            run.asked.clear();
            run.set(state);
        }
    }
}

/// Follows one run: its requests for input become the task's, its answer its outcome; it is
/// stopped when cancelled, and forgotten `TTL` after its creation.
async fn drive(
    runs: TaskRuns,
    id: String,
    declared: Value,
    mut call: tokio::task::JoinHandle<Result<Value, String>>,
    mut needs: tokio::sync::mpsc::UnboundedReceiver<Need>,
    mut stopped: oneshot::Receiver<()>,
) {
    let forget = tokio::time::Instant::now() + TTL;
    let ended = loop {
        tokio::select! {
            answer = &mut call => {
                break outcome(answer.unwrap_or_else(|e| Err(format!("the call failed: {e}"))));
            }
            Some(first) = needs.recv() => {
                let gathered = held_calls::gather(first, &mut needs).await;
                if let Some(capability) = held_calls::undeclared(&gathered, &declared) {
                    let error = super::legacy_calls::missing_capability(json!({ capability: {} }));
                    break Some(State::Failed(serde_json::to_value(error).unwrap_or_default()));
                }
                let mut all = runs.runs();
                let Some(run) = all.get_mut(&id) else { break None };
                let taken: Vec<String> = run.asked.iter().map(|(key, _)| key.clone()).collect();
                let next_key = &mut run.next_key;
                let fallback = || {
                    *next_key += 1;
                    format!("input-{}", *next_key - 1)
                };
                let keyed = held_calls::keyed(gathered, |key| taken.iter().any(|t| t == key), fallback);
                run.asked.extend(keyed.into_iter().map(|(key, need, _)| (key, need)));
                if !run.state.is_terminal() {
                    run.set(State::InputRequired);
                }
            }
            _ = &mut stopped => break None,
            () = tokio::time::sleep_until(forget) => break None,
        }
    };
    // Dropping the call stops it upstream, when it has not ended.
    call.abort();
    if let Some(state) = ended {
        runs.end(&id, state);
    }
    if !runs.runs().contains_key(&id) {
        // Stopped with its connection: nothing to keep.
        return;
    }
    tokio::time::sleep_until(forget).await;
    runs.runs().remove(&id);
}

/// The task's outcome from the call's JSON-RPC answer: a result (a tool error included) completes
/// it; a JSON-RPC error, or no answer, fails it.
fn outcome(answer: Result<Value, String>) -> Option<State> {
    Some(match answer {
        Ok(mut message) => {
            match (message.get_mut("result").map(Value::take), message.get_mut("error").map(Value::take)) {
                (Some(result), _) => State::Completed(result),
                (None, Some(error)) => State::Failed(error),
                (None, None) => State::Failed(
                    json!({ "code": -32603, "message": "the upstream answered neither a result nor an error" }),
                ),
            }
        }
        Err(error) => {
            // The detail (connection errors, what the upstream answered) is for the operator.
            tracing::warn!(%error, "A task Portcullis ran for a 2025 upstream failed");
            State::Failed(
                json!({ "code": -32603, "message": "The server behind this task failed or could not be reached" }),
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(id: &str, extra: Value) -> Map<String, Value> {
        let mut params = Map::from_iter([("taskId".to_string(), json!(id))]);
        if let Value::Object(extra) = extra {
            params.extend(extra);
        }
        params
    }

    async fn status_becomes(runs: &TaskRuns, id: &str, status: &str) -> Value {
        for _ in 0..200 {
            let task = runs.serve("tasks/get", &params(id, json!({}))).expect("the run");
            if task["status"] == status {
                return task;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the run never became {status}");
    }

    #[tokio::test]
    async fn a_run_asks_through_its_task_and_completes_with_the_answers() {
        let runs = TaskRuns::default();
        let created = runs
            .start(json!({"elicitation": {}}), |asker| {
                Box::pin(async move {
                    let (a, b) = tokio::join!(
                        asker.ask("elicitation/create", json!({"message": "A?"})),
                        asker.ask("elicitation/create", json!({"message": "B?"}))
                    );
                    let (a, b) = (a.map_err(|e| e.message)?, b.map_err(|e| e.message)?);
                    Ok(json!({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": format!("{a} {b}")}]}}))
                })
            })
            .expect("started");
        assert_eq!(created["resultType"], "task");
        assert_eq!(created["status"], "working");
        assert!(created.get("requestState").is_none() && created.get("ttl").is_none());
        let id = created["taskId"].as_str().expect("an id").to_string();
        assert!(is_run(&id));

        let asked = status_becomes(&runs, &id, "input_required").await;
        let keys: Vec<String> = asked["inputRequests"].as_object().expect("requests").keys().cloned().collect();
        assert_eq!(keys.len(), 2, "both requests pending together: {asked}");

        // A partial answer is acknowledged; only the other key stays pending.
        let first = json!({"inputResponses": { keys[0].as_str(): {"action": "accept"}, "stray": {}}});
        assert_eq!(runs.serve("tasks/update", &params(&id, first)), Some(json!({})));
        let pending = runs.serve("tasks/get", &params(&id, json!({}))).expect("the run");
        assert_eq!(pending["status"], "input_required");
        assert_eq!(pending["inputRequests"].as_object().expect("requests").keys().collect::<Vec<_>>(), vec![&keys[1]]);

        let second = json!({"inputResponses": { keys[1].as_str(): {"action": "decline"}}});
        runs.serve("tasks/update", &params(&id, second)).expect("acknowledged");
        let done = status_becomes(&runs, &id, "completed").await;
        assert_eq!(done["result"]["content"][0]["text"], r#"{"action":"accept"} {"action":"decline"}"#);
        assert!(done.get("error").is_none() && done.get("inputRequests").is_none());
        // Cancelling an ended task changes nothing.
        runs.serve("tasks/cancel", &params(&id, json!({}))).expect("acknowledged");
        assert_eq!(runs.serve("tasks/get", &params(&id, json!({}))).expect("the run")["status"], "completed");
        assert!(runs.serve("tasks/get", &params("portcullis-run-unknown", json!({}))).is_none());
    }

    /// A run whose call never ends by itself; the receiver hears when the call is dropped.
    fn start_endless(runs: &TaskRuns) -> (Value, oneshot::Receiver<()>) {
        let (running, dropped) = oneshot::channel::<()>();
        let created = runs
            .start(json!({}), move |_| {
                Box::pin(async move {
                    let _running = running;
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(json!({"result": {}}))
                })
            })
            .expect("started");
        (created, dropped)
    }

    #[tokio::test]
    async fn a_cancelled_run_stops_its_call_and_errors_fail_it() {
        let runs = TaskRuns::default();
        let (created, dropped) = start_endless(&runs);
        let id = created["taskId"].as_str().expect("an id");
        assert_eq!(runs.serve("tasks/cancel", &params(id, json!({}))), Some(json!({})));
        assert_eq!(runs.serve("tasks/get", &params(id, json!({}))).expect("the run")["status"], "cancelled");
        let ended = tokio::time::timeout(Duration::from_secs(5), dropped).await.expect("the call is dropped");
        assert!(ended.is_err(), "the call was stopped, not finished");

        let failing = runs
            .start(json!({}), |_| Box::pin(async { Ok(json!({"error": {"code": -32603, "message": "boom"}})) }))
            .expect("started");
        let failed = status_becomes(&runs, failing["taskId"].as_str().expect("an id"), "failed").await;
        assert_eq!(failed["error"], json!({"code": -32603, "message": "boom"}));
        assert!(failed.get("result").is_none());

        // A connection going away stops its runs.
        let (_, dropped) = start_endless(&runs);
        runs.stop_all();
        let ended = tokio::time::timeout(Duration::from_secs(5), dropped).await.expect("the call is dropped");
        assert!(ended.is_err(), "the call was stopped");
        assert!(runs.runs().is_empty());

        // Asking for what the client did not declare fails the task with -32021.
        let undeclared = runs
            .start(json!({"elicitation": {}}), |asker| {
                Box::pin(async move {
                    asker.ask("sampling/createMessage", json!({})).await.map_err(|e| e.message)?;
                    Ok(json!({"result": {}}))
                })
            })
            .expect("started");
        let failed = status_becomes(&runs, undeclared["taskId"].as_str().expect("an id"), "failed").await;
        assert_eq!(failed["error"]["code"], -32021);
        assert_eq!(failed["error"]["data"]["requiredCapabilities"], json!({"sampling": {}}));
    }
}
