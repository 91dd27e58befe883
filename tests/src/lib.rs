//! Test and load-harness support shared by the end-to-end tests (`tests/`) and the load harness
//! (`src/bin/load.rs`): throwaway Postgres and Redis servers, free ports, polling.

pub mod backends;

use std::time::{Duration, Instant};

/// A free local port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Polls `check` until it is true or `limit` passes (then panics).
pub async fn wait_until<F, Fut>(limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "condition not met within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
