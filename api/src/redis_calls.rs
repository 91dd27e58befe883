//! Redis commands on the request path (the rate-limit script, a 2025 session's lookup) over
//! pooled connections that the calling task writes and reads itself.
//!
//! redis-rs's multiplexed connection runs in a task of its own: a command goes to it through a
//! channel and its reply comes back through another, so every command wakes two tasks, often on
//! the other core. On the hot path that hand-over costs more than the command (the same change
//! for upstream HTTP took a quarter off the gateway's CPU per call). Here a command is one write
//! and one read on a connection the caller holds for that moment; concurrent callers take
//! connections of their own from the pool. Everything else (pub/sub, idempotency records,
//! OAuth's short-lived state) stays on redis-rs.
//!
//! Only `redis://` over TCP: a `rediss://` or Unix-socket URL keeps redis-rs for everything.
//! RESP2 replies are read in full (simple strings, errors, integers, bulk strings, arrays);
//! a connection goes back to the pool only after a whole reply was read from it.

use bytes::{Buf, BytesMut};
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle connections kept: enough for the concurrency one replica sees.
const MAX_IDLE: usize = 256;
/// The largest reply accepted (the calls made here get small ones).
const MAX_REPLY: usize = 8 * 1024 * 1024;

/// A RESP2 reply.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Nil,
    Integer(i64),
    /// A simple string (`+OK`) or a bulk string.
    Text(Vec<u8>),
    Array(Vec<Reply>),
    /// Redis refused the command (`-ERR …`, `-NOSCRIPT …`).
    Error(String),
}

/// Redis could not be asked: not reachable, or the connection failed mid-command.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

struct Conn {
    stream: TcpStream,
    buffer: BytesMut,
}

/// Connections to one Redis server.
pub struct RedisCalls {
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    idle: Mutex<Vec<Conn>>,
}

impl std::fmt::Debug for RedisCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("RedisCalls").field("host", &self.host).field("port", &self.port).field("db", &self.db).finish()
    }
}

impl RedisCalls {
    /// For a `redis://` URL over TCP; `None` for other kinds (TLS, Unix sockets).
    pub fn for_url(url: &str) -> Option<Arc<Self>> {
        let info = redis::IntoConnectionInfo::into_connection_info(url).ok()?;
        let redis::ConnectionAddr::Tcp(host, port) = info.addr() else { return None };
        let settings = info.redis_settings();
        Some(Arc::new(Self {
            host: host.clone(),
            port: *port,
            username: settings.username().map(str::to_string),
            password: settings.password().map(str::to_string),
            db: settings.db(),
            idle: Mutex::new(Vec::new()),
        }))
    }

    /// Sends one command (its arguments) and reads its reply. A refusal by Redis is a
    /// [`Reply::Error`]; only failing to get a reply is an error.
    pub async fn call(&self, args: &[&[u8]]) -> Result<Reply, Unavailable> {
        let command = encode(args);
        let mut conn = match self.take_idle() {
            Some(mut conn) => match conn.stream.write_all(&command).await {
                Ok(()) => conn,
                // Closed before the command reached Redis: nothing ran, so sending it on a new
                // connection cannot run it twice.
                Err(_) => self.send_on_new(&command).await?,
            },
            None => self.send_on_new(&command).await?,
        };
        let reply = read_reply(&mut conn).await?;
        self.put_back(conn);
        Ok(reply)
    }

    async fn send_on_new(&self, command: &[u8]) -> Result<Conn, Unavailable> {
        let mut conn = self.connect().await?;
        conn.stream.write_all(command).await.map_err(|e| Unavailable(format!("sending to Redis: {e}")))?;
        Ok(conn)
    }

