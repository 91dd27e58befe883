//! Load harness: drives `tools/call` through a production replica (`portcullis serve` with
//! Postgres, Redis, auth, persona filtering, rate limits and audit all on) over MCP 2026-07-28,
//! MCP 2025-11-25 sessions and REST, and the same calls directly against the upstream, at fixed
//! concurrency for a fixed time. Reports requests/s, p50/p99 latency, errors, the gateway's CPU
//! per call, and the ratios to direct. Run it with `./scripts/load` (release build).

use anyhow::{Context, bail};
use clap::Parser;
use portcullis_e2e::backends::{Postgres, Redis};
use portcullis_e2e::{free_port, wait_until};
use serde_json::json;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Portcullis load harness")]
struct Args {
    /// Directory holding release builds of `portcullis` and `notes-mcp-server`.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Seconds per scenario.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrency levels to run.
    #[arg(long, value_delimiter = ',', default_value = "16,32")]
    concurrency: Vec<usize>,
    /// Worker threads of the gateway's runtime (`TOKIO_WORKER_THREADS`; default: one per core).
    #[arg(long)]
    gateway_worker_threads: Option<usize>,
    /// The upstream speaks only the 2025 versions (initialize and sessions), so every gateway
    /// call reaches a 2025 upstream; the direct baseline is then a 2025 session's call.
    #[arg(long)]
    legacy_upstream: bool,
    /// Paces the clients to this many calls per second in all (each client waits for its
    /// answer, then for its next turn) instead of calling as fast as answers come. Below the
    /// machine's capacity this measures what the gateway adds to a call, not the queue of a
    /// saturated machine. Latency is counted from when a call is sent.
    #[arg(long)]
    rate: Option<u32>,
}

/// Set once from `--legacy-upstream`.
static LEGACY_UPSTREAM: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn legacy_upstream() -> bool {
    LEGACY_UPSTREAM.load(std::sync::atomic::Ordering::Relaxed)
}

const KEY: &str = "pcl_load_0123456789abcdefghijklmnopqrstu";
const SECRET: &str = "load-harness-secret-key-0123456789abcdef";

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    Direct,
    McpModern,
    McpLegacy,
    Rest,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Direct if legacy_upstream() => "direct to upstream (MCP 2025-11-25)",
            Scenario::Direct => "direct to upstream (MCP 2026-07-28)",
            Scenario::McpModern => "gateway MCP 2026-07-28",
            Scenario::McpLegacy => "gateway MCP 2025-11-25 session",
            Scenario::Rest => "gateway REST",
        }
    }
}

struct Outcome {
    calls: usize,
    errors: usize,
    rps: f64,
    p50: Duration,
    p99: Duration,
    /// The gateway's CPU µs per call.
    cpu_us_per_call: Option<f64>,
    switches_per_call: Option<f64>,
    /// CPU µs per call of the upstream, Redis, Postgres and the load generator.
    others_us_per_call: [Option<f64>; 4],
}

fn manifests(upstream: &str) -> String {
    format!(
        r#"apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {{name: load, namespace: bench}}
spec:
  tools: {{allow: ["notes.*"], deny: ["notes.delete_note"]}}
  limits: {{requestsPerMinute: 100000000, toolCallsPerMinute: 100000000, writesPerMinute: 100000000}}
---
apiVersion: portcullis.dev/v1alpha1
kind: Connection
metadata: {{name: notes, namespace: bench}}
spec: {{prefix: notes, mcp: {{url: "{upstream}"}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: McpEndpoint
metadata: {{name: notes, namespace: bench}}
spec: {{connections: [notes]}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ApiKey
metadata: {{name: load, namespace: bench}}
spec: {{persona: load, secretName: load}}
---
apiVersion: v1
kind: Secret
metadata: {{name: load, namespace: bench}}
stringData: {{key: {KEY}}}
"#
    )
}

/// CPU time (user + system) of a process, from /proc.
fn cpu_time(pid: u32) -> Option<Duration> {
    Some(stat_of(pid)?.cpu)
}

struct Stat {
    parent: u32,
    cpu: Duration,
}

fn stat_of(pid: u32) -> Option<Stat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports in clock ticks of 1/100 s (USER_HZ).
    Some(Stat { parent: fields.get(1)?.parse().ok()?, cpu: Duration::from_millis(ticks * 10) })
}

/// CPU time of a process and all its descendants alive now (Postgres is a postmaster and one
/// process per connection).
fn tree_cpu_time(root: u32) -> Option<Duration> {
    let processes: Vec<(u32, Stat)> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat_of(pid)?)))
        .collect();
    let mut members = vec![root];
    let mut total = Duration::ZERO;
    while let Some(pid) = members.pop() {
        for (child, stat) in &processes {
            if *child == pid {
                total += stat.cpu;
            } else if stat.parent == pid {
                members.push(*child);
            }
        }
    }
    Some(total)
}

