//! [`Output`]: the bytes bound for one peer that it has not taken yet.
//!
//! Invariants:
//! - The bytes emitted toward a peer are always a sequence of whole frames;
//!   `written ≤ emitted`, and `queued()` holds exactly bytes `written..emitted`.
//! - `boundary` is the first frame boundary at or after `written` (the end of
//!   the frame being written), kept by walking the headers of what each write
//!   took. With it a close can be sent *past* queued data without cutting a
//!   frame: the rest of the current frame is kept, the rest dropped.
//! - The queue's allocation is freed whenever it empties, so a session's
//!   memory returns to its base size after a large message or a stall.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

use super::frame::Header;

/// Bytes bound for one peer.
#[derive(Debug, Default)]
pub(crate) struct Output {
    queue: Vec<u8>,
    /// Bytes of `queue` already written.
    head: usize,
    /// Absolute counts since the session started.
    written: u64,
    emitted: u64,
    boundary: u64,
    /// A write made progress since the last tick.
    pub progressed: bool,
}

impl Output {
    /// Bytes waiting for the peer.
    pub fn queued(&self) -> usize {
        self.queue.len() - self.head
    }

    pub fn is_empty(&self) -> bool {
        self.queued() == 0
    }

    /// Heap bytes held (for tests of the memory bound).
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }

    /// Queue bytes after everything queued so far.
    pub fn push(&mut self, bytes: &[u8]) {
        self.queue.extend_from_slice(bytes);
        self.emitted += bytes.len() as u64;
    }

    /// Write `fresh` (bytes emitted now, after everything queued) and the
    /// queue: `fresh` goes straight to the peer when nothing is queued, so in
    /// the common case the relay copies nothing. What the peer does not take is
    /// queued. `Ready(Ok)` when nothing is left, `Pending` when the peer is
    /// full (its waker is registered).
    pub fn write<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
        fresh: &[u8],
    ) -> Poll<io::Result<()>> {
        if !fresh.is_empty() {
            if self.is_empty() {
                self.emitted += fresh.len() as u64;
                match Pin::new(&mut *io).poll_write(cx, fresh) {
                    Poll::Ready(Ok(n)) => {
                        self.note_written(fresh, n);
                        if n < fresh.len() {
                            self.queue.extend_from_slice(&fresh[n..]);
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        self.queue.extend_from_slice(fresh);
                        return Poll::Pending;
                    }
                }
            } else {
                self.push(fresh);
            }
        }
        self.flush(io, cx)
    }

    /// Write what is queued.
    pub fn flush<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.head < self.queue.len() {
            match Pin::new(&mut *io).poll_write(cx, &self.queue[self.head..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    let (head, queue) = (self.head, std::mem::take(&mut self.queue));
                    self.note_written(&queue[head..], n);
                    self.queue = queue;
                    self.head += n;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.head > 0 {
            // Emptied: give the allocation back.
            self.queue = Vec::new();
            self.head = 0;
        }
        Pin::new(&mut *io).poll_flush(cx)
    }

    /// `n` bytes of `pending` (which starts at byte `written`) were taken.
    fn note_written(&mut self, pending: &[u8], n: usize) {
        if n > 0 {
            self.progressed = true;
        }
        let end = self.written + n as u64;
        while self.boundary < end {
            let at = (self.boundary - self.written) as usize;
            match pending.get(at..).map(Header::parse) {
                Some(Ok(Some(h))) => self.boundary += h.header_len as u64 + h.len,
                // Cannot happen: whole headers are emitted at once. Make the
                // boundary unknown rather than wrong.
                _ => {
                    self.boundary = u64::MAX;
                    break;
                }
            }
        }
        self.written = end;
    }

    /// Drop everything queued after the frame being written, so a close can
    /// follow at once. False when that frame itself is not complete yet (its
    /// payload is still arriving), in which case nothing is dropped.
    pub fn drop_after_current_frame(&mut self) -> bool {
        if self.boundary > self.emitted {
            return false;
        }
        let keep = (self.boundary - self.written) as usize;
        self.queue.truncate(self.head + keep);
        self.emitted = self.boundary;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::{OP_BINARY, push_frame};
    use super::*;

    /// A writer that takes at most `room` bytes, then reports full.
    struct Narrow {
        taken: Vec<u8>,
        room: usize,
    }

    impl AsyncWrite for Narrow {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.room);
            if n == 0 {
                return Poll::Pending;
            }
            self.room -= n;
            self.taken.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn drops_queued_frames_but_finishes_the_one_being_written() {
        let mut frames = Vec::new();
        for i in 0..5u8 {
            push_frame(&mut frames, OP_BINARY, &[i; 300], None);
        }
        let mut out = Output::default();
        let mut w = Narrow {
            taken: Vec::new(),
            room: 450,
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(out.write(&mut w, &mut cx, &frames).is_pending());
        assert!(out.drop_after_current_frame());
        // 450 bytes written: the second frame (304..608) is in progress.
        assert_eq!(out.queued(), 608 - 450);
        w.room = usize::MAX;
        assert!(out.flush(&mut w, &mut cx).is_ready());
        assert_eq!(w.taken, frames[..608]);
        assert_eq!(out.capacity(), 0, "the queue's allocation is given back");
    }
}
