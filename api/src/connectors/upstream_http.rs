//! HTTP/1.1 to plain-`http://` upstreams (in-cluster services) over pooled keep-alive
//! connections, written and read by the calling task itself.
//!
//! A general-purpose client (reqwest over hyper) runs every connection in a task of its own: a
//! request is handed to that task through a channel, and its response and body come back through
//! others, so each call wakes two or three tasks, often on the other core. Profiles of the
//! gateway put those task switches among the largest costs of a call. (Driving hyper's connection
//! inside the caller's task keeps those channels, and measured worse still: every hand-over
//! becomes a task waking itself.) Here a call writes its request and reads its answer on its own
//! socket, so it wakes only when the answer arrives. `https://` upstreams go through reqwest (its
//! TLS and roots).
//!
//! What a pooled client must get right and this does: a response's end is known from its
//! framing (`Content-Length`, chunked, or the close of a connection that said neither), and only
//! a connection whose response was read to that end, that the server keeps open (HTTP/1.1
//! without `Connection: close`) and that holds nothing unread goes back to the pool; an idle
//! connection the server has closed is noticed before reuse and never used; the pool is bounded
//! and forgets connections idle longer than [`IDLE_TIMEOUT`]; heads and chunk lines have size
//! limits.

use bytes::{Buf, Bytes, BytesMut};
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long an idle connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per upstream: enough for the concurrency one replica sees.
const MAX_IDLE: usize = 512;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// The largest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4 * 1024;
const MAX_HEADERS: usize = 100;
const READ_SIZE: usize = 16 * 1024;

/// One open connection and what has been read from it but not yet used.
struct Conn {
    stream: TcpStream,
    buffer: BytesMut,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Connections to one upstream URL's origin, posting to its path.
pub struct UpstreamHttp {
    host: String,
    port: u16,
    // `Host` and the request target, as sent.
    authority: String,
    target: String,
    idle: Mutex<Vec<Idle>>,
}

/// Why a request got no response.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl UpstreamHttp {
    /// The pool for `url`, when it is plain HTTP without credentials in the URL.
    pub fn for_url(url: &reqwest::Url) -> Option<Arc<Self>> {
        if url.scheme() != "http" || !url.username().is_empty() || url.password().is_some() {
            return None;
        }
        let host = url.host_str()?;
        let port = url.port_or_known_default()?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        let target = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_string(),
        };
        // Bracketed IPv6 literals are connected to without their brackets.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        Some(Arc::new(Self { host, port, authority, target, idle: Mutex::new(Vec::new()) }))
    }

    /// POSTs `body` with `headers` (`Host` and `Content-Length` are added) and reads the
    /// response head; the body is read from the returned [`Response`].
    pub async fn post(self: &Arc<Self>, headers: &http::HeaderMap, body: &[u8]) -> Result<Response, Unreachable> {
        let mut request = Vec::with_capacity(256 + body.len());
        let _ = write!(request, "POST {} HTTP/1.1\r\nhost: {}\r\n", self.target, self.authority);
        for (name, value) in headers {
            request.extend_from_slice(name.as_str().as_bytes());
            request.extend_from_slice(b": ");
            request.extend_from_slice(value.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        let _ = write!(request, "content-length: {}\r\n\r\n", body.len());
        request.extend_from_slice(body);

        let mut conn = match self.take_idle() {
            Some(mut conn) => match conn.stream.write_all(&request).await {
                Ok(()) => conn,
                // Closed by the server before this request reached it: nothing was sent, so
                // sending it on a new connection cannot run it twice.
                Err(_) => self.send_on_new(&request).await?,
            },
            None => self.send_on_new(&request).await?,
        };
        let head = read_head(&mut conn).await.map_err(Unreachable)?;
        // An empty body (`Length(0)`) frees the connection at the first read, or on drop.
        Ok(Response {
            status: head.status,
            headers: head.headers,
            framing: head.framing,
            keep_alive: head.keep_alive,
            conn: Some(conn),
            pool: self.clone(),
        })
    }

    async fn send_on_new(&self, request: &[u8]) -> Result<Conn, Unreachable> {
        let mut conn = self.connect().await?;
        conn.stream
            .write_all(request)
            .await
            .map_err(|e| Unreachable(format!("sending to {}:{}: {e}", self.host, self.port)))?;
        Ok(conn)
    }

    /// An idle connection still open: one the server has closed reads as ended at once.
    fn take_idle(&self) -> Option<Conn> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            if idle.since.elapsed() > IDLE_TIMEOUT {
                // The oldest are at the bottom: everything below is older still.
                self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
                return None;
            }
            // Asked of the socket itself, not of the runtime's readiness, which may not have
            // heard yet of a close the kernel already has.
            let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
            match socket2::SockRef::from(&idle.conn.stream).peek(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(idle.conn),
                // Closed, failed, or sending what nobody asked for: not to be used.
                _ => continue,
            }
        }
    }

    async fn connect(&self) -> Result<Conn, Unreachable> {
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| Unreachable(format!("connecting to {}:{} timed out", self.host, self.port)))?
            .map_err(|e| Unreachable(format!("cannot connect to {}:{}: {e}", self.host, self.port)))?;
        // Requests are small and answered at once: never wait to fill a segment.
        stream.set_nodelay(true).map_err(|e| Unreachable(e.to_string()))?;
        Ok(Conn { stream, buffer: BytesMut::with_capacity(READ_SIZE) })
    }

    fn put_back(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle { conn, since: Instant::now() });
        }
    }
}

