//! [`Parser`]: one direction's frame-by-frame processing of freshly read
//! bytes, in place.
//!
//! Data frames the relay does not need to look at are *passed*: their header
//! is re-encoded (with the proxy's own mask key toward a backend) and their
//! payload streams through as it arrives — toward a backend XORed once with
//! the client's key combined with ours, toward a client untouched. Frames the
//! relay must judge (control frames, client text, short backend text) are
//! *held* until whole; when a held frame arrives in one read (the common case)
//! it is judged where it lies, without a copy. Output is written over the
//! input in the same buffer (it never runs ahead of the input, except for
//! rare constructed frames, which spill into the [`Output`] queue).
//!
//! Invariants:
//! - Emitted bytes are whole frames in order; a passed frame's header is
//!   emitted before its payload, and nothing else is emitted while a passed
//!   frame is incomplete ([`Parser::mid_frame`]).
//! - A held message is bounded by `max_message`; a passed frame by it too.
//! - At rest (between frames, no partial header, no message in progress) the
//!   parser holds no heap memory.

use std::ops::Range;

use super::frame::{self, FrameError, Header, MAX_HEADER, OP_CONTINUATION, apply_mask};
use super::output::Output;
use super::stream::Peer;

/// What happens to a data message's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Treat {
    Pass,
    Hold,
    Skip,
}

/// What to do with a held message once it is whole.
#[derive(Debug)]
pub(crate) enum Verdict {
    Forward,
    Drop,
    /// Forward this text instead.
    Replace(String),
}

/// Whether to go on processing the bytes after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    /// Stop here: the bytes after this frame are not processed.
    Stop,
}

/// Why a direction cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Fault {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("frame masking does not match the sender's role")]
    Masking,
    #[error("continuation frame without a message, or a new message inside a fragmented one")]
    Fragmentation,
    /// A fault already reported; the stream stays failed.
    #[error("stream failed earlier")]
    Reported,
}

/// The session's judgement of one direction's traffic.
pub(crate) trait Judge {
    /// How to treat a new data message, from its first frame's header.
    fn treat(&mut self, first: &Header) -> Treat;
    /// A held message is whole (`payload` unmasked, `opcode` of its first frame).
    fn message(&mut self, opcode: u8, payload: &mut [u8]) -> (Verdict, Flow);
    /// A control frame arrived (`payload` unmasked).
    fn control(&mut self, opcode: u8, payload: &[u8]) -> Flow;
    /// A data message was relayed, with its payload size.
    fn counted(&mut self, bytes: u64);
    /// A data message is larger than `max_message`: its payload is skipped.
    fn too_big(&mut self);
}

#[derive(Debug, Clone, Copy)]
struct Current {
    header: Header,
    /// Payload bytes not yet read.
    left: u64,
    /// Payload bytes read so far (the masking phase).
    done: u64,
    treat: Treat,
    /// Toward a backend: the client's key XOR ours, applied once.
    remask: Option<[u8; 4]>,
}

/// Where a finished held payload lies.
enum Held {
    /// In the read buffer (unmasked in place).
    InBuf(Range<usize>),
    /// In `Parser::held` (data) or `Parser::ctl` (control).
    Copied,
}

/// In-place output over the read buffer: bytes `..w` are output; everything
/// from the read position on is unprocessed input, so `w` never passes it.
struct Emit {
    w: usize,
    /// Output goes to the queue (something was queued before, or a
    /// constructed frame did not fit in place).
    spilled: bool,
}

impl Emit {
    fn range(&mut self, buf: &mut [u8], range: Range<usize>, out: &mut Output) {
        if self.spilled {
            out.push(&buf[range]);
        } else {
            let len = range.len();
            if range.start != self.w {
                buf.copy_within(range, self.w);
            }
            self.w += len;
        }
    }

    /// Emit constructed bytes; `consumed` is where unprocessed input starts.
    fn bytes(&mut self, buf: &mut [u8], consumed: usize, bytes: &[u8], out: &mut Output) {
        if !self.spilled && self.w + bytes.len() <= consumed {
            buf[self.w..self.w + bytes.len()].copy_from_slice(bytes);
            self.w += bytes.len();
        } else {
            self.spill(buf, out);
            out.push(bytes);
        }
    }

