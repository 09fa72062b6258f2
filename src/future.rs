//! [`ResponseFuture`]: the inner service's future, or the layer's own answer.

use crate::accounting::account::Recorder;
use crate::body::ResponseBody;
use crate::endpoint::Reply;
use crate::jemalloc::thread::ThreadTotals;
use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// A forwarded request that waits for the inner service to be ready before it is called.
pub(crate) type Waiting<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pin_project! {
    /// Response future of [`JemallocService`](crate::JemallocService).
    ///
    /// A forwarded request whose inner service was ready polls the inner service's future
    /// directly (no boxing); one that arrived while the inner service was not ready waits for
    /// it (`poll_ready`, then `call`) inside one boxed future. An intercepted request is
    /// answered at once, or, when it must wait for a render or the purge thread, through one
    /// boxed future.
    pub struct ResponseFuture<F>
    where
        F: Future,
    {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    /// Two variants only: the direct forwarded path tests one discriminant, and everything else
    /// is polled out of line (measured: with the other variants beside `Inner`, the compiler
    /// moved a forwarded response twice instead of once).
    #[project = KindProj]
    enum Kind<F>
    where
        F: Future,
    {
        Inner { #[pin] future: F },
        Other { other: Other<F::Output> },
    }
}

/// Every answer but a direct forwarded one; `T` is the inner service's output.
enum Other<T> {
    /// A forwarded request waiting for the inner service's readiness.
    Waiting(Waiting<T>),
    /// A forwarded request whose bytes are counted: the inner service's future (whether it
    /// had to wait for readiness or not) and the request's recorder, in one box (see
    /// [`Accounted`]).
    Accounted(Pin<Box<dyn Future<Output = (T, Recorder)> + Send>>),
    /// The layer's own answer, ready.
    Local(Option<Response<Full<Bytes>>>),
    /// The layer's own answer, once a job reports.
    Pending(Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>),
}

impl<F: Future> ResponseFuture<F> {
    pub(crate) fn inner(future: F) -> Self {
        Self {
            kind: Kind::Inner { future },
        }
    }

    /// A forwarded request that first waits for the inner service to be ready.
    pub(crate) fn waiting(future: Waiting<F::Output>) -> Self {
        Self {
            kind: Kind::Other {
                other: Other::Waiting(future),
            },
        }
    }

    /// A forwarded request whose bytes are counted.
    pub(crate) fn accounted<G>(future: G, recorder: Recorder) -> Self
    where
        G: Future<Output = F::Output> + Send + 'static,
    {
        let accounted = Accounted {
            future,
            recorder: Some(recorder),
        };
        Self {
            kind: Kind::Other {
                other: Other::Accounted(Box::pin(accounted)),
            },
        }
    }

    /// The layer's own answer to an intercepted request.
    pub(crate) fn reply(reply: Reply) -> Self {
        let other = match reply {
            Reply::Now(response) => Other::Local(Some(response)),
            Reply::Later(future) => Other::Pending(future),
        };
        Self {
            kind: Kind::Other { other },
        }
    }
}

impl<F: Future> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Inner { .. } => "Inner",
            Kind::Other {
                other: Other::Waiting(_),
            } => "Waiting",
            Kind::Other {
                other: Other::Accounted(..),
            } => "Accounted",
            Kind::Other {
                other: Other::Local(_),
            } => "Local",
            Kind::Other {
                other: Other::Pending(_),
            } => "Pending",
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
    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            KindProj::Other { other } => other.poll(cx),
        }
    }
}

pin_project! {
    /// A forwarded request whose bytes are counted: the inner service's future, each poll
    /// read between two readings of the thread's totals, and the request's recorder, which
    /// it hands over with the output. Boxed with its future, so that dropping a
    /// [`ResponseFuture`] drops one box whichever variant it holds: with the recorder beside
    /// the box, the drop of every response future, forwarded ones included, saved and restored
    /// one more register (4 instructions a call).
    struct Accounted<F> {
        #[pin]
        future: F,
        recorder: Option<Recorder>,
    }
}

impl<F: Future> Future for Accounted<F> {
    type Output = (F::Output, Recorder);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let recorder = this
            .recorder
            .as_mut()
            .expect("ResponseFuture polled after completion");
        // The handler finds its account through the thread: RequestAccount::current.
        let entered = recorder.account().enter();
        let before = ThreadTotals::now();
        let poll = this.future.poll(cx);
        recorder.tally.add_since(before);
        drop(entered);
        let output = ready!(poll);
        let recorder = this.recorder.take().expect("checked above");
        Poll::Ready((output, recorder))
    }
}

impl<B, E> Other<Result<Response<B>, E>> {
    /// Out of line, so that the direct path above stays as short as it can be.
    #[inline(never)]
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<ResponseBody<B>>, E>> {
        let response = match self {
            Self::Waiting(future) => {
                let response = ready!(future.as_mut().poll(cx))?;
                return Poll::Ready(Ok(response.map(ResponseBody::inner)));
            }
            Self::Accounted(future) => {
                let (output, mut recorder) = ready!(future.as_mut().poll(cx));
                // On an error the recorder drops here: recorded without a status.
                let response = output?;
                recorder.respond(response.status(), response.headers());
                let response = response.map(|body| ResponseBody::accounted(body, recorder));
                return Poll::Ready(Ok(response));
            }
            Self::Local(response) => response
                .take()
                .expect("ResponseFuture polled after completion"),
            Self::Pending(future) => ready!(future.as_mut().poll(cx)),
        };
        Poll::Ready(Ok(response.map(ResponseBody::local)))
    }
}