/// CPU µs per call between two readings of CPU time.
fn micros_per_call(before: Option<Duration>, after: Option<Duration>, calls: usize) -> Option<f64> {
    let spent = after?.saturating_sub(before?);
    (calls > 0).then(|| spent.as_secs_f64() * 1e6 / calls as f64)
}

/// The processes besides the gateway that every call costs CPU in, all on the same cores.
#[derive(Clone, Copy)]
struct Others {
    upstream: u32,
    redis: Option<u32>,
    postgres: Option<u32>,
}

/// CPU time of the upstream, Redis, Postgres and this load generator, in that order.
fn others_cpu_time(others: Others) -> [Option<Duration>; 4] {
    [
        tree_cpu_time(others.upstream),
        others.redis.and_then(tree_cpu_time),
        others.postgres.and_then(tree_cpu_time),
        cpu_time(std::process::id()),
    ]
}

/// Context switches (voluntary and not) of all of a process's threads, from /proc: each is a
/// thread going to sleep or being put aside, the cost that task wake-ups across threads add.
fn context_switches(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let status = std::fs::read_to_string(task.ok()?.path().join("status")).ok()?;
        for line in status.lines() {
            if let Some(count) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += count.trim().parse::<u64>().ok()?;
            }
        }
    }
    Some(total)
}

fn modern_call(id: u64) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
        "name": "notes.echo", "arguments": {"text": "hello"},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    }})
    .to_string()
}

async fn one_call(
    http: &reqwest::Client,
    scenario: Scenario,
    base: &str,
    upstream: &str,
    session: &str,
    id: u64,
) -> bool {
    let request = match scenario {
        Scenario::Direct if legacy_upstream() => http
            .post(upstream)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("Mcp-Session-Id", session)
            .header("MCP-Protocol-Version", "2025-11-25")
            .body(
                json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hello"}}})
                    .to_string(),
            ),
        Scenario::Direct => http
            .post(upstream)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("MCP-Protocol-Version", "2026-07-28")
            .header("Mcp-Method", "tools/call")
            .header("Mcp-Name", "echo")
            .body(modern_call(id).replace("notes.echo", "echo")),
        Scenario::McpModern => http
            .post(format!("{base}/mcp/bench/notes"))
            .header("X-API-Key", KEY)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("MCP-Protocol-Version", "2026-07-28")
            .header("Mcp-Method", "tools/call")
            .header("Mcp-Name", "notes.echo")
            .body(modern_call(id)),
        Scenario::McpLegacy => http
            .post(format!("{base}/mcp/bench/notes"))
            .header("X-API-Key", KEY)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("Mcp-Session-Id", session)
            .header("MCP-Protocol-Version", "2025-11-25")
            .body(
                json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "notes.echo", "arguments": {"text": "hello"}}})
                    .to_string(),
            ),
        Scenario::Rest => http
            .post(format!("{base}/api/v1/admin/tools/call"))
            .header("X-API-Key", KEY)
            .json(&json!({"name": "notes.echo", "arguments": {"text": "hello"}})),
    };
    match request.send().await {
        Ok(r) if r.status() == 200 => r.text().await.is_ok_and(|t| t.contains("hello") && !t.contains("\"error\"")),
        _ => false,
    }
}

async fn initialize(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let r = http
        .post(format!("{base}/mcp/bench/notes"))
        .header("X-API-Key", KEY)
        .header("content-type", "application/json")
        .body(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"load","version":"1"}}}"#)
        .send()
        .await?;
    Ok(r.headers().get("mcp-session-id").context("no session id")?.to_str()?.to_string())
}

/// A 2025 session straight with the upstream: initialize, then `notifications/initialized`.
async fn initialize_upstream(http: &reqwest::Client, upstream: &str) -> anyhow::Result<String> {
    let r = http
        .post(upstream)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .body(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"load","version":"1"}}}"#)
        .send()
        .await?;
    let session = r.headers().get("mcp-session-id").context("no session id")?.to_str()?.to_string();
    r.bytes().await?;
    http.post(upstream)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("Mcp-Session-Id", &session)
        .header("MCP-Protocol-Version", "2025-11-25")
        .body(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
        .send()
        .await?;
    Ok(session)
}

