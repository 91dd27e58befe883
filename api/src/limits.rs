//! Rate limits: GCRA per (tenant, principal, class), so a persona's `requestsPerMinute` allows
//! that many requests in any minute, with bursts up to the same number. In process in dev mode;
//! in Redis in production (one atomic script per decision, on Redis's clock, shared by every
//! replica). When Redis cannot answer, the decision is "unavailable" and callers fail closed.

use futures::future::BoxFuture;
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

/// No decision could be made (Redis unreachable); the request must be refused.
#[derive(Debug, thiserror::Error)]
#[error("the rate limiter is unavailable")]
pub struct LimitUnavailable;

/// A rate limiter shared by every request of this process.
pub trait RateLimiter: Send + Sync {
    /// Decides one request for `principal` in `tenant` against several classes at once (one
    /// round trip), each at its rate per minute. Each class is decided on its own.
    fn check_many<'a>(
        &'a self,
        tenant: &'a str,
        principal: &'a str,
        checks: &'a [(Class, u32)],
    ) -> BoxFuture<'a, Result<Vec<(Class, Decision)>, LimitUnavailable>>;
}

impl RateLimiter for Limiter {
    fn check_many<'a>(
        &'a self,
        tenant: &'a str,
        principal: &'a str,
        checks: &'a [(Class, u32)],
    ) -> BoxFuture<'a, Result<Vec<(Class, Decision)>, LimitUnavailable>> {
        let now = Instant::now();
        let decisions = checks
            .iter()
            .map(|&(class, per_minute)| (class, self.check_at(tenant, principal, class, per_minute, now)))
            .collect();
        Box::pin(async move { Ok(decisions) })
    }
}

/// The first refusal among decisions, if any.
pub fn first_refusal(decisions: &[(Class, Decision)]) -> Option<(Class, Decision)> {
    decisions.iter().find(|(_, d)| !d.allowed).copied()
}

fn decision(allowed: bool, per_minute: u32, used: Duration, retry: Duration, interval: Duration) -> Decision {
    let remaining =
        if allowed { (WINDOW.saturating_sub(used).as_nanos() / interval.as_nanos().max(1)) as u32 } else { 0 };
    Decision {
        allowed,
        limit: per_minute,
        remaining,
        reset_seconds: used.as_secs_f64().ceil() as u64,
        retry_after_seconds: if allowed { 0 } else { retry.as_secs_f64().ceil().max(1.0) as u64 },
    }
}

// GCRA on Redis's clock, one bucket per key. KEYS[i]: a bucket; ARGV[1]: window (µs);
// ARGV[i+1]: that bucket's emission interval (µs). Returns {allowed, used µs, retry µs} per key.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[i + 1])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local used = new_tat - now
  if used > window then
    table.insert(out, 0); table.insert(out, tat - now); table.insert(out, used - window)
  else
    redis.call('SET', key, new_tat, 'PX', math.ceil(used / 1000) + 1000)
    table.insert(out, 1); table.insert(out, used); table.insert(out, 0)
  end
end
return out
"#;

/// GCRA in Redis, shared by every replica.
pub struct RedisLimiter {
    connection: redis::aio::ConnectionManager,
    script: redis::Script,
    prefix: String,
}

impl RedisLimiter {
    /// Uses `connection`; keys start with `prefix`.
    pub fn new(connection: redis::aio::ConnectionManager, prefix: &str) -> Self {
        Self { connection, script: redis::Script::new(GCRA), prefix: prefix.to_string() }
    }
}

impl RateLimiter for RedisLimiter {
    fn check_many<'a>(
        &'a self,
        tenant: &'a str,
        principal: &'a str,
        checks: &'a [(Class, u32)],
    ) -> BoxFuture<'a, Result<Vec<(Class, Decision)>, LimitUnavailable>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let mut invocation = self.script.prepare_invoke();
            invocation.arg(WINDOW.as_micros() as u64);
            let mut intervals = Vec::with_capacity(checks.len());
            for &(class, per_minute) in checks {
                let interval = WINDOW / per_minute.max(1);
                invocation.key(format!("{}rl:{}:{}:{}", self.prefix, tenant, principal, class.name()));
                invocation.arg(interval.as_micros() as u64);
                intervals.push(interval);
            }
            let call = invocation.invoke_async::<Vec<i64>>(&mut connection);
            let answer = match tokio::time::timeout(Duration::from_secs(1), call).await {
                Ok(Ok(answer)) if answer.len() == checks.len() * 3 => answer,
                Ok(Ok(_)) => {
                    tracing::warn!("Rate limiter answered in an unexpected shape; refusing requests");
                    return Err(LimitUnavailable);
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "Rate limiter unavailable; refusing requests");
                    return Err(LimitUnavailable);
                }
                Err(_) => {
                    tracing::warn!("Rate limiter did not answer within 1 s; refusing requests");
                    return Err(LimitUnavailable);
                }
            };
            Ok(checks
                .iter()
                .zip(answer.chunks(3))
                .zip(intervals)
                .map(|((&(class, per_minute), r), interval)| {
                    let micros = |v: i64| Duration::from_micros(v.max(0) as u64);
                    (class, decision(r[0] == 1, per_minute.max(1), micros(r[1]), micros(r[2]), interval))
                })
                .collect())
        })
    }
}

/// Redis first; when Redis cannot answer, this pod's own in-process limits (each pod then allows
/// the persona's full rate, so N pods allow up to N times it). Chosen with
/// `--when-redis-down local`; the default is to fail closed.
pub struct RedisOrLocal {
    redis: RedisLimiter,
    local: Limiter,
    warned: Mutex<Option<Instant>>,
}

impl RedisOrLocal {
    /// Falls back from `redis` to in-process limits.
    pub fn new(redis: RedisLimiter) -> Self {
        Self { redis, local: Limiter::default(), warned: Mutex::new(None) }
    }
}

impl RedisOrLocal {
    fn warn_now_and_then(&self) {
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
            tracing::warn!("Redis is unavailable: deciding rate limits in this pod only (--when-redis-down local)");
            *warned = Some(Instant::now());
        }
    }
}

impl RateLimiter for RedisOrLocal {
    fn check_many<'a>(
        &'a self,
        tenant: &'a str,
        principal: &'a str,
        checks: &'a [(Class, u32)],
    ) -> BoxFuture<'a, Result<Vec<(Class, Decision)>, LimitUnavailable>> {
        Box::pin(async move {
            match self.redis.check_many(tenant, principal, checks).await {
                Ok(decisions) => Ok(decisions),
                Err(LimitUnavailable) => {
                    self.warn_now_and_then();
                    self.local.check_many(tenant, principal, checks).await
                }
            }
        })
    }
}

/// In-process GCRA limiter.
#[derive(Default)]
pub struct Limiter {
    // Theoretical arrival time per key.
    tats: Mutex<HashMap<(String, String, Class), Instant>>,
}

impl Limiter {
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
            return decision(false, per_minute, tat - now, used - WINDOW, interval);
        }
        tats.insert(key, new_tat);
        decision(true, per_minute, used, Duration::ZERO, interval)
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