enum Step {
    Piece(Bytes),
    End,
    NeedMore,
    Failed(String),
}

impl Drop for Response {
    fn drop(&mut self) {
        // What has already arrived, without waiting.
        for _ in 0..4 {
            match self.step() {
                Step::End | Step::Failed(_) => return,
                Step::Piece(_) => continue,
                Step::NeedMore => {
                    let Some(conn) = self.conn.as_mut() else { return };
                    conn.buffer.reserve(READ_SIZE);
                    match conn.stream.try_read_buf(&mut conn.buffer) {
                        Ok(n) if n > 0 => continue,
                        _ => break,
                    }
                }
            }
        }
        // The end is on its way (a server ends an event stream just after its answer, often in
        // a segment of its own): a short-lived task reads it, so that the next request need not
        // open a connection. A body that goes on is not waited for.
        if !self.keep_alive || self.conn.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let rest = Response {
            status: self.status,
            headers: http::HeaderMap::new(),
            framing: self.framing,
            keep_alive: true,
            conn: self.conn.take(),
            pool: self.pool.clone(),
        };
        runtime.spawn(finish_in_background(rest));
    }
}

/// Reads the rest of an abandoned response (a little, for a short while) and so frees its
/// connection; a response with more to say is closed instead.
async fn finish_in_background(mut rest: Response) {
    const REST_LIMIT: usize = 16 * 1024;
    const REST_WAIT: Duration = Duration::from_millis(500);
    let drained = tokio::time::timeout(REST_WAIT, async {
        let mut read = 0;
        while let Some(piece) = rest.chunk().await? {
            read += piece.len();
            if read > REST_LIMIT {
                return Err("too much left".to_string());
            }
        }
        Ok(())
    })
    .await;
    if !matches!(drained, Ok(Ok(()))) {
        rest.conn = None;
    }
}

/// How the end of a response body is known.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// The body ends when the server closes the connection.
    UntilClose,
    Done,
}

/// Where a chunked body's reading stands.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

struct Head {
    status: http::StatusCode,
    headers: http::HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

/// Reads the final response head (interim 1xx responses are skipped).
async fn read_head(conn: &mut Conn) -> Result<Head, String> {
    loop {
        let parsed = {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut slots);
            match response.parse(&conn.buffer) {
                Err(e) => return Err(format!("unreadable response: {e}")),
                Ok(httparse::Status::Partial) => None,
                Ok(httparse::Status::Complete(length)) => Some((length, head_of(&response)?)),
            }
        };
        match parsed {
            Some((length, head)) => {
                conn.buffer.advance(length);
                if head.status.is_informational() {
                    continue;
                }
                return Ok(head);
            }
            None if conn.buffer.len() > MAX_HEAD => return Err("response head too large".into()),
            None => {
                if read_more(conn).await? == 0 {
                    return Err("the connection closed before a response".into());
                }
            }
        }
    }
}

