//! A request body the handler left unread is read to its end, up to a bound, after the answer.
//!
//! A body over `--max-body-bytes` is refused (413) once the limit is crossed, while the client
//! may still be sending the rest. Closing the connection then would cut the upload off: the
//! client sees a broken pipe or a reset instead of the 413, and may never read it. So what the
//! handler did not read is read here and dropped (what nginx calls a lingering close), at most
//! `MAX_BYTES` for at most `MAX_TIME`; then the connection is reused, or closed past the bound.

use axum::body::Body;
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// The most of an unread body read after the answer.
const MAX_BYTES: usize = 64 * 1024 * 1024;
/// The longest an unread body is read after the answer.
const MAX_TIME: Duration = Duration::from_secs(10);

/// Wraps a request's body so that, when dropped before its end, the rest is read in the
/// background.
pub fn drained_when_dropped(body: Body) -> Body {
    if body.is_end_stream() {
        return body;
    }
    Body::new(DrainOnDrop { inner: Some(body) })
}

struct DrainOnDrop {
    inner: Option<Body>,
}

impl http_body::Body for DrainOnDrop {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        match self.get_mut().inner.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(http_body::Body::size_hint).unwrap_or_else(|| SizeHint::with_exact(0))
    }
}

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        let Some(mut body) = self.inner.take() else { return };
        if body.is_end_stream() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            let drain = async {
                let mut read = 0;
                while let Some(Ok(frame)) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                    read += frame.data_ref().map_or(0, Bytes::len);
                    if read > MAX_BYTES {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(MAX_TIME, drain).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A body of `frames` one-byte frames that counts how many were read.
    fn counted(frames: usize, read: Arc<AtomicUsize>) -> Body {
        let stream = futures::stream::iter((0..frames).map(move |_| {
            read.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from_static(b"x"))
        }));
        Body::from_stream(stream)
    }

    #[tokio::test]
    async fn the_rest_of_a_body_dropped_unread_is_read_in_the_background() {
        let read = Arc::new(AtomicUsize::new(0));
        let mut body = drained_when_dropped(counted(100, read.clone()));
        // The handler reads one frame and gives up (as the body limit does).
        let first = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(first.is_some());
        assert_eq!(read.load(Ordering::SeqCst), 1);
        drop(body);
        for _ in 0..100 {
            if read.load(Ordering::SeqCst) == 100 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("only {} of 100 frames were read after the drop", read.load(Ordering::SeqCst));
    }
}