    /// An idle connection still open: one Redis has closed reads as ended at once.
    fn take_idle(&self) -> Option<Conn> {
        loop {
            let conn = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            let mut probe = [0u8; 1];
            match conn.stream.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(conn),
                _ => continue,
            }
        }
    }

    async fn connect(&self) -> Result<Conn, Unavailable> {
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| Unavailable(format!("connecting to Redis at {}:{} timed out", self.host, self.port)))?
            .map_err(|e| Unavailable(format!("cannot connect to Redis at {}:{}: {e}", self.host, self.port)))?;
        stream.set_nodelay(true).map_err(|e| Unavailable(e.to_string()))?;
        let mut conn = Conn { stream, buffer: BytesMut::with_capacity(4096) };
        let db = self.db.to_string();
        let mut setup: Vec<Vec<&[u8]>> = Vec::new();
        match (&self.username, &self.password) {
            (Some(user), Some(password)) => setup.push(vec![b"AUTH", user.as_bytes(), password.as_bytes()]),
            (None, Some(password)) => setup.push(vec![b"AUTH", password.as_bytes()]),
            _ => {}
        }
        if self.db != 0 {
            setup.push(vec![b"SELECT", db.as_bytes()]);
        }
        for command in setup {
            let name = String::from_utf8_lossy(command[0]).to_string();
            conn.stream
                .write_all(&encode(&command))
                .await
                .map_err(|e| Unavailable(format!("sending to Redis: {e}")))?;
            if let Reply::Error(error) = read_reply(&mut conn).await? {
                // Redis's text for a failed AUTH names no secret.
                return Err(Unavailable(format!("Redis refused {name}: {error}")));
            }
        }
        Ok(conn)
    }

    fn put_back(&self, conn: Conn) {
        if !conn.buffer.is_empty() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }
}

