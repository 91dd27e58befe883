//! Per-request context every handler and error can read: the request id (also sent back as
//! `X-Request-Id`) and the path, used as the `instance` of problem documents.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http::HeaderValue;

/// What is known about the request being served.
#[derive(Clone, Debug)]
pub struct RequestInfo {
    /// Request id.
    pub id: String,
    /// Request path.
    pub path: String,
}

tokio::task_local! {
    static REQUEST: RequestInfo;
}

/// The request being served, if called within one.
pub fn current() -> Option<RequestInfo> {
    REQUEST.try_with(Clone::clone).ok()
}

/// The current request id, or a fresh one outside a request.
pub fn request_id() -> String {
    REQUEST.try_with(|r| r.id.clone()).unwrap_or_else(|_| uuid::Uuid::now_v7().to_string())
}

/// Middleware: assigns the request id and makes the context available.
pub async fn layer(request: Request, next: Next) -> Response {
    let id = uuid::Uuid::now_v7().to_string();
    let info = RequestInfo { id: id.clone(), path: request.uri().path().to_string() };
    let mut response = REQUEST.scope(info, next.run(request)).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}
