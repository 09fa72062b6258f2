//! A forwarded response's body, with each poll counted (the future's polls are counted in
//! [`ResponseFuture`](crate::ResponseFuture) itself).

use super::account::Recorder;
use crate::jemalloc::thread::ThreadTotals;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project! {
    /// A forwarded response's body, each poll counted; the request is recorded when it is
    /// dropped, with what dropping it freed.
    pub(crate) struct AccountedBody<B> {
        #[pin]
        body: B,
        recorder: Recorder,
    }

    impl<B> PinnedDrop for AccountedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            // The fields drop after this, `body` first: the recorder reads the thread's
            // totals again when it drops.
            this.project().recorder.dropping();
        }
    }
}

impl<B> AccountedBody<B> {
    pub(crate) fn new(body: B, recorder: Recorder) -> Self {
        Self { body, recorder }
    }
}

impl<B: Body<Data = Bytes>> AccountedBody<B> {
    /// A poll on a thread that has not read its totals yet: reads them, out of line, then
    /// polls as usual (uncounted where they cannot be had: the figures are zeros there, and
    /// that was logged).
    #[cold]
    #[inline(never)]
    fn first_poll_on_thread(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let _ = ThreadTotals::now();
        if ThreadTotals::known().known == 0 {
            return self.project().body.poll_frame(cx);
        }
        self.poll_frame(cx)
    }
}

impl<B> Body for AccountedBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.as_mut().project();
        let Some(measuring) = this.recorder.tally.open() else {
            return self.first_poll_on_thread(cx);
        };
        let poll = this.body.poll_frame(cx);
        drop(measuring);
        if let Poll::Ready(Some(Ok(frame))) = &poll {
            // Data the server frees after writing it, outside any poll: counted as freed now,
            // when this body is its only owner (shared or static bytes are not freed then).
            if let Some(data) = frame.data_ref().filter(|data| data.is_unique()) {
                this.recorder.tally.hand_over(data.len() as u64);
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