/// A command as a RESP array of bulk strings.
fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    let _ = write!(out, "*{}\r\n", args.len());
    for arg in args {
        let _ = write!(out, "${}\r\n", arg.len());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

async fn read_reply(conn: &mut Conn) -> Result<Reply, Unavailable> {
    loop {
        match parse(&conn.buffer) {
            Ok(Some((reply, used))) => {
                conn.buffer.advance(used);
                return Ok(reply);
            }
            Ok(None) if conn.buffer.len() > MAX_REPLY => return Err(Unavailable("Redis reply too large".into())),
            Ok(None) => {
                conn.buffer.reserve(4096);
                match conn.stream.read_buf(&mut conn.buffer).await {
                    Ok(0) => return Err(Unavailable("Redis closed the connection".into())),
                    Ok(_) => {}
                    Err(e) => return Err(Unavailable(format!("reading from Redis: {e}"))),
                }
            }
            Err(error) => return Err(Unavailable(error)),
        }
    }
}

/// One whole reply at the start of `buffer` and the bytes it took; `None` while incomplete.
fn parse(buffer: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some(line_end) = buffer.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
    let Some((&kind, rest)) = buffer[..line_end].split_first() else { return Err("empty Redis reply line".into()) };
    let line = std::str::from_utf8(rest).map_err(|_| "unreadable Redis reply")?;
    let after = line_end + 2;
    let number = || line.parse::<i64>().map_err(|_| format!("unreadable Redis reply: {line:?}"));
    match kind {
        b'+' => Ok(Some((Reply::Text(rest.to_vec()), after))),
        b'-' => Ok(Some((Reply::Error(line.to_string()), after))),
        b':' => Ok(Some((Reply::Integer(number()?), after))),
        b'$' => {
            let length = number()?;
            if length < 0 {
                return Ok(Some((Reply::Nil, after)));
            }
            let end = after + length as usize;
            if buffer.len() < end + 2 {
                return Ok(None);
            }
            if &buffer[end..end + 2] != b"\r\n" {
                return Err("malformed Redis bulk string".into());
            }
            Ok(Some((Reply::Text(buffer[after..end].to_vec()), end + 2)))
        }
        b'*' => {
            let count = number()?;
            if count < 0 {
                return Ok(Some((Reply::Nil, after)));
            }
            let mut items = Vec::with_capacity(count.min(1024) as usize);
            let mut at = after;
            for _ in 0..count {
                match parse(&buffer[at..])? {
                    Some((item, used)) => {
                        items.push(item);
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(items), at)))
        }
        other => Err(format!("unknown Redis reply type {:?}", other as char)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        assert_eq!(encode(&[b"GET", b"k\r\n"]), b"*2\r\n$3\r\nGET\r\n$3\r\nk\r\n\r\n".to_vec());
    }

    #[test]
    fn every_reply_kind_is_read_whole_or_not_at_all() {
        let whole: &[u8] = b"*4\r\n:1\r\n$2\r\nab\r\n$-1\r\n*2\r\n+OK\r\n-NOSCRIPT No matching script\r\n:7\r\n";
        let expected = Reply::Array(vec![
            Reply::Integer(1),
            Reply::Text(b"ab".to_vec()),
            Reply::Nil,
            Reply::Array(vec![Reply::Text(b"OK".to_vec()), Reply::Error("NOSCRIPT No matching script".into())]),
        ]);
        let used = whole.len() - 4;
        assert_eq!(parse(whole).expect("valid"), Some((expected, used)), "the next reply is left");
        for cut in 0..used {
            assert_eq!(parse(&whole[..cut]).expect("valid so far"), None, "incomplete at {cut}");
        }
        assert!(parse(b"?x\r\n").is_err());
        assert!(parse(b"$2\r\nabcd\r\n").is_err());
        assert!(parse(b":x\r\n").is_err());
    }

    /// A throwaway redis-server (from PATH, as the test command installs it) on a free port.
    struct Server {
        port: u16,
        child: std::process::Child,
    }

    impl Server {
        fn start(port: Option<u16>, extra: &[&str]) -> Server {
            let port = port.unwrap_or_else(|| {
                std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
            });
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(extra)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server on PATH (the test command installs it)");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(std::time::Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            Server { port, child }
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[tokio::test]
    async fn commands_reach_a_real_redis_on_reused_connections_and_recover_after_it_restarts() {
        let server = Server::start(None, &["--requirepass", "s3cret"]);
        let calls = RedisCalls::for_url(&format!("redis://:s3cret@127.0.0.1:{}/3", server.port)).expect("tcp");
        assert_eq!(calls.call(&[b"SET", b"k", b"v\r\nw"]).await.expect("set"), Reply::Text(b"OK".to_vec()));
        assert_eq!(calls.call(&[b"GET", b"k"]).await.expect("get"), Reply::Text(b"v\r\nw".to_vec()));
        assert_eq!(calls.call(&[b"GET", b"missing"]).await.expect("get"), Reply::Nil);
        // SELECT 3 took effect: database 0 does not have the key.
        let seen = calls.call(&[b"EVAL", b"redis.call('SELECT', 0); return redis.call('EXISTS', 'k')", b"0"]).await;
        assert_eq!(seen.expect("eval"), Reply::Integer(0));
        assert!(
            matches!(calls.call(&[b"EVALSHA", b"0000", b"0"]).await.expect("a refusal"), Reply::Error(e) if e.starts_with("NOSCRIPT"))
        );
        // Concurrent callers take connections of their own; they are reused afterwards.
        let round = || futures::future::join_all((0..8).map(|_| calls.call(&[b"INCR", b"n"])));
        round().await.into_iter().for_each(|r| assert!(matches!(r, Ok(Reply::Integer(_)))));
        let clients = || async {
            let Reply::Text(list) = calls.call(&[b"CLIENT", b"LIST"]).await.expect("client list") else { panic!() };
            String::from_utf8_lossy(&list).lines().count()
        };
        let open = clients().await;
        round().await;
        assert_eq!(clients().await, open, "no connection opened for the second round");

        // Redis goes away: a clear failure, not a hang; back on the same port, it serves again.
        let port = server.port;
        drop(server);
        let error = calls.call(&[b"GET", b"k"]).await.expect_err("no Redis");
        assert!(error.0.contains("Redis"), "{error}");
        let _server = Server::start(Some(port), &["--requirepass", "s3cret"]);
        assert_eq!(calls.call(&[b"GET", b"k"]).await.expect("back"), Reply::Nil);

        // A wrong password is refused, without the password in the message.
        let wrong = RedisCalls::for_url(&format!("redis://:n0pe@127.0.0.1:{port}")).expect("tcp");
        let error = wrong.call(&[b"PING"]).await.expect_err("refused");
        assert!(error.0.contains("AUTH") && !error.0.contains("n0pe"), "{error}");
    }

    #[test]
    fn only_plain_tcp_urls_are_served_and_credentials_are_kept_out_of_debug() {
        let calls = RedisCalls::for_url("redis://user:s3cret@127.0.0.1:6390/2").expect("tcp");
        assert_eq!((calls.host.as_str(), calls.port, calls.db), ("127.0.0.1", 6390, 2));
        assert_eq!((calls.username.as_deref(), calls.password.as_deref()), (Some("user"), Some("s3cret")));
        assert!(!format!("{calls:?}").contains("s3cret"));
        assert!(RedisCalls::for_url("redis+unix:///tmp/redis.sock").is_none());
    }
}
