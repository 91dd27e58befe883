//! A small scenario DSL for end-to-end tests: start the real `notes-mcp-server` and the real
//! `portcullis dev` binaries, write manifests, and call them as a given key.

#![allow(dead_code, reason = "each test file uses a different part of the harness")]

pub mod cluster;
pub mod fake_kube;
pub mod oidc;
pub use portcullis_e2e::{free_port, wait_until};

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Key of the `analyst` persona in [`quickstart`] manifests.
pub const ANALYST_KEY: &str = "pcl_analyst_0123456789abcdefghijklmnop";
/// Key of the `admin` persona.
pub const ADMIN_KEY: &str = "pcl_admin_0123456789abcdefghijklmnopqr";
/// Key of the `outsider` persona, which no endpoint admits.
pub const OUTSIDER_KEY: &str = "pcl_outsider_0123456789abcdefghijklmno";

/// Path of a workspace binary, built next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (the test script does)",
        path.display()
    );
    path
}

/// Installs the TLS crypto backend the workspace's reqwest is built with (the gateway does the
/// same at start); every harness entry point calls it before any HTTP client exists.
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Output lines of a child process, collected in the background.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    pub(crate) fn collect(&self, stream: impl std::io::Read + Send + 'static) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                lines.lock().expect("lines").push(line);
            }
        });
    }

    /// Everything so far, joined.
    pub fn text(&self) -> String {
        self.0.lock().expect("lines").join("\n")
    }
}

pub(crate) struct Killed(pub(crate) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The notes MCP server (or another upstream binary taking `--listen` and `--protocol`).
pub struct Upstream {
    child: Option<Killed>,
    binary: &'static str,
    /// Port it listens on (kept across restarts).
    pub port: u16,
    protocol: String,
    extra: Vec<String>,
}

impl Upstream {
    /// Starts one speaking `protocol` (`both` or `legacy`).
    pub async fn start(protocol: &str) -> Self {
        Self::start_with(protocol, &[]).await
    }

    /// Starts one with extra command-line flags.
    pub async fn start_with(protocol: &str, extra: &[&str]) -> Self {
        Self::start_binary("notes-mcp-server", protocol, extra).await
    }

    /// Starts `binary` (an MCP server built from this workspace) speaking `protocol`.
    pub async fn start_binary(binary: &'static str, protocol: &str, extra: &[&str]) -> Self {
        init();
        let mut upstream = Upstream {
            child: None,
            binary,
            port: free_port(),
            protocol: protocol.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        upstream.restart().await;
        upstream
    }

    /// MCP URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }

    /// Stops it.
    pub fn stop(&mut self) {
        self.child = None;
    }

    /// (Re)starts it on the same port, with empty notes.
    pub async fn restart(&mut self) {
        self.child = None;
        let child = Command::new(bin(self.binary))
            .args(["--listen", &format!("127.0.0.1:{}", self.port), "--protocol", &self.protocol])
            .args(&self.extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.binary));
        self.child = Some(Killed(child));
        wait_until(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok()
        })
        .await;
    }
}

