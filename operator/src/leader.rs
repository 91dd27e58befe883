//! Leader election on a `coordination.k8s.io/v1` Lease: one replica writes status and publishes;
//! the others keep their caches warm and take over when the lease runs out. Updates go through
//! `replace` with the lease's resourceVersion, so two replicas can never both win a round.

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// What a candidate should do with a lease it just read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it.
    Acquire,
    /// Somebody else holds a live lease.
    Wait,
}

/// Decides from the lease's spec; a lease whose holder stopped renewing for its duration is free.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: DateTime<Utc>) -> Decision {
    let Some(spec) = spec else { return Decision::Acquire };
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
    match holder {
        None => Decision::Acquire,
        Some(h) if h == me => Decision::Renew,
        Some(_) => {
            let renewed = spec.renew_time.as_ref().map(micro_to_chrono);
            let duration = chrono::Duration::seconds(spec.lease_duration_seconds.unwrap_or(15).into());
            match renewed {
                Some(at) if at + duration > now => Decision::Wait,
                _ => Decision::Acquire,
            }
        }
    }
}

fn micro_to_chrono(t: &MicroTime) -> DateTime<Utc> {
    DateTime::from_timestamp(t.0.as_second(), t.0.subsec_nanosecond().try_into().unwrap_or(0)).unwrap_or_default()
}

fn chrono_to_micro(t: DateTime<Utc>) -> MicroTime {
    let ts = k8s_openapi::jiff::Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos().try_into().unwrap_or(0));
    MicroTime(ts.unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH))
}

/// A candidate for one lease.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    lease: String,
    identity: String,
    duration: Duration,
    leading: Arc<AtomicBool>,
}

