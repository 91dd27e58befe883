//! Rate limits, in process (dev mode): GCRA per (tenant, principal, class), so a persona's
//! `requestsPerMinute` allows that many requests in any minute, with bursts up to the same number.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What is being limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// Every request.
    Requests,
    /// POST, PUT and DELETE over REST.
    Writes,
    /// Tool calls.
    ToolCalls,
}

impl Class {
    /// Name used in `RateLimit-Policy`.
    pub fn name(self) -> &'static str {
        match self {
            Class::Requests => "requests",
            Class::Writes => "writes",
            Class::ToolCalls => "tool-calls",
        }
    }
}

/// The outcome of one decision.
#[derive(Clone, Copy, Debug)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// The limit per minute.
    pub limit: u32,
    /// Requests left in the current window.
    pub remaining: u32,
    /// Seconds until the window is full again.
    pub reset_seconds: u64,
    /// When refused: seconds until a retry can succeed.
    pub retry_after_seconds: u64,
}

const WINDOW: Duration = Duration::from_secs(60);

/// In-process GCRA limiter.
#[derive(Default)]
pub struct Limiter {
    // Theoretical arrival time per key.
    tats: Mutex<HashMap<(String, String, Class), Instant>>,
}

impl Limiter {
    /// Decides one request of `class` for `principal` in `tenant` at `per_minute`.
    pub fn check(&self, tenant: &str, principal: &str, class: Class, per_minute: u32) -> Decision {
        self.check_at(tenant, principal, class, per_minute, Instant::now())
    }

    fn check_at(&self, tenant: &str, principal: &str, class: Class, per_minute: u32, now: Instant) -> Decision {
        let per_minute = per_minute.max(1);
        let interval = WINDOW / per_minute;
        let mut tats = self.tats.lock().unwrap_or_else(|e| e.into_inner());
        if tats.len() > 100_000 {
            tats.retain(|_, tat| *tat > now);
        }
        let key = (tenant.to_string(), principal.to_string(), class);
        let tat = tats.get(&key).copied().unwrap_or(now).max(now);
        let new_tat = tat + interval;
        let used = new_tat - now;
        if used > WINDOW {
            let retry = used - WINDOW;
            let reset = tat - now;
            return Decision {
                allowed: false,
                limit: per_minute,
                remaining: 0,
                reset_seconds: reset.as_secs_f64().ceil() as u64,
                retry_after_seconds: retry.as_secs_f64().ceil().max(1.0) as u64,
            };
        }
        tats.insert(key, new_tat);
        let remaining = ((WINDOW - used).as_nanos() / interval.as_nanos().max(1)) as u32;
        Decision {
            allowed: true,
            limit: per_minute,
            remaining,
            reset_seconds: used.as_secs_f64().ceil() as u64,
            retry_after_seconds: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_limit_then_refuses_until_time_passes() {
        let limiter = Limiter::default();
        let t0 = Instant::now();
        for i in 0..3 {
            let d = limiter.check_at("t", "p", Class::Requests, 3, t0);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 2 - i);
        }
        let refused = limiter.check_at("t", "p", Class::Requests, 3, t0);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_seconds, 20);
        // Another principal or class has its own budget.
        assert!(limiter.check_at("t", "q", Class::Requests, 3, t0).allowed);
        assert!(limiter.check_at("t", "p", Class::ToolCalls, 3, t0).allowed);
        // One interval later, one more request fits.
        assert!(limiter.check_at("t", "p", Class::Requests, 3, t0 + Duration::from_secs(20)).allowed);
        assert!(!limiter.check_at("t", "p", Class::Requests, 3, t0 + Duration::from_secs(20)).allowed);
    }
}
