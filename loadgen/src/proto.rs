//! What goes over the wire: the echo-mode data message, the stt-mode audio chunk and the
//! JSON events read back.
//!
//! # Echo-mode data message
//!
//! A text frame of exactly `size` bytes (`size` ≥ [`MIN_SIZE`]). The first [`HEADER_LEN`]
//! bytes are an ASCII header with fixed-width, zero-padded decimal fields, the rest is
//! padding (`abc…xyzabc…`):
//!
//! ```text
//! LG1 0000000042 0000000007 00000000001234567890 abcdefghijklmnop…
//! |   |          |          |                    |
//! |   session    sequence   intended send time   padding (at least one byte)
//! magic          (u32)      (ns since run start)
//! ```
//!
//! `LG1 ` (4) + session (10) + ` ` + seq (10) + ` ` + time (20) + ` ` = 47 bytes.

use bytes::Bytes;
use serde::Deserialize;

/// First bytes of every echo-mode data message.
pub const MAGIC: &[u8; 4] = b"LG1 ";
/// Length of the ASCII header that precedes the padding.
pub const HEADER_LEN: usize = 47;
/// Smallest `--size`: the header plus one byte of padding. Smaller sizes are raised to this.
pub const MIN_SIZE: usize = 48;
/// Largest `--size`; larger sizes are lowered to this.
pub const MAX_SIZE: usize = 16 << 20;

const SESSION_AT: usize = 4;
const SESSION_W: usize = 10;
const SEQ_AT: usize = SESSION_AT + SESSION_W + 1;
const SEQ_W: usize = 10;
const TIME_AT: usize = SEQ_AT + SEQ_W + 1;
const TIME_W: usize = 20;

/// stt mode: bytes per audio chunk (20 ms of 16 kHz, 16-bit, mono PCM).
pub const STT_CHUNK_BYTES: usize = 640;
/// stt mode: chunks per second and session.
pub const STT_RATE: f64 = 50.0;

/// The text message that ends a session gracefully.
pub const SESSION_END: &str = r#"{"type":"session.end"}"#;
/// What a text message must contain to end the drain of a session.
pub const SESSION_ENDED: &str = "\"session.ended\"";

/// The decoded header of an echo-mode data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub session: u32,
    pub seq: u64,
    pub intended_ns: u64,
}

/// Why a message that starts with [`MAGIC`] is not a valid data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Shorter than the header.
    Short,
    /// A field is not a fixed-width decimal number or a separator is missing.
    Malformed,
}

/// A message template of `size` bytes: magic, zeroed fields, separators and padding.
pub fn template(size: usize) -> Vec<u8> {
    let size = size.clamp(MIN_SIZE, MAX_SIZE);
    let mut v = Vec::with_capacity(size);
    v.extend_from_slice(MAGIC);
    v.extend(std::iter::repeat_n(b'0', SESSION_W));
    v.push(b' ');
    v.extend(std::iter::repeat_n(b'0', SEQ_W));
    v.push(b' ');
    v.extend(std::iter::repeat_n(b'0', TIME_W));
    v.push(b' ');
    debug_assert_eq!(v.len(), HEADER_LEN);
    let mut c = b'a';
    while v.len() < size {
        v.push(c);
        c = if c == b'z' { b'a' } else { c + 1 };
    }
    v
}

/// Writes the three header fields into `buf` (which starts with a [`template`]).
/// Values wider than their field keep their low-order digits (cannot happen for the
/// session index and sequence numbers a run produces).
pub fn write_header(buf: &mut [u8], h: Header) {
    if buf.len() < HEADER_LEN {
        return;
    }
    put_decimal(
        &mut buf[SESSION_AT..SESSION_AT + SESSION_W],
        u64::from(h.session),
    );
    put_decimal(&mut buf[SEQ_AT..SEQ_AT + SEQ_W], h.seq);
    put_decimal(&mut buf[TIME_AT..TIME_AT + TIME_W], h.intended_ns);
}