/// How each scenario is driven: for how long, how fast, and against what.
struct Drive<'a> {
    seconds: u64,
    rate: Option<u32>,
    base: &'a str,
    upstream: &'a str,
    gateway_pid: u32,
    others: Others,
}

async fn run(scenario: Scenario, concurrency: usize, drive: &Drive<'_>) -> anyhow::Result<Outcome> {
    let Drive { seconds, rate, base, upstream, gateway_pid, others } = *drive;
    let http = reqwest::Client::builder().pool_max_idle_per_host(concurrency * 2).build()?;
    let mut sessions = Vec::new();
    for _ in 0..concurrency {
        sessions.push(match scenario {
            Scenario::McpLegacy => initialize(&http, base).await?,
            Scenario::Direct if legacy_upstream() => initialize_upstream(&http, upstream).await?,
            _ => String::new(),
        });
    }
    // Warm up connections and caches.
    for session in &sessions {
        one_call(&http, scenario, base, upstream, session, 0).await;
    }
    let cpu_before = cpu_time(gateway_pid);
    let switches_before = context_switches(gateway_pid);
    let others_before = others_cpu_time(others);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    let (base, upstream) = (Arc::new(base.to_string()), Arc::new(upstream.to_string()));
    for (worker, session) in sessions.into_iter().enumerate() {
        let (http, base, upstream) = (http.clone(), base.clone(), upstream.clone());
        // Each client's turns, when paced: the clients' starts are spread over one period.
        let mut turns = rate.map(|rate| {
            let period = Duration::from_secs_f64(concurrency as f64 / f64::from(rate.max(1)));
            let first = tokio::time::Instant::now() + period.mul_f64(worker as f64 / concurrency as f64);
            let mut turns = tokio::time::interval_at(first, period);
            // A late call does not make the next ones come in a burst.
            turns.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            turns
        });
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            let mut id = (worker as u64) << 32;
            while Instant::now() < deadline {
                if let Some(turns) = turns.as_mut() {
                    turns.tick().await;
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                id += 1;
                let t = Instant::now();
                if one_call(&http, scenario, &base, &upstream, &session, id).await {
                    latencies.push(t.elapsed());
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (l, e) = worker.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    let cpu_after = cpu_time(gateway_pid);
    let switches_after = context_switches(gateway_pid);
    let others_after = others_cpu_time(others);
    latencies.sort();
    let at = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let calls = latencies.len();
    let gateway = scenario != Scenario::Direct;
    let cpu_us_per_call = micros_per_call(cpu_before, cpu_after, calls).filter(|_| gateway);
    let switches_per_call = match (switches_before, switches_after) {
        (Some(before), Some(after)) if gateway && calls > 0 => Some(after.saturating_sub(before) as f64 / calls as f64),
        _ => None,
    };
    let others_us_per_call = std::array::from_fn(|i| micros_per_call(others_before[i], others_after[i], calls));
    Ok(Outcome {
        others_us_per_call,
        calls,
        errors,
        rps: calls as f64 / elapsed.as_secs_f64(),
        p50: at(0.5),
        p99: at(0.99),
        cpu_us_per_call,
        switches_per_call,
    })
}

fn start(bin: PathBuf, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Killed> {
    let mut command = Command::new(&bin);
    command.args(args).stdout(Stdio::null()).stderr(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    Ok(Killed(command.spawn().with_context(|| format!("cannot start {}", bin.display()))?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let portcullis = args.bin_dir.join("portcullis");
    let notes = args.bin_dir.join("notes-mcp-server");
    if !portcullis.exists() || !notes.exists() {
        bail!("build first: cargo build --release -p portcullis -p notes-mcp-server (scripts/load does)");
    }
    let postgres = Postgres::start().await;
    let redis = Redis::start().await;
    let upstream_port = free_port();
    LEGACY_UPSTREAM.store(args.legacy_upstream, std::sync::atomic::Ordering::Relaxed);
    let listen = format!("127.0.0.1:{upstream_port}");
    let mut notes_args = vec!["--listen", listen.as_str()];
    if args.legacy_upstream {
        notes_args.extend(["--protocol", "legacy"]);
    }
    let notes = start(notes, &notes_args, &[("RUST_LOG", "warn")])?;
    let others = Others { upstream: notes.0.id(), redis: redis.pid(), postgres: postgres.pid() };
    let upstream = format!("http://127.0.0.1:{upstream_port}/mcp");
    let manifest_dir = tempfile::tempdir()?;
    std::fs::write(manifest_dir.path().join("bench.yaml"), manifests(&upstream))?;
    let env = [
        ("DATABASE_URL", postgres.url()),
        ("REDIS_URL", redis.url()),
        ("PORTCULLIS_SECRET_KEY", SECRET.to_string()),
        ("RUST_LOG", "warn".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let migrate = Command::new(&portcullis).arg("migrate").envs(env.iter().copied()).output()?;
    anyhow::ensure!(migrate.status.success(), "migrate failed: {}", String::from_utf8_lossy(&migrate.stderr));
    let publish = Command::new(&portcullis)
        .args(["publish", "--manifests"])
        .arg(manifest_dir.path())
        .envs(env.iter().copied())
        .output()?;
    anyhow::ensure!(publish.status.success(), "publish failed: {}", String::from_utf8_lossy(&publish.stdout));
    let port = free_port();
    let threads = args.gateway_worker_threads.map(|n| n.to_string());
    let mut gateway_env = env.clone();
    if let Some(threads) = &threads {
        gateway_env.push(("TOKIO_WORKER_THREADS", threads.as_str()));
    }
    let gateway = start(portcullis, &["serve", "--listen", &format!("127.0.0.1:{port}")], &gateway_env)?;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_until(Duration::from_secs(30), || async {
        http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    wait_until(Duration::from_secs(10), || async { one_call(&http, Scenario::Rest, &base, &upstream, "", 1).await })
        .await;

    println!(
        "cores: {}, {} s per scenario{}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        args.seconds,
        args.rate.map(|r| format!(", clients paced to {r} calls/s in all")).unwrap_or_default()
    );
    println!(
        "{:<40} {:>5} {:>9} {:>9} {:>9} {:>7} {:>12} {:>9} {:>8}",
        "scenario", "conc", "req/s", "p50 ms", "p99 ms", "errors", "CPU µs/call", "cs/call", "vs direct"
    );
    let drive = Drive {
        seconds: args.seconds,
        rate: args.rate,
        base: &base,
        upstream: &upstream,
        gateway_pid: gateway.0.id(),
        others,
    };
    let mut shares = Vec::new();
    for &concurrency in &args.concurrency {
        let mut direct: Option<Outcome> = None;
        for scenario in [Scenario::Direct, Scenario::McpModern, Scenario::McpLegacy, Scenario::Rest] {
            let o = run(scenario, concurrency, &drive).await?;
            let ratio = direct.as_ref().map(|d| format!("{:.2}x", o.rps / d.rps)).unwrap_or_default();
            let added = direct
                .as_ref()
                .map(|d| {
                    format!(
                        " (+{:.2} / +{:.2} ms)",
                        o.p50.as_secs_f64() * 1e3 - d.p50.as_secs_f64() * 1e3,
                        o.p99.as_secs_f64() * 1e3 - d.p99.as_secs_f64() * 1e3
                    )
                })
                .unwrap_or_default();
            println!(
                "{:<40} {:>5} {:>9.0} {:>9.2} {:>9.2} {:>7} {:>12} {:>9} {:>8}{added}",
                scenario.name(),
                concurrency,
                o.rps,
                o.p50.as_secs_f64() * 1e3,
                o.p99.as_secs_f64() * 1e3,
                o.errors,
                o.cpu_us_per_call.map(|c| format!("{c:.1}")).unwrap_or_else(|| "-".into()),
                o.switches_per_call.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into()),
                ratio
            );
            let _ = o.calls;
            shares.push((scenario.name(), concurrency, o.cpu_us_per_call, o.others_us_per_call));
            if scenario == Scenario::Direct {
                direct = Some(o);
            }
        }
    }
    // Every process shares the same cores, so a call's throughput is bounded by the CPU that all
    // of them spend on it together: a gateway call costs the upstream and the load generator as
    // much as a direct one does, plus the gateway, Redis and Postgres.
    println!();
    println!("CPU µs per call of every process on the machine (the cores are shared; - when not measured)");
    println!(
        "{:<40} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12}",
        "scenario", "conc", "gateway", "upstream", "redis", "postgres", "load", "total", "cores/total"
    );
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    for (name, concurrency, gateway, [upstream, redis, postgres, load]) in shares {
        let show = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        let total: f64 = [gateway, upstream, redis, postgres, load].iter().flatten().sum();
        println!(
            "{:<40} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9.1} {:>10.0}/s",
            name,
            concurrency,
            show(gateway),
            show(upstream),
            show(redis),
            show(postgres),
            show(load),
            total,
            cores * 1e6 / total.max(1.0)
        );
    }
    Ok(())
}