impl Elector {
    /// A candidate named `identity` for the lease `namespace/lease`.
    pub fn new(client: Client, namespace: &str, lease: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            lease: lease.to_string(),
            identity: identity.to_string(),
            duration,
            leading: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether this replica currently leads.
    pub fn is_leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// One election round: read the lease, then renew, take or leave it. Returns whether we lead.
    pub async fn round(&self) -> Result<bool, kube::Error> {
        let now = Utc::now();
        let current = self.api.get_opt(&self.lease).await?;
        let decision = decide(current.as_ref().and_then(|l| l.spec.as_ref()), &self.identity, now);
        let seconds: i32 = self.duration.as_secs().try_into().unwrap_or(15);
        let result = match (decision, current) {
            (Decision::Wait, _) => Ok(false),
            (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.lease.clone()), ..ObjectMeta::default() },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(chrono_to_micro(now)),
                        renew_time: Some(chrono_to_micro(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await.map(|_| true)
            }
            (decision, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if decision == Decision::Acquire {
                    spec.acquire_time = Some(chrono_to_micro(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.holder_identity = Some(self.identity.clone());
                spec.lease_duration_seconds = Some(seconds);
                spec.renew_time = Some(chrono_to_micro(now));
                self.api.replace(&self.lease, &PostParams::default(), &lease).await.map(|_| true)
            }
        };
        match result {
            // Another replica wrote first: not us this round.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            other => other,
        }
    }

    /// Runs election rounds forever, renewing at a third of the lease duration. Leadership is
    /// given up locally before the lease could expire when renewals keep failing.
    pub async fn run(self) {
        let period = self.duration / 3;
        let mut last_renewed: Option<tokio::time::Instant> = None;
        loop {
            match self.round().await {
                Ok(true) => {
                    if !self.leading.swap(true, Ordering::SeqCst) {
                        tracing::info!(identity = %self.identity, lease = %self.lease, "became the leader");
                    }
                    last_renewed = Some(tokio::time::Instant::now());
                }
                Ok(false) => {
                    if self.leading.swap(false, Ordering::SeqCst) {
                        tracing::warn!(identity = %self.identity, "lost the lease");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    if last_renewed.is_none_or(|t| t.elapsed() > period * 2)
                        && self.leading.swap(false, Ordering::SeqCst)
                    {
                        tracing::warn!(identity = %self.identity, "stepping down: cannot renew the lease");
                    }
                }
            }
            tokio::time::sleep(period).await;
        }
    }

    /// Gives the lease up (on SIGTERM), so another replica takes over at once.
    pub async fn release(&self) {
        self.leading.store(false, Ordering::SeqCst);
        let Ok(Some(mut lease)) = self.api.get_opt(&self.lease).await else { return };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self.api.replace(&self.lease, &PostParams::default(), &lease).await {
            Ok(_) => tracing::info!(identity = %self.identity, "released the lease"),
            Err(e) => tracing::warn!(error = %e, "cannot release the lease"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_secs_ago: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(15),
            renew_time: Some(chrono_to_micro(Utc::now() - chrono::Duration::seconds(renewed_secs_ago))),
            ..LeaseSpec::default()
        }
    }

    /// A fake API server holding one Lease, with the API server's optimistic concurrency:
    /// create conflicts when it exists, replace conflicts on a stale resourceVersion.
    fn lease_server(store: Arc<std::sync::Mutex<(Option<Lease>, u64)>>) -> Client {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().to_string();
                let bytes = request.into_body().collect_bytes().await.unwrap_or_default();
                let failure = |code: u16, reason: &str| {
                    let body = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "message": reason, "reason": reason, "code": code});
                    (code, serde_json::to_vec(&body).unwrap())
                };
                let (code, body) = {
                    let mut s = store.lock().unwrap();
                    match method.as_str() {
                        "GET" => match &s.0 {
                            Some(l) => (200, serde_json::to_vec(l).unwrap()),
                            None => failure(404, "NotFound"),
                        },
                        "POST" if s.0.is_some() => failure(409, "AlreadyExists"),
                        "POST" | "PUT" => {
                            let mut lease: Lease = serde_json::from_slice(&bytes).unwrap();
                            let current = s.0.as_ref().and_then(|l| l.metadata.resource_version.clone());
                            if method == "PUT" && lease.metadata.resource_version != current {
                                failure(409, "Conflict")
                            } else {
                                s.1 += 1;
                                lease.metadata.resource_version = Some(s.1.to_string());
                                s.0 = Some(lease.clone());
                                (200, serde_json::to_vec(&lease).unwrap())
                            }
                        }
                        _ => failure(405, "MethodNotAllowed"),
                    }
                };
                send.send_response(Response::builder().status(code).body(Body::from(body)).unwrap());
            }
        });
        Client::new(service, "default")
    }

    #[tokio::test]
    async fn two_replicas_never_both_lead_and_a_release_hands_over() {
        let store = Arc::new(std::sync::Mutex::new((None, 0)));
        let a = Elector::new(lease_server(store.clone()), "ops", "portcullis-operator", "a", Duration::from_secs(15));
        let b = Elector::new(lease_server(store.clone()), "ops", "portcullis-operator", "b", Duration::from_secs(15));
        let mut leaders = Vec::new();
        for _ in 0..30 {
            let (ra, rb) = tokio::join!(a.round(), b.round());
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            assert!(!(ra && rb), "both lead");
            leaders.push(if ra {
                "a"
            } else if rb {
                "b"
            } else {
                "-"
            });
        }
        let first = leaders.iter().find(|l| **l != "-").copied().expect("somebody leads");
        assert!(leaders.iter().all(|l| *l == first || *l == "-"), "leadership never flips while renewed: {leaders:?}");
        let (leader, follower) = if first == "a" { (&a, &b) } else { (&b, &a) };
        assert!(!follower.round().await.unwrap());
        leader.release().await;
        assert!(!leader.is_leading());
        assert!(follower.round().await.unwrap(), "a released lease is taken at once");
        assert!(!leader.round().await.unwrap(), "and the old leader now waits");
    }

    #[tokio::test]
    async fn a_lease_its_holder_stopped_renewing_is_taken_over() {
        let store = Arc::new(std::sync::Mutex::new((None, 0)));
        let a = Elector::new(lease_server(store.clone()), "ops", "l", "a", Duration::from_secs(1));
        let b = Elector::new(lease_server(store.clone()), "ops", "l", "b", Duration::from_secs(1));
        assert!(a.round().await.unwrap());
        assert!(!b.round().await.unwrap());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(b.round().await.unwrap(), "expired");
        let transitions = store.lock().unwrap().0.as_ref().unwrap().spec.as_ref().unwrap().lease_transitions;
        assert_eq!(transitions, Some(1));
    }

    #[test]
    fn a_live_lease_of_another_replica_is_respected() {
        let now = Utc::now();
        assert_eq!(decide(None, "a", now), Decision::Acquire);
        assert_eq!(decide(Some(&spec(Some("b"), 5)), "a", now), Decision::Wait);
        assert_eq!(decide(Some(&spec(Some("b"), 16)), "a", now), Decision::Acquire, "expired");
        assert_eq!(decide(Some(&spec(Some("a"), 5)), "a", now), Decision::Renew);
        assert_eq!(decide(Some(&spec(None, 1)), "a", now), Decision::Acquire, "released");
        assert_eq!(decide(Some(&spec(Some(""), 1)), "a", now), Decision::Acquire, "released");
    }
}