fn head_of(response: &httparse::Response<'_, '_>) -> Result<Head, String> {
    let status = response
        .code
        .and_then(|code| http::StatusCode::from_u16(code).ok())
        .ok_or("response without a valid status")?;
    let mut headers = http::HeaderMap::with_capacity(response.headers.len());
    let mut chunked = false;
    let mut length: Option<u64> = None;
    let mut close = response.version != Some(1);
    for header in response.headers.iter() {
        let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(header.name.as_bytes()), http::HeaderValue::from_bytes(header.value))
        else {
            return Err("response with an invalid header".into());
        };
        let text = value.to_str().unwrap_or_default().to_ascii_lowercase();
        if name == http::header::TRANSFER_ENCODING {
            // The last coding decides (RFC 9112 §6.3).
            chunked = text.rsplit(',').next().is_some_and(|c| c.trim() == "chunked");
        } else if name == http::header::CONTENT_LENGTH {
            let value: u64 = text.trim().parse().map_err(|_| "response with an invalid Content-Length")?;
            if length.is_some_and(|l| l != value) {
                return Err("response with conflicting Content-Length".into());
            }
            length = Some(value);
        } else if name == http::header::CONNECTION {
            if text.split(',').any(|t| t.trim() == "close") {
                close = true;
            } else if text.split(',').any(|t| t.trim() == "keep-alive") && response.version == Some(0) {
                close = false;
            }
        }
        headers.append(name, value);
    }
    let framing = if status == http::StatusCode::NO_CONTENT || status == http::StatusCode::NOT_MODIFIED {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked(Chunk::Size)
    } else if let Some(length) = length {
        Framing::Length(length)
    } else {
        Framing::UntilClose
    };
    Ok(Head { status, headers, framing, keep_alive: !close && framing != Framing::UntilClose })
}

async fn read_more(conn: &mut Conn) -> Result<usize, String> {
    conn.buffer.reserve(READ_SIZE);
    conn.stream.read_buf(&mut conn.buffer).await.map_err(|e| e.to_string())
}

/// A response whose body is still to be read. Dropped before its end (an event stream whose
/// answer has come), what has already arrived of the rest is read without waiting: a body that
/// turns out complete lets the connection be reused (servers commonly end such a stream right
/// after the answer); otherwise the connection is closed, since what is left unread cannot be
/// skipped safely.
pub struct Response {
    status: http::StatusCode,
    headers: http::HeaderMap,
    framing: Framing,
    keep_alive: bool,
    conn: Option<Conn>,
    pool: Arc<UpstreamHttp>,
}

impl Response {
    pub fn status(&self) -> http::StatusCode {
        self.status
    }

    pub fn headers(&self) -> &http::HeaderMap {
        &self.headers
    }