    fn spill(&mut self, buf: &[u8], out: &mut Output) {
        if !self.spilled {
            out.push(&buf[..self.w]);
            self.w = 0;
            self.spilled = true;
        }
    }
}

/// The result of processing one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Processed {
    /// Output left in place at the start of the buffer (not yet queued).
    pub fresh: usize,
    /// Input bytes not processed because a frame said [`Flow::Stop`].
    pub unprocessed: usize,
}

/// One direction's frame parser.
#[derive(Debug)]
pub(crate) struct Parser {
    /// Who sent the frames parsed here.
    from: Peer,
    /// Who the output goes to (masked toward a backend).
    to: Peer,
    max_message: u64,
    partial: [u8; MAX_HEADER],
    partial_len: usize,
    cur: Option<Current>,
    /// The data message in progress: its first opcode and treatment.
    message: Option<(u8, Treat)>,
    message_len: u64,
    held: Vec<u8>,
    /// A control frame's payload split across reads (rare: allocated then).
    ctl: Vec<u8>,
    /// The stream broke the protocol: its framing can no longer be trusted,
    /// so everything after the fault is dropped unread.
    failed: Option<Fault>,
}

impl Parser {
    pub fn new(from: Peer, to: Peer, max_message: usize) -> Self {
        Self {
            from,
            to,
            max_message: max_message as u64,
            partial: [0; MAX_HEADER],
            partial_len: 0,
            cur: None,
            message: None,
            message_len: 0,
            held: Vec::new(),
            ctl: Vec::new(),
            failed: None,
        }
    }

    /// The protocol fault this stream committed, once.
    pub fn take_fault(&mut self) -> Option<Fault> {
        match self.failed {
            None | Some(Fault::Reported) => None,
            Some(f) => {
                // Stay failed (keep dropping), but report it only once.
                self.failed = Some(Fault::Reported);
                Some(f)
            }
        }
    }

    /// A passed frame's header is out and its payload is not complete: no
    /// other frame may be emitted now.
    pub fn mid_frame(&self) -> bool {
        matches!(self.cur, Some(c) if c.treat == Treat::Pass)
    }

    /// Between frames and messages, nothing partial: the stream parsed here
    /// can be handed to another session.
    pub fn at_rest(&self) -> bool {
        self.cur.is_none() && self.partial_len == 0 && self.message.is_none()
    }

    /// The output is between messages: no passed frame or message is in
    /// progress (held and skipped ones have emitted nothing yet), so another
    /// message may follow it.
    pub fn output_at_rest(&self) -> bool {
        !self.mid_frame() && !matches!(self.message, Some((_, Treat::Pass)))
    }

    /// Pass nothing more: the frame and message in progress are dropped from
    /// here on (after a Close was sent, nothing may follow it).
    pub fn silence(&mut self) {
        if let Some(cur) = self.cur.as_mut()
            && cur.treat == Treat::Pass
        {
            cur.treat = Treat::Skip;
        }
        if let Some((_, treat)) = self.message.as_mut()
            && *treat == Treat::Pass
        {
            *treat = Treat::Skip;
        }
    }

