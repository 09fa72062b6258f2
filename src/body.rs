//! [`ResponseBody`]: the inner service's body, or a response the layer answered itself.

use crate::accounting::account::Recorder;
use crate::accounting::polls::AccountedBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project! {
    /// Response body of [`JemallocService`](crate::JemallocService).
    ///
    /// Forwarded requests keep the inner service's body as it is (streaming stays streaming);
    /// the endpoints the layer answers itself use an in-memory body. `Error` is the inner body's
    /// error type, so axum, tonic and hyper accept it without boxing.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Local { #[pin] body: Full<Bytes> },
        Accounted { #[pin] body: AccountedBody<B> },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    pub(crate) fn local(body: Full<Bytes>) -> Self {
        Self {
            kind: Kind::Local { body },
        }
    }

    /// A forwarded response whose request's bytes are counted until the body is dropped.
    pub(crate) fn accounted(body: B, recorder: Recorder) -> Self {
        Self {
            kind: Kind::Accounted {
                body: AccountedBody::new(body, recorder),
            },
        }
    }
}

/// An empty body, as middleware that answers on its own needs (tower-http's `Timeout` builds its
/// 408 from `ResBody::default()`), whatever `B` is.
impl<B> Default for ResponseBody<B> {
    fn default() -> Self {
        Self::local(Full::default())
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Inner { .. } => "Inner",
            Kind::Local { .. } => "Local",
            Kind::Accounted { .. } => "Accounted",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Local { body } => body.poll_frame(cx).map_err(|never| match never {}),
            KindProj::Accounted { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Local { body } => body.is_end_stream(),
            Kind::Accounted { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Local { body } => body.size_hint(),
            Kind::Accounted { body } => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body type without `Default`: the impl must not need one.
    struct NoDefault;

    impl Body for NoDefault {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(None)
        }
    }

    #[tokio::test]
    async fn default_is_an_empty_body() {
        let body = ResponseBody::<NoDefault>::default();
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        assert!(body.collect().await.unwrap().to_bytes().is_empty());
    }
}
