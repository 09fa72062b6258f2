//! Serving a tower service with hyper-util as a production server should: HTTP/1.1 and HTTP/2
//! (prior knowledge) on one port, a header-read timeout (a client that sends its headers
//! slowly, or never, is dropped), an idle timeout (a connection that sends and receives nothing
//! is closed), the peer address as axum's `ConnectInfo`, and a graceful shutdown.
#![allow(dead_code)]

use axum::extract::ConnectInfo;
use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tower::{Service, ServiceExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a client may take to send a request's headers (HTTP/1.1); on a kept-alive
/// connection hyper also counts the wait for the next request.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may go without a byte read or written before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves `service` on `listener` until `shutdown` completes, then lets open connections finish
/// for at most `grace`.
pub async fn serve<S, B>(
    listener: tokio::net::TcpListener,
    service: S,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else {
                    // Out of file descriptors and the like: back off rather than spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let service = service.clone().map_request(move |mut request: Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    request
                });
                let io = TokioIo::new(IdleTimeout::new(stream, IDLE_TIMEOUT));
                let connection = http
                    .serve_connection(io, TowerToHyperService::new(service))
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    // A client going away (or timing out) is not the server's problem.
                    let _ = connection.await;
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
}

/// A connection that fails with `TimedOut` once it has gone `timeout` without a byte read or
/// written.
pub struct IdleTimeout<IO> {
    io: IO,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<IO> IdleTimeout<IO> {
    pub fn new(io: IO, timeout: Duration) -> Self {
        Self {
            io,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

/// What the I/O call returned, with the deadline moved on after progress, or `TimedOut` when
/// it is pending and the deadline has passed.
fn watch<T>(
    result: Poll<io::Result<T>>,
    mut deadline: Pin<&mut Sleep>,
    timeout: Duration,
    cx: &mut Context<'_>,
) -> Poll<io::Result<T>> {
    match result {
        Poll::Ready(result) => {
            deadline.as_mut().reset(Instant::now() + timeout);
            Poll::Ready(result)
        }
        Poll::Pending => match deadline.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
            Poll::Pending => Poll::Pending,
        },
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for IdleTimeout<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        watch(result, this.deadline.as_mut(), this.timeout, cx)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        watch(result, this.deadline.as_mut(), this.timeout, cx)
    }

    // Without these two, hyper sees a transport that cannot write vectored and copies every
    // response body into its per-connection write buffer, which then stays as large as the
    // largest answer the connection ever sent (a stats dump: ~400 KB a connection).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        watch(result, this.deadline.as_mut(), this.timeout, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
