//! Production replicas: `portcullis publish` and several `portcullis serve` processes sharing
//! one Postgres and one Redis.

use super::{Api, Killed, Lines, bin, free_port, write_atomically};
use std::process::{Command, Stdio};

/// The secret key every process of a test cluster shares.
pub const SECRET_KEY: &str = "test-secret-key-0123456789abcdefghijklmnop";

/// Shared settings of the processes of one cluster.
pub struct Cluster {
    /// Postgres URL.
    pub database_url: String,
    /// Redis URL.
    pub redis_url: String,
    /// Redis key prefix.
    pub redis_prefix: String,
    /// The manifests `publish` reads.
    pub manifests: tempfile::TempDir,
}

/// One `portcullis serve` process.
pub struct Replica {
    _child: Killed,
    api: Api,
    /// Its log.
    pub stderr: Lines,
}

impl std::ops::Deref for Replica {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Cluster {
    /// A cluster on these backends, with `files` as its manifests.
    pub fn new(database_url: &str, redis_url: &str, redis_prefix: &str, files: &[(&str, String)]) -> Self {
        let manifests = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(manifests.path().join(name), text).expect("write");
        }
        Cluster {
            database_url: database_url.to_string(),
            redis_url: redis_url.to_string(),
            redis_prefix: redis_prefix.to_string(),
            manifests,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("portcullis"));
        c.args(args)
            .env("DATABASE_URL", &self.database_url)
            .env("REDIS_URL", &self.redis_url)
            .env("PORTCULLIS_SECRET_KEY", SECRET_KEY)
            .env("PORTCULLIS_REDIS_PREFIX", &self.redis_prefix)
            .env("PORTCULLIS_REPORT_SECONDS", "1")
            .env("RUST_LOG", "info");
        c
    }

    /// Rewrites one manifest.
    pub fn write(&self, name: &str, text: &str) {
        write_atomically(self.manifests.path(), name, text);
    }

    /// `portcullis migrate`, then `portcullis publish`; returns what publish printed.
    pub fn publish(&self) -> String {
        let migrate = self.command(&["migrate"]).output().expect("run migrate");
        assert!(migrate.status.success(), "migrate failed: {}", String::from_utf8_lossy(&migrate.stderr));
        let manifests = self.manifests.path().display().to_string();
        let out = self.command(&["publish", "--manifests", &manifests]).output().expect("run publish");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "publish failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        stdout
    }

    /// Starts a replica (which applies migrations itself) and waits until it answers HTTP.
    pub async fn replica(&self) -> Replica {
        self.replica_with(&[]).await
    }

    /// A replica with extra environment variables.
    pub async fn replica_with(&self, env: &[(&str, &str)]) -> Replica {
        self.replica_at(free_port(), env).await
    }

    /// A replica listening on `port`, with extra environment variables.
    pub async fn replica_at(&self, port: u16, env: &[(&str, &str)]) -> Replica {
        let mut child = self
            .command(&["serve", "--migrate", "--listen", &format!("127.0.0.1:{port}"), "--config-poll-seconds", "1"])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start portcullis serve");
        let stderr = Lines::default();
        stderr.collect(child.stderr.take().expect("stderr"));
        let replica = Replica { _child: Killed(child), api: Api::new(port), stderr };
        replica.wait_healthy().await;
        replica
    }
}
