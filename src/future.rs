//! [`ResponseFuture`]: the inner service's future, or the layer's own answer.

use crate::body::ResponseBody;
use crate::response;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::sync::oneshot;

pin_project! {
    /// Response future of [`JemallocService`](crate::JemallocService).
    ///
    /// A forwarded request polls the inner service's future directly (no boxing). An
    /// intercepted request is answered at once, or, for a purge, when the purge thread reports.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Inner { #[pin] future: F },
        Local { response: Option<Response<Full<Bytes>>> },
        Pending { receiver: oneshot::Receiver<Response<Full<Bytes>>> },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn inner(future: F) -> Self {
        Self {
            kind: Kind::Inner { future },
        }
    }

    pub(crate) fn local(response: Response<Full<Bytes>>) -> Self {
        Self {
            kind: Kind::Local {
                response: Some(response),
            },
        }
    }

    pub(crate) fn pending(receiver: oneshot::Receiver<Response<Full<Bytes>>>) -> Self {
        Self {
            kind: Kind::Pending { receiver },
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Inner { .. } => "Inner",
            Kind::Local { .. } => "Local",
            Kind::Pending { .. } => "Pending",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    /// # Panics
    ///
    /// When polled again after it completed, like most futures.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match self.project().kind.project() {
            KindProj::Inner { future } => {
                let response = ready!(future.poll(cx))?;
                return Poll::Ready(Ok(response.map(ResponseBody::inner)));
            }
            KindProj::Local { response } => response
                .take()
                .expect("ResponseFuture polled after completion"),
            KindProj::Pending { receiver } => match ready!(Pin::new(receiver).poll(cx)) {
                Ok(response) => response,
                // The worker thread always sends before it ends; it can only vanish by
                // panicking, and the client still deserves an answer.
                Err(_) => response::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the purge thread ended without a report",
                ),
            },
        };
        Poll::Ready(Ok(response.map(ResponseBody::local)))
    }
}