fn put_decimal(field: &mut [u8], mut v: u64) {
    for b in field.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

fn get_decimal(field: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for &b in field {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

/// True when `msg` claims to be a data message (starts with the magic).
pub fn is_data(msg: &[u8]) -> bool {
    msg.starts_with(MAGIC)
}

/// Parses the header of a data message (the caller checked [`is_data`]).
pub fn parse_header(msg: &[u8]) -> Result<Header, HeaderError> {
    if msg.len() < HEADER_LEN {
        return Err(HeaderError::Short);
    }
    if msg[SEQ_AT - 1] != b' ' || msg[TIME_AT - 1] != b' ' || msg[HEADER_LEN - 1] != b' ' {
        return Err(HeaderError::Malformed);
    }
    let session = get_decimal(&msg[SESSION_AT..SESSION_AT + SESSION_W])
        .and_then(|v| u32::try_from(v).ok())
        .ok_or(HeaderError::Malformed)?;
    let seq = get_decimal(&msg[SEQ_AT..SEQ_AT + SEQ_W]).ok_or(HeaderError::Malformed)?;
    let intended_ns = get_decimal(&msg[TIME_AT..TIME_AT + TIME_W]).ok_or(HeaderError::Malformed)?;
    Ok(Header {
        session,
        seq,
        intended_ns,
    })
}

/// One stt-mode audio chunk: a 400 Hz sine, 16 kHz, 16-bit little-endian mono, 20 ms
/// (exactly 8 periods, so every chunk is the same and is shared, never copied).
pub fn stt_chunk() -> Bytes {
    let samples = STT_CHUNK_BYTES / 2;
    let mut v = Vec::with_capacity(STT_CHUNK_BYTES);
    for n in 0..samples {
        let phase = 2.0 * std::f64::consts::PI * 400.0 * n as f64 / 16_000.0;
        let s = (phase.sin() * 8_000.0) as i16;
        v.extend_from_slice(&s.to_le_bytes());
    }
    Bytes::from(v)
}

/// A JSON event from an stt backend (`partial`, `final`, `session.started`, ...).
#[derive(Debug, Deserialize)]
pub struct SttEvent<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub session: Option<serde_json::Value>,
}

/// Parses an stt-mode JSON event; `None` when the text is not such an object.
pub fn parse_stt_event(text: &str) -> Option<SttEvent<'_>> {
    serde_json::from_str(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let mut buf = template(1024);
        assert_eq!(buf.len(), 1024);
        let h = Header {
            session: 2_999,
            seq: 5_999,
            intended_ns: 61_234_567_890,
        };
        write_header(&mut buf, h);
        assert!(is_data(&buf));
        assert_eq!(parse_header(&buf), Ok(h));
        assert_eq!(
            &buf[..HEADER_LEN + 3],
            b"LG1 0000002999 0000005999 00000000061234567890 abc"
        );
        assert!(buf.is_ascii());
    }

    #[test]
    fn size_is_clamped() {
        assert_eq!(template(1).len(), MIN_SIZE);
        assert_eq!(template(48).len(), 48);
    }

    #[test]
    fn malformed_headers() {
        assert_eq!(parse_header(b"LG1 12"), Err(HeaderError::Short));
        let mut buf = template(64);
        buf[SEQ_AT + 2] = b'x';
        assert_eq!(parse_header(&buf), Err(HeaderError::Malformed));
        let mut buf = template(64);
        buf[SESSION_AT] = b'9'; // 9_000_000_000 does not fit a u32
        assert_eq!(parse_header(&buf), Err(HeaderError::Malformed));
    }

    #[test]
    fn stt_chunk_is_20ms() {
        assert_eq!(stt_chunk().len(), STT_CHUNK_BYTES);
    }

    #[test]
    fn stt_events() {
        let e = parse_stt_event(r#"{"type":"partial","session":"s1","seq":3,"text":"x"}"#)
            .expect("parses");
        assert_eq!(e.kind, "partial");
        assert_eq!(e.seq, Some(3));
        assert!(parse_stt_event("not json").is_none());
    }
}
