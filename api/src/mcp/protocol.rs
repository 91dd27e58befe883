//! MCP wire details shared by both protocol generations: versions, JSON-RPC errors, the
//! request-metadata headers of 2026-07-28 and response framing (JSON or SSE).

use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::{Value, json};

/// The stateless generation.
pub const MODERN_VERSION: &str = "2026-07-28";
/// The stateful generation, newest first.
pub const LEGACY_VERSIONS: [&str; 3] = ["2025-11-25", "2025-06-18", "2025-03-26"];
/// `_meta` key of the protocol version.
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
/// `_meta` key of the client capabilities.
pub const META_CLIENT_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
/// `_meta` key of the client info.
pub const META_CLIENT_INFO: &str = "io.modelcontextprotocol/clientInfo";
/// `_meta` key of the log level a 2026-07-28 request asks for.
pub const META_LOG_LEVEL: &str = "io.modelcontextprotocol/logLevel";
/// `_meta` key of the server's identity on results.
pub const META_SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";

/// Every version served, newest first.
pub fn supported_versions() -> Vec<&'static str> {
    std::iter::once(MODERN_VERSION).chain(LEGACY_VERSIONS).collect()
}

/// A JSON-RPC error together with the HTTP status it travels with.
#[derive(Debug, Clone)]
pub struct RpcError {
    /// JSON-RPC code.
    pub code: i64,
    /// Message.
    pub message: String,
    /// Optional data.
    pub data: Option<Value>,
    /// HTTP status of the response carrying it.
    pub status: StatusCode,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>, status: StatusCode) -> Self {
        Self { code, message: message.into(), data: None, status }
    }

    /// Adds data.
    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    /// -32700.
    pub fn parse_error(detail: impl std::fmt::Display) -> Self {
        Self::new(-32700, format!("Parse error: {detail}"), StatusCode::BAD_REQUEST)
    }

    /// -32600.
    pub fn invalid_request(detail: impl Into<String>) -> Self {
        Self::new(-32600, detail, StatusCode::BAD_REQUEST)
    }

    /// -32601; HTTP 404 on the stateless generation, 200 inside a 2025 session (where a 404
    /// would tell the client its session is gone).
    pub fn method_not_found(method: &str, modern: bool) -> Self {
        let status = if modern { StatusCode::NOT_FOUND } else { StatusCode::OK };
        Self::new(-32601, format!("Method not found: {method}"), status)
    }

    /// -32602 with HTTP 200.
    pub fn invalid_params(detail: impl Into<String>) -> Self {
        Self::new(-32602, detail, StatusCode::OK)
    }

    /// -32602 with HTTP 400: a required `_meta` key is missing.
    pub fn missing_meta(key: &str) -> Self {
        Self::new(-32602, format!("Missing required _meta key {key}"), StatusCode::BAD_REQUEST)
    }

    /// -32602 for a tool that does not exist, or that the caller may not see.
    pub fn unknown_tool(name: &str) -> Self {
        Self::invalid_params(format!("Unknown tool: {name}"))
    }

    /// A resource that does not exist, or that the caller may not see: -32602 in 2026-07-28,
    /// which retired 2025's -32002.
    pub fn resource_not_found(uri: &str, modern: bool) -> Self {
        let code = if modern { -32602 } else { -32002 };
        Self::new(code, format!("Resource not found: {uri}"), StatusCode::OK).with_data(json!({ "uri": uri }))
    }

    /// -32602 for a prompt that does not exist, or that the caller may not see.
    pub fn unknown_prompt(name: &str) -> Self {
        Self::invalid_params(format!("Unknown prompt: {name}"))
    }

    /// An upstream's error relayed as is; the codes 2026-07-28 answers with HTTP 400 (header
    /// mismatch, missing client capability, unsupported version) keep that status.
    pub fn from_upstream(code: i64, message: impl Into<String>, data: Option<Value>) -> Self {
        let status = if matches!(code, -32022..=-32020) { StatusCode::BAD_REQUEST } else { StatusCode::OK };
        Self { code, message: message.into(), data, status }
    }

    /// -32603.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(-32603, detail, StatusCode::OK)
    }

    /// -32020.
    pub fn header_mismatch(detail: impl Into<String>) -> Self {
        Self::new(-32020, format!("Header mismatch: {}", detail.into()), StatusCode::BAD_REQUEST)
    }

    /// -32022 with the versions served.
    pub fn unsupported_version(requested: &Value) -> Self {
        Self::new(-32022, "Unsupported protocol version", StatusCode::BAD_REQUEST)
            .with_data(json!({ "supported": supported_versions(), "requested": requested }))
    }

    /// The `error` member.
    pub fn to_json(&self) -> Value {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(data) = &self.data {
            error["data"] = data.clone();
        }
        error
    }
}

