//! The HTTP server: MCP, REST, OpenAPI and docs, health and readiness, in one router.

use crate::rest::problem::Problem;
use crate::state::AppState;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use http::{HeaderValue, header};
use serde_json::json;
use std::sync::Arc;

const DOCS_HTML: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Portcullis API</title>
<script type="module" src="/docs/rapidoc-min.js"></script></head>
<body><rapi-doc spec-url="/api/v1/openapi.json" render-style="read" show-header="false"
 allow-authentication="true" theme="light"></rapi-doc></body></html>"#;
const RAPIDOC_JS: &[u8] = include_bytes!("../assets/rapidoc-min.js");

/// Sets TCP_NODELAY on accepted connections: responses written in pieces (SSE) must not wait
/// for delayed ACKs (~40 ms each).
pub fn no_delay(listener: tokio::net::TcpListener) -> impl axum::serve::Listener<Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "Cannot set TCP_NODELAY");
        }
    })
}

/// The whole application.
pub fn router(state: AppState) -> Router {
    let (api, openapi) = crate::rest::router(state.clone());
    let openapi = Arc::new(openapi);
    let json_doc = openapi.to_pretty_json().unwrap_or_default();
    let yaml_doc = openapi.to_yaml().unwrap_or_default();
    Router::new()
        .merge(crate::mcp::router())
        .merge(crate::oauth::router(&state))
        .merge(api)
        .route(
            "/api/v1/openapi.json",
            get(move || async move { ([(header::CONTENT_TYPE, "application/json")], json_doc) }),
        )
        .route(
            "/api/v1/openapi.yaml",
            get(move || async move { ([(header::CONTENT_TYPE, "application/yaml")], yaml_doc) }),
        )
        .route("/docs", get(|| async { Html(DOCS_HTML) }))
        .route(
            "/docs/rapidoc-min.js",
            get(|| async { ([(header::CONTENT_TYPE, HeaderValue::from_static("text/javascript"))], RAPIDOC_JS) }),
        )
        .route("/healthz", get(|| async { axum::Json(json!({ "status": "ok" })) }))
        .route("/readyz", get(readyz))
        .fallback(|uri: http::Uri| async move {
            Problem::not_found(format!(
                "nothing is served at {}; MCP endpoints are under /mcp/, the API under /api/v1/",
                uri.path()
            ))
        })
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        // A body the handler leaves unread (one over the limit) is read after the answer.
        .layer(tower_http::map_request_body::MapRequestBodyLayer::new(crate::unread_body::drained_when_dropped))
        .layer(axum::middleware::from_fn(crate::http_context::layer))
        .with_state(state)
}

async fn readyz(State(app): State<AppState>) -> Response {
    if let Some(backends) = &app.backends
        && let Some(reason) = backends.unavailable().await
    {
        return Problem::unavailable(reason).into_response();
    }
    match app.current() {
        Some(loaded) => axum::Json(json!({
            "status": "ready",
            "version": loaded.version,
            "digest": loaded.snapshot.digest,
            "loaded_at": loaded.loaded_at,
        }))
        .into_response(),
        None => Problem::unavailable("no configuration loaded yet").into_response(),
    }
}