    /// The next piece of the body as it arrives; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            match self.step() {
                Step::Piece(piece) => return Ok(Some(piece)),
                Step::End => return Ok(None),
                Step::Failed(error) => {
                    self.conn = None;
                    return Err(error);
                }
                Step::NeedMore => {
                    let Some(conn) = self.conn.as_mut() else { return Ok(None) };
                    match read_more(conn).await {
                        Ok(0) if self.framing == Framing::UntilClose => self.finish(),
                        Ok(0) => {
                            self.conn = None;
                            return Err("the connection closed in the middle of the response".into());
                        }
                        Ok(_) => {}
                        Err(error) => {
                            self.conn = None;
                            return Err(error);
                        }
                    }
                }
            }
        }
    }

    /// One step through what has been read: a piece of the body, its end, or the need to read.
    fn step(&mut self) -> Step {
        loop {
            let Some(conn) = self.conn.as_mut() else { return Step::End };
            match self.framing {
                Framing::Done => return Step::End,
                Framing::Length(0) => self.finish(),
                _ if conn.buffer.is_empty() => return Step::NeedMore,
                Framing::Length(left) => {
                    let take = conn.buffer.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.framing = Framing::Length(left - take as u64);
                    return Step::Piece(conn.buffer.split_to(take).freeze());
                }
                Framing::UntilClose => return Step::Piece(conn.buffer.split().freeze()),
                Framing::Chunked(Chunk::Data(left)) => {
                    let take = conn.buffer.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - take as u64;
                    self.framing = Framing::Chunked(if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) });
                    return Step::Piece(conn.buffer.split_to(take).freeze());
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if conn.buffer.len() < 2 {
                        return Step::NeedMore;
                    }
                    if &conn.buffer[..2] != b"\r\n" {
                        return Step::Failed("malformed chunked response".into());
                    }
                    conn.buffer.advance(2);
                    self.framing = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(stage @ (Chunk::Size | Chunk::Trailers)) => {
                    let Some(end) = conn.buffer.windows(2).position(|w| w == b"\r\n") else {
                        if conn.buffer.len() > MAX_LINE {
                            return Step::Failed("malformed chunked response".into());
                        }
                        return Step::NeedMore;
                    };
                    let line = conn.buffer.split_to(end + 2);
                    let line = &line[..end];
                    if stage == Chunk::Trailers {
                        if line.is_empty() {
                            self.finish();
                        }
                        continue;
                    }
                    let Some(size) = std::str::from_utf8(line)
                        .ok()
                        .and_then(|l| u64::from_str_radix(l.split(';').next().unwrap_or_default().trim(), 16).ok())
                    else {
                        return Step::Failed("malformed chunked response".into());
                    };
                    self.framing = Framing::Chunked(if size == 0 { Chunk::Trailers } else { Chunk::Data(size) });
                }
            }
        }
    }

    /// The body has been read to its end: the connection goes back to the pool if it may.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buffer.is_empty()
        {
            self.pool.put_back(conn);
        }
    }

    /// The whole body.
    pub async fn bytes(mut self) -> Result<Bytes, String> {
        let Some(first) = self.chunk().await? else { return Ok(Bytes::new()) };
        let Some(second) = self.chunk().await? else { return Ok(first) };
        let mut whole = Vec::with_capacity(first.len() + second.len());
        whole.extend_from_slice(&first);
        whole.extend_from_slice(&second);
        while let Some(piece) = self.chunk().await? {
            whole.extend_from_slice(&piece);
        }
        Ok(Bytes::from(whole))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// How the test server answers each request it reads.
    #[derive(Clone, Copy)]
    enum Answer {
        /// `200` with a JSON body, connection kept open.
        KeepAlive,
        /// `200`, then the server closes the connection shortly after (an idle timeout).
        CloseWhenIdle,
        /// An event stream sent in three pieces with pauses, then the end.
        Stream,
        /// An interim `100`, then a chunked body with a chunk extension and a trailer.
        ChunkedWithTrailer,
        /// `Connection: close` with a length; the server then leaves the socket open.
        SaysClose,
        /// Neither length nor chunks: the body ends when the server closes.
        UntilClose,
    }

    /// A one-purpose HTTP/1.1 server: counts connections and hands each request's head and body
    /// to the test.
    struct Server {
        url: reqwest::Url,
        connections: Arc<std::sync::atomic::AtomicUsize>,
        requests: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    }

    async fn server(answer: Answer) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url =
            reqwest::Url::parse(&format!("http://{}/mcp?x=1", listener.local_addr().expect("addr"))).expect("url");
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (tx, requests) = tokio::sync::mpsc::unbounded_channel();
        let counted = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(serve(socket, answer, tx.clone()));
            }
        });
        Server { url, connections, requests }
    }

    async fn serve(
        mut socket: TcpStream,
        answer: Answer,
        requests: tokio::sync::mpsc::UnboundedSender<(String, String)>,
    ) {
        let mut buffer = Vec::new();
        loop {
            let head_end = loop {
                if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end + 4;
                }
                let mut piece = [0u8; 4096];
                match socket.read(&mut piece).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buffer.extend_from_slice(&piece[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            while buffer.len() < head_end + length {
                let mut piece = [0u8; 4096];
                match socket.read(&mut piece).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buffer.extend_from_slice(&piece[..n]),
                }
            }
            let body = String::from_utf8_lossy(&buffer[head_end..head_end + length]).to_string();
            buffer.drain(..head_end + length);
            let _ = requests.send((head, body.clone()));
            match answer {
                Answer::KeepAlive | Answer::CloseWhenIdle => {
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if socket.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                    if matches!(answer, Answer::CloseWhenIdle) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        return;
                    }
                }
                Answer::ChunkedWithTrailer => {
                    let reply = format!(
                        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                         {:x};ext=1\r\n{body}\r\n0\r\nx-trailer: 1\r\n\r\n",
                        body.len()
                    );
                    if socket.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
                Answer::SaysClose => {
                    let reply =
                        format!("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                    let _ = socket.write_all(reply.as_bytes()).await;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    return;
                }
                Answer::UntilClose => {
                    let _ = socket.write_all(format!("HTTP/1.1 200 OK\r\n\r\n{body}").as_bytes()).await;
                    return;
                }
                Answer::Stream => {
                    let head =
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                    if socket.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    for n in 1..=3 {
                        let event = format!("data: {n}\n\n");
                        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                        if socket.write_all(chunk.as_bytes()).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if socket.write_all(b"0\r\n\r\n").await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    async fn send(pool: &Arc<UpstreamHttp>, body: &str) -> Result<Response, Unreachable> {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        pool.post(&headers, body.as_bytes()).await
    }

    fn connections(server: &Server) -> usize {
        server.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[tokio::test]
    async fn requests_in_turn_share_one_connection_and_carry_host_and_length() {
        let mut server = server(Answer::KeepAlive).await;
        let pool = UpstreamHttp::for_url(&server.url).expect("plain http");
        for n in 0..5 {
            let body = format!("{{\"n\":{n}}}");
            let response = send(&pool, &body).await.expect("answered");
            assert_eq!(response.status(), http::StatusCode::OK);
            assert_eq!(response.bytes().await.expect("body"), Bytes::from(body.clone()));
            let (head, received) = server.requests.recv().await.expect("request");
            assert!(head.starts_with("POST /mcp?x=1 HTTP/1.1\r\n"), "{head}");
            let host = format!("host: {}", server.url.authority());
            assert!(head.to_ascii_lowercase().contains(&host), "{head}");
            assert!(head.to_ascii_lowercase().contains(&format!("content-length: {}", body.len())), "{head}");
            assert!(head.contains("content-type: application/json\r\n"), "{head}");
            assert_eq!(received, body);
        }
        assert_eq!(connections(&server), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_open_connections_that_are_then_reused() {
        let server = server(Answer::KeepAlive).await;
        let pool = UpstreamHttp::for_url(&server.url).expect("plain http");
        let round = || async {
            let calls = (0..4).map(|n| {
                let pool = pool.clone();
                async move { send(&pool, &n.to_string()).await.expect("answered").bytes().await.expect("body") }
            });
            let bodies = futures::future::join_all(calls).await;
            assert_eq!(bodies, (0..4).map(|n| Bytes::from(n.to_string())).collect::<Vec<_>>());
        };
        round().await;
        let opened = connections(&server);
        assert!((1..=4).contains(&opened), "{opened}");
        round().await;
        round().await;
        assert_eq!(connections(&server), opened, "idle connections are reused");
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_while_idle_is_not_used_again() {
        let server = server(Answer::CloseWhenIdle).await;
        let pool = UpstreamHttp::for_url(&server.url).expect("plain http");
        for n in 0..3 {
            let body = send(&pool, &n.to_string()).await.expect("answered").bytes().await.expect("body");
            assert_eq!(body, Bytes::from(n.to_string()));
            // The server closes the connection meanwhile.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        assert_eq!(connections(&server), 3);
    }

    #[tokio::test]
    async fn a_streamed_body_arrives_in_pieces_and_only_a_body_read_to_its_end_frees_the_connection() {
        let server = server(Answer::Stream).await;
        let pool = UpstreamHttp::for_url(&server.url).expect("plain http");
        let mut response = send(&pool, "{}").await.expect("answered");
        assert_eq!(response.headers()[http::header::CONTENT_TYPE], "text/event-stream");
        let mut pieces = Vec::new();
        while let Some(piece) = response.chunk().await.expect("piece") {
            pieces.push(String::from_utf8_lossy(&piece).to_string());
        }
        assert_eq!(pieces.concat(), "data: 1\n\ndata: 2\n\ndata: 3\n\n");
        assert!(pieces.len() >= 2, "sent in pieces as they came: {pieces:?}");
        // Read to its end: reused.
        send(&pool, "{}").await.expect("answered").bytes().await.expect("body");
        assert_eq!(connections(&server), 1);
        // Left after its first piece, while the rest comes: the rest is read in the background,
        // and then the connection serves again.
        let mut left = send(&pool, "{}").await.expect("answered");
        assert_eq!(left.chunk().await.expect("piece").as_deref(), Some(&b"data: 1\n\n"[..]));
        drop(left);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let body = send(&pool, "{}").await.expect("answered").bytes().await.expect("body");
        assert_eq!(body, Bytes::from_static(b"data: 1\n\ndata: 2\n\ndata: 3\n\n"));
        assert_eq!(connections(&server), 1);
        // Left while a request uses the pool at once: that one opens a connection of its own.
        let mut left = send(&pool, "{}").await.expect("answered");
        assert!(left.chunk().await.expect("piece").is_some());
        drop(left);
        send(&pool, "{}").await.expect("answered").bytes().await.expect("body");
        assert_eq!(connections(&server), 2);
    }

    #[tokio::test]
    async fn each_framing_ends_the_body_where_it_should_and_only_keep_alive_connections_are_reused() {
        for (answer, expected_connections) in
            [(Answer::ChunkedWithTrailer, 1), (Answer::SaysClose, 3), (Answer::UntilClose, 3)]
        {
            let server = server(answer).await;
            let pool = UpstreamHttp::for_url(&server.url).expect("plain http");
            for n in 0..3 {
                let body = format!("{{\"n\":{n}}}");
                let received = send(&pool, &body).await.expect("answered").bytes().await.expect("body");
                assert_eq!(received, Bytes::from(body));
            }
            assert_eq!(connections(&server), expected_connections);
        }
    }

    #[tokio::test]
    async fn a_response_left_after_its_answer_frees_the_connection_when_its_end_has_already_come() {
        let server = server(Answer::ChunkedWithTrailer).await;
        let pool = UpstreamHttp::for_url(&server.url).expect("plain http");
        for _ in 0..3 {
            let mut response = send(&pool, "{\"answer\":1}").await.expect("answered");
            assert_eq!(response.chunk().await.expect("piece").as_deref(), Some(&b"{\"answer\":1}"[..]));
            // The end (last chunk, trailer) was sent with it; the reader stops here.
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(response);
        }
        assert_eq!(connections(&server), 1);
    }

    #[tokio::test]
    async fn no_server_is_unreachable_and_only_plain_http_is_pooled() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = reqwest::Url::parse(&format!("http://{}/mcp", listener.local_addr().expect("addr"))).expect("url");
        drop(listener);
        let pool = UpstreamHttp::for_url(&url).expect("plain http");
        let Err(Unreachable(error)) = send(&pool, "{}").await else { panic!("answered without a server") };
        assert!(error.contains("cannot connect"), "{error}");
        for other in ["https://example.com/mcp", "http://user:secret@example.com/mcp"] {
            assert!(UpstreamHttp::for_url(&reqwest::Url::parse(other).expect("url")).is_none(), "{other}");
        }
    }
}
