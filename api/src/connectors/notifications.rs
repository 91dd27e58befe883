//! Notifications about one request (progress, log messages) on their way from the upstream to
//! the caller's response stream. The upstream sees Portcullis's own progress token, unique per
//! upstream request; the caller gets its own token back. Log messages reach the caller only at
//! or above the level it asked for, and not at all when it asked for none (2026-07-28 rule).

use serde_json::Value;
use tokio::sync::mpsc::Sender;

/// The syslog severities MCP uses, least severe first.
const LEVELS: [&str; 8] = ["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"];

/// The rank of a log level, if it is one.
pub fn level_rank(level: &str) -> Option<usize> {
    LEVELS.iter().position(|l| *l == level)
}

/// Where the notifications of one caller's request go.
#[derive(Clone, Debug)]
pub struct NotificationSink {
    messages: Sender<Value>,
    progress_token: Option<Value>,
    log_level: Option<usize>,
}

impl NotificationSink {
    /// Notifications for a request that asked for progress with `progress_token` (if any) and
    /// for log messages from `log_level` up (if any).
    pub fn new(messages: Sender<Value>, progress_token: Option<Value>, log_level: Option<&str>) -> Self {
        Self { messages, progress_token, log_level: log_level.and_then(level_rank) }
    }

    /// Whether the caller wants progress notifications.
    pub fn wants_progress(&self) -> bool {
        self.progress_token.is_some()
    }

    /// Relays one notification of the upstream about this request; anything else (other
    /// methods, progress nobody asked for, logs below the caller's level) is dropped.
    pub fn forward(&self, mut notification: Value) {
        let method = notification.get("method").and_then(Value::as_str).unwrap_or_default();
        let wanted = match method {
            "notifications/progress" => {
                match (&self.progress_token, notification.get_mut("params").and_then(Value::as_object_mut)) {
                    (Some(token), Some(params)) => {
                        params.insert("progressToken".into(), token.clone());
                        true
                    }
                    _ => false,
                }
            }
            "notifications/message" => {
                let level = notification.get("params").and_then(|p| p.get("level")).and_then(Value::as_str);
                matches!((self.log_level, level.and_then(level_rank)), (Some(wanted), Some(level)) if level >= wanted)
            }
            _ => false,
        };
        // The caller may have gone (nobody to tell), or read so slowly that its stream's buffer
        // is full: notifications are then dropped rather than held in memory without bound.
        if wanted && let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) = self.messages.try_send(notification) {
            tracing::debug!("A caller's stream is full; a notification was dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sink(token: Option<Value>, level: Option<&str>) -> (NotificationSink, tokio::sync::mpsc::Receiver<Value>) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        (NotificationSink::new(tx, token, level), rx)
    }

    #[test]
    fn progress_gets_the_callers_token_back() {
        let (sink, mut rx) = sink(Some(json!("caller-7")), None);
        sink.forward(json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": "pc12", "progress": 1}}));
        let relayed = rx.try_recv().unwrap();
        assert_eq!(relayed["params"]["progressToken"], json!("caller-7"));
        assert_eq!(relayed["params"]["progress"], json!(1));
    }

    #[test]
    fn malformed_notifications_are_dropped_not_fatal() {
        let (sink, mut rx) = sink(Some(json!("t")), Some("debug"));
        sink.forward(json!({"method": "notifications/progress", "params": "not an object"}));
        sink.forward(json!({"method": "notifications/message", "params": 7}));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn progress_nobody_asked_for_and_other_methods_are_dropped() {
        let (sink, mut rx) = sink(None, Some("debug"));
        sink.forward(json!({"method": "notifications/progress", "params": {"progressToken": "x", "progress": 1}}));
        sink.forward(json!({"method": "notifications/tools/list_changed"}));
        sink.forward(json!({"method": "sampling/createMessage", "id": 1}));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn log_messages_are_filtered_by_the_callers_level() {
        let (sink, mut rx) = sink(None, Some("warning"));
        for level in ["debug", "info", "warning", "error", "bogus"] {
            sink.forward(json!({"method": "notifications/message", "params": {"level": level, "data": level}}));
        }
        let relayed: Vec<Value> =
            std::iter::from_fn(|| rx.try_recv().ok()).map(|m| m["params"]["data"].clone()).collect();
        assert_eq!(relayed, vec![json!("warning"), json!("error")]);
        // No level asked for: no log messages at all.
        let (quiet, mut rx) = super::tests::sink(None, None);
        quiet.forward(json!({"method": "notifications/message", "params": {"level": "emergency", "data": 1}}));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_full_stream_drops_notifications_instead_of_growing() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let sink = NotificationSink::new(tx, Some(json!("t")), None);
        for progress in 0..5 {
            sink.forward(
                json!({"method": "notifications/progress", "params": {"progressToken": "pc1", "progress": progress}}),
            );
        }
        let relayed: Vec<Value> =
            std::iter::from_fn(|| rx.try_recv().ok()).map(|m| m["params"]["progress"].clone()).collect();
        assert_eq!(relayed, vec![json!(0), json!(1)], "the first two fit, the rest are dropped");
    }
}