/// Manifests of a tenant `demo` with an analyst, an admin and an outsider persona, the notes
/// connection and endpoint, and keys given as Secrets.
pub fn quickstart(upstream_url: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "personas.yaml",
            r#"apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {name: analyst, namespace: demo}
spec:
  tools: {allow: ["notes.*"], deny: ["notes.delete_note"]}
  resources: {allow: ["notes+note://*", "notes+notes://index"]}
  limits: {maxResultBytes: 4096, toolTimeoutSeconds: 2}
---
apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {name: admin, namespace: demo}
spec: {admin: true, tools: {allow: ["*"]}, resources: {allow: ["*"]}, prompts: {allow: ["*"]}}
---
apiVersion: portcullis.dev/v1alpha1
kind: Persona
metadata: {name: outsider, namespace: demo}
spec: {tools: {allow: ["*"]}}
"#
            .to_string(),
        ),
        (
            "notes.yaml",
            format!(
                r#"apiVersion: portcullis.dev/v1alpha1
kind: Connection
metadata: {{name: notes, namespace: demo}}
spec: {{prefix: notes, mcp: {{url: "{upstream_url}", refreshIntervalSeconds: 5}}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: McpEndpoint
metadata: {{name: notes, namespace: demo}}
spec: {{connections: [notes], personas: [analyst, admin]}}
"#
            ),
        ),
        (
            "keys.yaml",
            format!(
                r#"apiVersion: portcullis.dev/v1alpha1
kind: ApiKey
metadata: {{name: analyst-key, namespace: demo}}
spec: {{persona: analyst, secretName: analyst-key}}
---
apiVersion: v1
kind: Secret
metadata: {{name: analyst-key, namespace: demo}}
stringData: {{key: {ANALYST_KEY}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ApiKey
metadata: {{name: admin-key, namespace: demo}}
spec: {{persona: admin, secretName: admin-key}}
---
apiVersion: v1
kind: Secret
metadata: {{name: admin-key, namespace: demo}}
stringData: {{key: {ADMIN_KEY}}}
---
apiVersion: portcullis.dev/v1alpha1
kind: ApiKey
metadata: {{name: outsider-key, namespace: demo}}
spec: {{persona: outsider, secretName: outsider-key}}
---
apiVersion: v1
kind: Secret
metadata: {{name: outsider-key, namespace: demo}}
stringData: {{key: {OUTSIDER_KEY}}}
"#
            ),
        ),
    ]
}

/// HTTP access to a running gateway (dev mode or a `serve` replica).
pub struct Api {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    http: reqwest::Client,
}

/// A running `portcullis dev`.
pub struct Gateway {
    child: Option<Killed>,
    api: Api,
    port: u16,
    /// The manifests directory.
    pub manifests: tempfile::TempDir,
    /// The data directory.
    pub data: tempfile::TempDir,
    /// Standard output (the banner).
    pub stdout: Lines,
    /// Standard error (the log).
    pub stderr: Lines,
    /// Extra command-line arguments of `portcullis dev`.
    args: Vec<String>,
}

impl std::ops::Deref for Gateway {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Gateway {
    /// Writes `files` and starts dev mode on them; waits until it is ready.
    pub async fn start(files: &[(&str, String)]) -> Self {
        let gateway = Self::start_unready(files).await;
        gateway.wait_ready().await;
        gateway
    }

    /// Like `start`, with extra command-line arguments.
    pub async fn start_with(files: &[(&str, String)], args: &[&str]) -> Self {
        let gateway = Self::launch_with(files, args).await;
        gateway.wait_ready().await;
        gateway
    }

    /// Like `start`, without waiting for a configuration to load.
    pub async fn start_unready(files: &[(&str, String)]) -> Self {
        Self::launch_with(files, &[]).await
    }

    async fn launch_with(files: &[(&str, String)], args: &[&str]) -> Self {
        init();
        let manifests = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(manifests.path().join(name), text).expect("write manifest");
        }
        let port = free_port();
        let mut gateway = Gateway {
            child: None,
            api: Api::new(port),
            port,
            manifests,
            data: tempfile::tempdir().expect("tempdir"),
            stdout: Lines::default(),
            stderr: Lines::default(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        gateway.launch().await;
        gateway
    }

    async fn launch(&mut self) {
        let mut child = Command::new(bin("portcullis"))
            .arg("dev")
            .arg("--manifests")
            .arg(self.manifests.path())
            .arg("--data")
            .arg(self.data.path())
            .args(["--listen", &format!("127.0.0.1:{}", self.port), "--watch-interval-ms", "100"])
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start portcullis");
        self.stdout.collect(child.stdout.take().expect("stdout"));
        self.stderr.collect(child.stderr.take().expect("stderr"));
        self.child = Some(Killed(child));
        self.api.wait_healthy().await;
    }

    /// Stops and starts the process again on the same directories and port.
    pub async fn restart(&mut self) {
        self.child = None;
        self.launch().await;
    }

    /// Rewrites (or adds) one manifest file.
    pub fn write(&self, name: &str, text: &str) {
        write_atomically(self.manifests.path(), name, text);
    }
}

/// Writes a file via rename, as editors do, so a watcher never reads half a file.
pub fn write_atomically(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

impl Api {
    /// Access to a gateway listening on `port`.
    pub fn new(port: u16) -> Self {
        Api { base: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new() }
    }

    /// Waits until the process answers HTTP.
    pub async fn wait_healthy(&self) {
        wait_until(Duration::from_secs(30), || async {
            self.http.get(format!("{}/healthz", self.base)).send().await.is_ok()
        })
        .await;
    }

    /// Waits until a configuration is loaded (and, in production, Postgres and Redis answer).
    pub async fn wait_ready(&self) {
        wait_until(Duration::from_secs(20), || async {
            self.http.get(format!("{}/readyz", self.base)).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    /// The version `/readyz` reports.
    pub async fn version(&self) -> Option<u64> {
        let r = self.http.get(format!("{}/readyz", self.base)).send().await.ok()?;
        r.json::<Value>().await.ok()?["version"].as_u64()
    }

    /// MCP URL of an endpoint.
    pub fn mcp_url(&self, namespace: &str, endpoint: &str) -> String {
        format!("{}/mcp/{namespace}/{endpoint}", self.base)
    }

    /// A REST GET as `key`.
    pub async fn get(&self, key: &str, path: &str) -> reqwest::Response {
        self.http.get(format!("{}{path}", self.base)).header("X-API-Key", key).send().await.expect("GET")
    }

    /// A REST POST of JSON as `key`.
    pub async fn post(&self, key: &str, path: &str, body: &Value) -> reqwest::Response {
        self.http.post(format!("{}{path}", self.base)).header("X-API-Key", key).json(body).send().await.expect("POST")
    }

    /// Calls a tool over REST; returns status and body.
    pub async fn call_tool(&self, key: &str, name: &str, arguments: Value) -> (u16, Value) {
        let r = self.post(key, "/api/v1/admin/tools/call", &json!({"name": name, "arguments": arguments})).await;
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Tool names visible to `key` over REST.
    pub async fn tool_names(&self, key: &str) -> Vec<String> {
        let body: Value = self.get(key, "/api/v1/admin/tools?per_page=500").await.json().await.unwrap_or(Value::Null);
        body["items"].as_array().into_iter().flatten().filter_map(|t| t["name"].as_str().map(str::to_string)).collect()
    }

    /// Audit events visible to the admin key, filtered by `query`.
    pub async fn audit(&self, query: &str) -> Vec<Value> {
        let body: Value = self
            .get(ADMIN_KEY, &format!("/api/v1/admin/audit/events?{query}"))
            .await
            .json()
            .await
            .unwrap_or(Value::Null);
        body["items"].as_array().cloned().unwrap_or_default()
    }

    /// The GET stream of 2025 session `session` on endpoint `demo/<endpoint>`, as `key`.
    pub async fn session_stream(&self, key: &str, endpoint: &str, session: &str) -> reqwest::Response {
        self.http
            .get(self.mcp_url("demo", endpoint))
            .header("X-API-Key", key)
            .header("accept", "text/event-stream")
            .header("Mcp-Session-Id", session)
            .header("MCP-Protocol-Version", "2025-11-25")
            .send()
            .await
            .expect("GET stream")
    }

    /// Ends 2025 session `session` on endpoint `demo/<endpoint>` (DELETE), as `key`.
    pub async fn end_session(&self, key: &str, endpoint: &str, session: &str) -> reqwest::Response {
        self.http
            .delete(self.mcp_url("demo", endpoint))
            .header("X-API-Key", key)
            .header("Mcp-Session-Id", session)
            .header("MCP-Protocol-Version", "2025-11-25")
            .send()
            .await
            .expect("DELETE")
    }

    /// A raw MCP POST (2026-07-28 headers and `_meta` filled in when `modern`).
    pub async fn mcp_raw(&self, key: &str, headers: &[(&str, &str)], body: &str) -> reqwest::Response {
        self.mcp_raw_at(key, "notes", headers, body).await
    }

    /// A raw MCP POST to endpoint `demo/<endpoint>`.
    pub async fn mcp_raw_at(
        &self,
        key: &str,
        endpoint: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(self.mcp_url("demo", endpoint))
            .header("X-API-Key", key)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(body.to_string()).send().await.expect("MCP POST")
    }

    /// A well-formed 2026-07-28 request; returns HTTP status and JSON body.
    pub async fn mcp_modern(&self, key: &str, id: u64, method: &str, params: Value) -> (u16, Value) {
        self.mcp_modern_at(key, "notes", id, method, params).await
    }

    /// A well-formed 2026-07-28 request to endpoint `demo/<endpoint>`.
    pub async fn mcp_modern_at(
        &self,
        key: &str,
        endpoint: &str,
        id: u64,
        method: &str,
        mut params: Value,
    ) -> (u16, Value) {
        let mut meta = json!({
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "e2e", "version": "1"}
        });
        // Keys the caller set (a progress token, a log level) are kept.
        for (key, value) in params.get("_meta").and_then(Value::as_object).cloned().unwrap_or_default() {
            meta[key] = value;
        }
        params["_meta"] = meta;
        let name = params
            .get("name")
            .or_else(|| params.get("uri"))
            .or_else(|| params.get("taskId"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let mut headers = vec![("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", method)];
        if let Some(name) = name.as_deref() {
            headers.push(("Mcp-Name", name));
        }
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
        let r = self.mcp_raw_at(key, endpoint, &headers, &body).await;
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

/// Replaces request-specific members (ids, paths) so two problem documents can be compared.
pub fn without_request_details(mut problem: Value, name: &str) -> Value {
    if let Some(o) = problem.as_object_mut() {
        o.remove("request_id");
        o.remove("instance");
        if let Some(Value::String(d)) = o.get_mut("detail") {
            *d = d.replace(name, "<name>");
        }
    }
    problem
}

/// An open `subscriptions/listen` stream (2026-07-28) and what it has delivered so far.
pub struct ListenStream {
    /// JSON-RPC messages received, in order.
    pub messages: Arc<Mutex<Vec<Value>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl ListenStream {
    /// Opens a listen stream on `demo/<endpoint>` asking for list changes of every kind and
    /// updates of two resources (the analyst persona may read only the first).
    pub async fn open(api: &Api, key: &str, endpoint: &str) -> Self {
        Self::open_following(api, key, endpoint, &["notes+note://1", "notes+notes://logo.png"]).await
    }

    /// Opens a listen stream asking for list changes of every kind and updates of `uris`.
    pub async fn open_following(api: &Api, key: &str, endpoint: &str, uris: &[&str]) -> Self {
        let body = json!({"jsonrpc": "2.0", "id": "listen-1", "method": "subscriptions/listen", "params": {
            "notifications": {"toolsListChanged": true, "promptsListChanged": true, "resourcesListChanged": true,
                "resourceSubscriptions": uris},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}}});
        let mut response = reqwest::Client::new()
            .post(api.mcp_url("demo", endpoint))
            .header("X-API-Key", key)
            .header("content-type", "application/json")
            .header("accept", "text/event-stream")
            .header("MCP-Protocol-Version", "2026-07-28")
            .header("Mcp-Method", "subscriptions/listen")
            .body(body.to_string())
            .send()
            .await
            .expect("listen");
        assert_eq!(response.status(), 200);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        let task = tokio::spawn(async move {
            let mut buffer = String::new();
            while let Ok(Some(chunk)) = response.chunk().await {
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let event: String = buffer.drain(..end + 2).collect();
                    for line in event.lines() {
                        if let Some(data) = line.strip_prefix("data: ")
                            && let Ok(message) = serde_json::from_str::<Value>(data)
                        {
                            sink.lock().unwrap().push(message);
                        }
                    }
                }
            }
        });
        Self { messages, _task: task }
    }

    /// Messages with this method.
    pub fn count(&self, method: &str) -> usize {
        self.messages.lock().unwrap().iter().filter(|m| m["method"] == method).count()
    }
}
