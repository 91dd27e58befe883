//! Throwaway Postgres and Redis servers for the production tests, started from the binaries on
//! PATH (Debian's Postgres binaries live in /usr/lib/postgresql/<v>/bin). `DATABASE_URL` and
//! `REDIS_URL`, when set, are used instead for tests that do not stop the servers.

use crate::{free_port, wait_until};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn find_postgres_bin(name: &str) -> PathBuf {
    if let Ok(out) = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin").join(name)).filter(|p| p.exists()).collect())
        .unwrap_or_default();
    versions.sort();
    versions.pop().unwrap_or_else(|| panic!("{name} not found: install postgresql (scripts/test does)"))
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// Postgres refuses to run as root; run it as the `postgres` user then.
fn as_postgres_user(program: PathBuf) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A Postgres server of this test's own.
pub struct Postgres {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Port.
    pub port: u16,
}

impl Postgres {
    /// initdb and start.
    pub async fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("pcl-pg").tempdir().expect("tempdir");
        if is_root() {
            let status =
                Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().expect("chown");
            assert!(status.success());
        }
        let data = dir.path().join("data");
        let out = as_postgres_user(find_postgres_bin("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut pg = Postgres { dir, child: None, port: free_port() };
        pg.restart().await;
        pg
    }

    /// Process id of what was started (the postmaster, or `runuser` above it when run as root);
    /// its descendants are the server's processes.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// URL of the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast shutdown: connections are cut).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Signals to `runuser` do not reach the postmaster; pg_ctl talks to it directly.
            let _ = as_postgres_user(find_postgres_bin("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-m", "fast", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub async fn restart(&mut self) {
        self.stop();
        let child = as_postgres_user(find_postgres_bin("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-k"])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.dir.path().join("postgres.log")).map(Stdio::from).unwrap_or(Stdio::null()),
            )
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let port = self.port;
        wait_until(Duration::from_secs(30), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        // Accepting TCP comes slightly before accepting queries; the gateway retries anyway.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis server of this test's own.
pub struct Redis {
    child: Option<Child>,
    /// Port.
    pub port: u16,
}

impl Redis {
    /// Starts one without persistence.
    pub async fn start() -> Self {
        let mut redis = Redis { child: None, port: free_port() };
        redis.restart().await;
        redis
    }

    /// Process id of the server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty: it keeps nothing).
    pub async fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (install redis-server; scripts/test does)");
        self.child = Some(child);
        let port = self.port;
        wait_until(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Postgres and Redis for a test that does not stop them: `DATABASE_URL`/`REDIS_URL` when set
/// (a fresh database per test), else servers of its own.
pub struct Shared {
    /// Postgres URL.
    pub database_url: String,
    /// Redis URL.
    pub redis_url: String,
    /// Redis key prefix unique to this test.
    pub redis_prefix: String,
    _postgres: Option<Postgres>,
    _redis: Option<Redis>,
}

impl Shared {
    /// Starts or borrows the backends.
    pub async fn start() -> Self {
        let unique = format!("t{}", uuid_like());
        let (database_url, postgres) = match std::env::var("DATABASE_URL") {
            Ok(url) => {
                let out = Command::new("psql")
                    .arg(&url)
                    .arg("-c")
                    .arg(format!("CREATE DATABASE {unique}"))
                    .output()
                    .expect("psql");
                assert!(
                    out.status.success(),
                    "cannot create a test database: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let base = url.rsplit_once('/').map(|(b, _)| b.to_string()).unwrap_or(url);
                (format!("{base}/{unique}"), None)
            }
            Err(_) => {
                let pg = Postgres::start().await;
                (pg.url(), Some(pg))
            }
        };
        let (redis_url, redis) = match std::env::var("REDIS_URL") {
            Ok(url) => (url, None),
            Err(_) => {
                let r = Redis::start().await;
                (r.url(), Some(r))
            }
        };
        Shared { database_url, redis_url, redis_prefix: format!("{unique}:"), _postgres: postgres, _redis: redis }
    }
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{:x}{:x}", nanos, std::process::id())
}