/// How a response body is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `application/json`.
    Json,
    /// `text/event-stream` with one `message` event.
    Sse,
}

/// Picks the framing the `Accept` header allows, preferring JSON; `None` when it allows neither.
pub fn negotiate_framing(headers: &HeaderMap) -> Option<Framing> {
    let accept: Vec<String> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .collect();
    if accept.is_empty() || accept.iter().any(|a| a == "application/json" || a == "application/*" || a == "*/*") {
        Some(Framing::Json)
    } else if accept.iter().any(|a| a == "text/event-stream" || a == "text/*") {
        Some(Framing::Sse)
    } else {
        None
    }
}

/// Sets `key` in `result._meta`, replacing a `_meta` that is not an object (an upstream's answer
/// is not trusted to be well-formed).
pub fn set_meta(result: &mut Value, key: &str, value: Value) {
    let Some(object) = result.as_object_mut() else { return };
    let meta = object.entry("_meta").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    if let Some(meta) = meta.as_object_mut() {
        meta.insert(key.to_string(), value);
    }
}

/// A JSON-RPC response message.
pub fn response_message(id: &Value, outcome: &Result<Value, RpcError>) -> Value {
    match outcome {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        Err(error) => json!({ "jsonrpc": "2.0", "id": id, "error": error.to_json() }),
    }
}

/// One JSON-RPC message as a server-sent `message` event.
pub fn sse_event(message: &Value) -> bytes::Bytes {
    bytes::Bytes::from(format!("event: message\ndata: {message}\n\n"))
}

/// Marks `response` as an event stream that proxies must not buffer.
pub fn event_stream_headers(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

/// Whether the client's `Accept` allows an event stream.
pub fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).any(|v| v.contains("text/event-stream"))
}

/// Encodes a metadata header value: visible ASCII as is, anything else as `=?base64?…?=` (the
/// inverse of `decode_header_value`).
pub fn encode_header_value(text: &str) -> String {
    if text == text.trim() && text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        text.to_string()
    } else {
        format!("=?base64?{}?=", base64::engine::general_purpose::STANDARD.encode(text))
    }
}

/// Frames one JSON-RPC message. Error statuses always go as JSON.
pub fn framed(framing: Framing, status: StatusCode, message: &Value) -> Response {
    if framing == Framing::Sse && status == StatusCode::OK {
        let mut response = axum::body::Body::from(sse_event(message)).into_response();
        event_stream_headers(&mut response);
        response
    } else {
        let body = message.to_string();
        let mut response = (status, body).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }
}

/// Decodes a metadata header value: plain visible ASCII, or `=?base64?…?=` for anything else.
pub fn decode_header_value(raw: &HeaderValue) -> Option<String> {
    // Optional whitespace around a field value is not part of it (RFC 9110 §5.5).
    let text = std::str::from_utf8(raw.as_bytes()).ok()?.trim_matches([' ', '\t']);
    if let Some(encoded) = text.strip_prefix("=?base64?").and_then(|t| t.strip_suffix("?=")) {
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
        return String::from_utf8(bytes).ok();
    }
    if !text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return None;
    }
    Some(text.to_string())
}