    /// Heap bytes held (for tests of the memory bound).
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.held.capacity()
    }

    /// Process freshly read bytes in `buf`, leaving output in place at its
    /// start or in `out`'s queue. A protocol fault stops processing (what was
    /// emitted before it stands) and is kept for [`Parser::take_fault`].
    pub fn process<J: Judge>(
        &mut self,
        buf: &mut [u8],
        out: &mut Output,
        judge: &mut J,
    ) -> Processed {
        if self.failed.is_some() {
            return Processed {
                fresh: 0,
                unprocessed: buf.len(),
            };
        }
        let end = buf.len();
        let mut em = Emit {
            w: 0,
            spilled: !out.is_empty(),
        };
        let mut r = 0;
        match self.process_frames(buf, out, judge, &mut em, &mut r) {
            Ok(flow) => {
                let unprocessed = if flow == Flow::Stop { end - r } else { 0 };
                self.done(em, unprocessed)
            }
            Err(f) => {
                self.failed = Some(f);
                self.cur = None;
                self.message = None;
                self.held = Vec::new();
                self.done(em, end - r)
            }
        }
    }

    fn process_frames<J: Judge>(
        &mut self,
        buf: &mut [u8],
        out: &mut Output,
        judge: &mut J,
        em: &mut Emit,
        r: &mut usize,
    ) -> Result<Flow, Fault> {
        let end = buf.len();
        while *r < end {
            if self.cur.is_none() {
                let Some(header) = self.header(buf, r)? else {
                    break;
                };
                self.begin(header, buf, *r, em, out, judge)?;
            }
            let Some(mut cur) = self.cur else {
                continue;
            };
            let r0 = *r;
            let avail = cur.left.min((end - r0) as u64) as usize;
            let mut held = None;
            match cur.treat {
                Treat::Pass => {
                    if let Some(k) = cur.remask {
                        apply_mask(&mut buf[r0..r0 + avail], k, cur.done as usize);
                    }
                    em.range(buf, r0..r0 + avail, out);
                }
                Treat::Skip => {}
                Treat::Hold => {
                    let whole_here = cur.done == 0
                        && avail as u64 == cur.left
                        && (cur.header.is_control()
                            || (cur.header.fin && cur.header.opcode != OP_CONTINUATION));
                    if let Some(k) = cur.header.mask {
                        apply_mask(&mut buf[r0..r0 + avail], k, cur.done as usize);
                    }
                    if whole_here {
                        held = Some(Held::InBuf(r0..r0 + avail));
                    } else if cur.header.is_control() {
                        self.ctl.extend_from_slice(&buf[r0..r0 + avail]);
                    } else {
                        self.held.extend_from_slice(&buf[r0..r0 + avail]);
                    }
                }
            }
            *r += avail;
            cur.left -= avail as u64;
            cur.done += avail as u64;
            self.cur = Some(cur);
            if cur.left > 0 {
                continue;
            }
            self.cur = None;
            let held = held.unwrap_or(Held::Copied);
            if self.finish(cur, held, buf, *r, em, out, judge) == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }

    fn done(&self, em: Emit, unprocessed: usize) -> Processed {
        Processed {
            fresh: if em.spilled { 0 } else { em.w },
            unprocessed,
        }
    }

    /// Parse the next header from the partial bytes and `buf[*r..]`.
    fn header(&mut self, buf: &[u8], r: &mut usize) -> Result<Option<Header>, Fault> {
        let rest = &buf[*r..];
        if self.partial_len == 0 {
            return match Header::parse(rest)? {
                Some(h) => {
                    *r += h.header_len;
                    Ok(Some(h))
                }
                None => {
                    self.partial[..rest.len()].copy_from_slice(rest);
                    self.partial_len = rest.len();
                    *r = buf.len();
                    Ok(None)
                }
            };
        }
        let had = self.partial_len;
        let take = (MAX_HEADER - had).min(rest.len());
        self.partial[had..had + take].copy_from_slice(&rest[..take]);
        match Header::parse(&self.partial[..had + take])? {
            Some(h) => {
                *r += h.header_len - had;
                self.partial_len = 0;
                Ok(Some(h))
            }
            None => {
                self.partial_len = had + take;
                *r += take;
                Ok(None)
            }
        }
    }

    /// A frame's header is read: check it, decide its treatment, emit the
    /// header of a passed frame.
    fn begin<J: Judge>(
        &mut self,
        header: Header,
        buf: &mut [u8],
        consumed: usize,
        em: &mut Emit,
        out: &mut Output,
        judge: &mut J,
    ) -> Result<(), Fault> {
        if header.mask.is_some() != self.from.masks() {
            return Err(Fault::Masking);
        }
        let treat = if header.is_control() {
            self.ctl.clear();
            Treat::Hold
        } else {
            let treat = match (header.opcode, self.message) {
                (OP_CONTINUATION, Some((_, treat))) => treat,
                (OP_CONTINUATION, None) | (_, Some(_)) => return Err(Fault::Fragmentation),
                (opcode, None) => {
                    let treat = judge.treat(&header);
                    self.message = Some((opcode, treat));
                    self.message_len = 0;
                    treat
                }
            };
            self.message_len += header.len;
            if self.message_len > self.max_message {
                // Skip the payload (so the stream stays in step and a Close
                // behind it is still read), drop the message, report.
                self.message = None;
                judge.too_big();
                Treat::Skip
            } else {
                treat
            }
        };
        let mut remask = None;
        if treat == Treat::Pass {
            let key = self.to.mask_for_send();
            remask = match (header.mask, key) {
                (Some(a), Some(b)) => Some([a[0] ^ b[0], a[1] ^ b[1], a[2] ^ b[2], a[3] ^ b[3]]),
                (Some(a), None) => Some(a),
                (None, Some(b)) => Some(b),
                (None, None) => None,
            };
            let out_header = Header {
                mask: key,
                ..header
            };
            let mut h = [0u8; MAX_HEADER];
            let n = out_header.encode(&mut h);
            em.bytes(buf, consumed, &h[..n], out);
        }
        self.cur = Some(Current {
            header,
            left: header.len,
            done: 0,
            treat,
            remask,
        });
        Ok(())
    }

    /// A frame's payload is complete.
    #[allow(clippy::too_many_arguments)]
    fn finish<J: Judge>(
        &mut self,
        cur: Current,
        held: Held,
        buf: &mut [u8],
        consumed: usize,
        em: &mut Emit,
        out: &mut Output,
        judge: &mut J,
    ) -> Flow {
        let h = cur.header;
        if h.is_control() {
            let flow = match &held {
                Held::InBuf(range) => judge.control(h.opcode, &buf[range.clone()]),
                Held::Copied => judge.control(h.opcode, &self.ctl),
            };
            self.ctl = Vec::new();
            return flow;
        }
        if !h.fin {
            return Flow::Continue;
        }
        let (opcode, treat) = self.message.take().unwrap_or((h.opcode, cur.treat));
        if treat != Treat::Hold {
            if treat == Treat::Pass {
                judge.counted(self.message_len);
            }
            return Flow::Continue;
        }
        let mut held_vec = std::mem::take(&mut self.held);
        let (verdict, flow) = match &held {
            Held::InBuf(range) => judge.message(opcode, &mut buf[range.clone()]),
            Held::Copied => judge.message(opcode, &mut held_vec),
        };
        let key = self.to.mask_for_send();
        match verdict {
            Verdict::Forward => {
                judge.counted(self.message_len);
                let len = match &held {
                    Held::InBuf(range) => range.len(),
                    Held::Copied => held_vec.len(),
                };
                let header = Header {
                    fin: true,
                    opcode,
                    mask: key,
                    len: len as u64,
                    header_len: 0,
                };
                let mut hb = [0u8; MAX_HEADER];
                let n = header.encode(&mut hb);
                match held {
                    Held::InBuf(range) => {
                        if let Some(k) = key {
                            apply_mask(&mut buf[range.clone()], k, 0);
                        }
                        em.bytes(buf, range.start, &hb[..n], out);
                        em.range(buf, range, out);
                    }
                    Held::Copied => {
                        if let Some(k) = key {
                            apply_mask(&mut held_vec, k, 0);
                        }
                        em.bytes(buf, consumed, &hb[..n], out);
                        em.bytes(buf, consumed, &held_vec, out);
                    }
                }
            }
            Verdict::Drop => {}
            Verdict::Replace(text) => {
                let mut frame = Vec::with_capacity(text.len() + MAX_HEADER);
                frame::push_frame(&mut frame, frame::OP_TEXT, text.as_bytes(), key);
                em.bytes(buf, consumed, &frame, out);
            }
        }
        // `held_vec` is dropped here: a held message's memory is not kept.
        flow
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use tokio::io::AsyncWrite;

    use super::super::frame::{OP_BINARY, OP_TEXT, push_frame};
    use super::*;

    /// Forwards every message; counts what it saw.
    #[derive(Default)]
    struct Forward {
        messages: u64,
    }

    impl Judge for Forward {
        fn treat(&mut self, first: &Header) -> Treat {
            if first.opcode == OP_TEXT {
                Treat::Hold
            } else {
                Treat::Pass
            }
        }
        fn message(&mut self, _: u8, _: &mut [u8]) -> (Verdict, Flow) {
            (Verdict::Forward, Flow::Continue)
        }
        fn control(&mut self, _: u8, _: &[u8]) -> Flow {
            Flow::Continue
        }
        fn counted(&mut self, _: u64) {
            self.messages += 1;
        }
        fn too_big(&mut self) {}
    }

    /// Takes `room` bytes per write call while open, nothing while closed.
    struct Gate {
        taken: Vec<u8>,
        open: bool,
    }

    impl AsyncWrite for Gate {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if !self.open {
                return Poll::Pending;
            }
            let n = buf.len().min(4096);
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

    /// Relay `wire` (client frames) through a parser in reads of `chunk`
    /// bytes, the destination stalling now and then; returns what came out,
    /// unmasked, as (opcode, payload) messages.
    fn relay_through(wire: &[u8], chunk: usize) -> (Vec<(u8, Vec<u8>)>, Parser, Output) {
        let mut parser = Parser::new(Peer::Client, Peer::Backend, 4 << 20);
        let mut out = Output::default();
        let mut judge = Forward::default();
        let mut dst = Gate {
            taken: Vec::new(),
            open: false,
        };
        let mut cx = Context::from_waker(Waker::noop());
        for (i, piece) in wire.chunks(chunk).enumerate() {
            dst.open = i % 3 != 0;
            let mut buf = piece.to_vec();
            let p = parser.process(&mut buf, &mut out, &mut judge);
            let _ = out.write(&mut dst, &mut cx, &buf[..p.fresh]);
        }
        dst.open = true;
        while out.flush(&mut dst, &mut cx).is_pending() {}
        let mut got = Vec::new();
        let mut at = 0;
        let taken = &dst.taken;
        while at < taken.len() {
            let h = Header::parse(&taken[at..]).unwrap().unwrap();
            let start = at + h.header_len;
            let end = start + h.len as usize;
            let mut payload = taken[start..end].to_vec();
            let key = h.mask.expect("frames toward a backend are masked");
            apply_mask(&mut payload, key, 0);
            got.push((h.opcode, payload));
            at = end;
        }
        (got, parser, out)
    }

    #[test]
    fn large_messages_pass_whole_and_leave_no_buffer_behind() {
        let big: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
        let text = "é".repeat(300_000);
        let mut wire = Vec::new();
        push_frame(&mut wire, OP_BINARY, &big, Some([1, 2, 3, 4]));
        push_frame(&mut wire, OP_TEXT, text.as_bytes(), Some([9, 8, 7, 6]));
        push_frame(&mut wire, OP_BINARY, b"small", Some([5, 5, 5, 5]));
        for chunk in [1, 7, 4096, 16 << 10] {
            if chunk == 1 {
                continue; // a byte per read: too slow for 1.6 MiB, covered by 7
            }
            let (got, parser, out) = relay_through(&wire, chunk);
            assert_eq!(got.len(), 3, "chunk {chunk}");
            assert_eq!(got[0], (OP_BINARY, big.clone()));
            assert_eq!(got[1], (OP_TEXT, text.as_bytes().to_vec()));
            assert_eq!(got[2], (OP_BINARY, b"small".to_vec()));
            assert!(parser.at_rest());
            assert_eq!(parser.capacity(), 0, "held text freed (chunk {chunk})");
            assert_eq!(out.capacity(), 0, "output queue freed (chunk {chunk})");
        }
    }
}