/// Checks the `Mcp-Param-{Name}` headers of a `tools/call` against the arguments whose schema
/// properties carry `x-mcp-header: "{Name}"` (2026-07-28): a value in the body needs its
/// header with the same value (integers compared as numbers); a header needs its value.
pub fn check_param_headers(
    headers: &HeaderMap,
    input_schema: &serde_json::Map<String, Value>,
    arguments: &Value,
) -> Result<(), RpcError> {
    let Some(properties) = input_schema.get("properties").and_then(Value::as_object) else { return Ok(()) };
    for (property, schema) in properties {
        let Some(name) = schema.get("x-mcp-header").and_then(Value::as_str) else { continue };
        let header_name = format!("Mcp-Param-{name}");
        let header = headers.get(header_name.as_str());
        match (arguments.get(property).filter(|v| !v.is_null()), header) {
            (None, None) => {}
            (Some(_), None) => {
                return Err(RpcError::header_mismatch(format!("required header {header_name} is missing")));
            }
            (None, Some(_)) => {
                return Err(RpcError::header_mismatch(format!("{header_name} is set but argument {property} is not")));
            }
            (Some(value), Some(raw)) => {
                let Some(text) = decode_header_value(raw) else {
                    return Err(RpcError::header_mismatch(format!("{header_name} header value is not valid")));
                };
                let matches = match value {
                    Value::String(s) => *s == text,
                    Value::Bool(b) => text == b.to_string(),
                    Value::Number(n) => text.parse::<f64>().ok().zip(n.as_f64()).is_some_and(|(a, b)| a == b),
                    _ => false,
                };
                if !matches {
                    return Err(RpcError::header_mismatch(format!(
                        "{header_name} does not match the value of argument {property}"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The `Mcp-Param-{Name}` headers a `tools/call` with `arguments` carries for a tool whose
/// schema is `input_schema`.
pub fn param_headers(input_schema: &serde_json::Map<String, Value>, arguments: &Value) -> Vec<(String, String)> {
    let Some(properties) = input_schema.get("properties").and_then(Value::as_object) else { return Vec::new() };
    properties
        .iter()
        .filter_map(|(property, schema)| {
            let name = schema.get("x-mcp-header").and_then(Value::as_str)?;
            let value = match arguments.get(property)? {
                Value::String(s) => encode_header_value(s),
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.to_string(),
                _ => return None,
            };
            Some((format!("Mcp-Param-{name}"), value))
        })
        .collect()
}

/// Checks that a header mirrors a body value (2026-07-28 request metadata).
pub fn check_mirrored(headers: &HeaderMap, name: &str, expected: &str) -> Result<(), RpcError> {
    let values: Vec<&HeaderValue> = headers.get_all(name).iter().collect();
    match values.as_slice() {
        [] => Err(RpcError::header_mismatch(format!("required header {name} is missing"))),
        [value] => match decode_header_value(value) {
            None => Err(RpcError::header_mismatch(format!("{name} header value is not valid"))),
            Some(v) if v == expected => Ok(()),
            Some(v) => Err(RpcError::header_mismatch(format!(
                "{name} header value '{v}' does not match body value '{expected}'"
            ))),
        },
        _ => Err(RpcError::header_mismatch(format!("{name} header is repeated"))),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn meta_is_set_even_on_an_upstreams_malformed_result() {
        let mut result = serde_json::json!({"content": [], "_meta": "garbage"});
        super::set_meta(&mut result, "k", serde_json::json!(1));
        assert_eq!(result["_meta"], serde_json::json!({"k": 1}));
        let mut result = serde_json::json!({"_meta": {"kept": true}});
        super::set_meta(&mut result, "k", serde_json::json!(2));
        assert_eq!(result["_meta"], serde_json::json!({"kept": true, "k": 2}));
        let mut not_an_object = serde_json::json!("text");
        super::set_meta(&mut not_an_object, "k", serde_json::json!(3));
        assert_eq!(not_an_object, serde_json::json!("text"));
    }

    use super::*;

    #[test]
    fn header_values_decode_plain_and_base64() {
        assert_eq!(decode_header_value(&HeaderValue::from_static("notes.add_note")).as_deref(), Some("notes.add_note"));
        // "héllo" in base64
        assert_eq!(decode_header_value(&HeaderValue::from_static("=?base64?aMOpbGxv?=")).as_deref(), Some("héllo"));
        assert_eq!(decode_header_value(&HeaderValue::from_static("=?base64?!!?=")), None);
        assert_eq!(decode_header_value(&HeaderValue::from_static(" padded\t")).as_deref(), Some("padded"));
    }

    #[test]
    fn mirrored_headers_must_match_exactly() {
        let mut h = HeaderMap::new();
        assert_eq!(check_mirrored(&h, "mcp-method", "tools/list").unwrap_err().code, -32020);
        h.insert("mcp-method", HeaderValue::from_static("tools/call"));
        let e = check_mirrored(&h, "mcp-method", "tools/list").unwrap_err();
        assert!(e.message.contains("'tools/call' does not match body value 'tools/list'"), "{}", e.message);
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        h.insert("mcp-method", HeaderValue::from_static("tools/list"));
        assert!(check_mirrored(&h, "mcp-method", "tools/list").is_ok());
    }

    #[test]
    fn framing_follows_accept() {
        let mut h = HeaderMap::new();
        assert_eq!(negotiate_framing(&h), Some(Framing::Json));
        h.insert(header::ACCEPT, HeaderValue::from_static("text/event-stream"));
        assert_eq!(negotiate_framing(&h), Some(Framing::Sse));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json, text/event-stream"));
        assert_eq!(negotiate_framing(&h), Some(Framing::Json));
        h.insert(header::ACCEPT, HeaderValue::from_static("text/html"));
        assert_eq!(negotiate_framing(&h), None);
    }
}
