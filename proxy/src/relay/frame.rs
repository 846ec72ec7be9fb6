//! RFC 6455 frame headers and masking: the only WebSocket framing code of the
//! relay. Parsing is incremental (a header may arrive split across reads) and
//! never allocates; masking XORs in place, eight bytes at a time.

/// Frame opcodes (RFC 6455 §5.2).
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The longest frame header: 2 bytes, an 8-byte length, a 4-byte mask key.
pub const MAX_HEADER: usize = 14;

/// The largest payload of a control frame (ping, pong, close).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
    /// Bytes the header took on the wire.
    pub header_len: usize,
}

/// Why a header is not acceptable (answered with close 1002).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("reserved bits set")]
    Reserved,
    #[error("unknown opcode {0:#x}")]
    Opcode(u8),
    #[error("fragmented or oversized control frame")]
    Control,
    #[error("payload length with its most significant bit set")]
    Length,
}

impl Header {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }

    /// Parse a header from the start of `buf`: `Ok(None)` when more bytes are
    /// needed. Checks what RFC 6455 requires of every frame; the caller checks
    /// masking (which depends on the direction) and sizes.
    pub fn parse(buf: &[u8]) -> Result<Option<Header>, FrameError> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(FrameError::Reserved);
        }
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        match opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
            other => return Err(FrameError::Opcode(other)),
        }
        let masked = b1 & 0x80 != 0;
        let (len, mut at) = match b1 & 0x7F {
            126 => {
                let Some(b) = buf.get(2..4) else {
                    return Ok(None);
                };
                (u64::from(u16::from_be_bytes([b[0], b[1]])), 4)
            }
            127 => {
                let Some(b) = buf.get(2..10) else {
                    return Ok(None);
                };
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                let len = u64::from_be_bytes(a);
                if len >> 63 != 0 {
                    return Err(FrameError::Length);
                }
                (len, 10)
            }
            n => (u64::from(n), 2),
        };
        let mask = if masked {
            let Some(k) = buf.get(at..at + 4) else {
                return Ok(None);
            };
            at += 4;
            Some([k[0], k[1], k[2], k[3]])
        } else {
            None
        };
        let header = Header {
            fin,
            opcode,
            mask,
            len,
            header_len: at,
        };
        if header.is_control() && (!fin || len > MAX_CONTROL_PAYLOAD as u64) {
            return Err(FrameError::Control);
        }
        Ok(Some(header))
    }

    /// Encode into `out`, returning the bytes used (the shortest length form).
    pub fn encode(&self, out: &mut [u8; MAX_HEADER]) -> usize {
        out[0] = (u8::from(self.fin) << 7) | self.opcode;
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let mut at = if self.len < 126 {
            out[1] = mask_bit | self.len as u8;
            2
        } else if let Ok(short) = u16::try_from(self.len) {
            out[1] = mask_bit | 126;
            out[2..4].copy_from_slice(&short.to_be_bytes());
            4
        } else {
            out[1] = mask_bit | 127;
            out[2..10].copy_from_slice(&self.len.to_be_bytes());
            10
        };
        if let Some(k) = self.mask {
            out[at..at + 4].copy_from_slice(&k);
            at += 4;
        }
        at
    }
}

/// XOR `buf` with `key`, where `buf` starts `phase` bytes into the masked
/// payload. Masking and unmasking are the same operation.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], phase: usize) {
    let k = [
        key[phase & 3],
        key[(phase + 1) & 3],
        key[(phase + 2) & 3],
        key[(phase + 3) & 3],
    ];
    // Sixteen bytes at a time (one SSE2 register on x86_64), then eight,
    // then one: every chunk starts at a multiple of 4, so the key's phase is
    // the same at the start of each.
    let mut pattern = [0u8; 16];
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = k[i & 3];
    }
    let wide = u128::from_ne_bytes(pattern);
    let (chunks, rest) = buf.as_chunks_mut::<16>();
    for c in chunks {
        *c = (u128::from_ne_bytes(*c) ^ wide).to_ne_bytes();
    }
    let (chunks, rest) = rest.as_chunks_mut::<8>();
    for c in chunks {
        *c = (u64::from_ne_bytes(*c) ^ wide as u64).to_ne_bytes();
    }
    for (i, b) in rest.iter_mut().enumerate() {
        *b ^= k[i & 3];
    }
}

/// Append one whole frame to `out`, masking its payload when `mask` is given.
pub fn push_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    let header = Header {
        fin: true,
        opcode,
        mask,
        len: payload.len() as u64,
        header_len: 0,
    };
    let mut h = [0u8; MAX_HEADER];
    let n = header.encode(&mut h);
    out.extend_from_slice(&h[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(k) = mask {
        apply_mask(&mut out[start..], k, 0);
    }
}

/// A close frame's payload: the code and a reason cut to fit a control frame
/// (on a character boundary).
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut p = Vec::with_capacity(2 + cut);
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..cut]);
    p
}

/// Whether a close code may be sent by a peer (RFC 6455 §7.4).
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_in_every_length_form() {
        for len in [0u64, 1, 125, 126, 65_535, 65_536, 1 << 40] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let h = Header {
                    fin: len % 2 == 0,
                    opcode: OP_BINARY,
                    mask,
                    len,
                    header_len: 0,
                };
                let mut buf = [0u8; MAX_HEADER];
                let n = h.encode(&mut buf);
                for short in 0..n {
                    assert_eq!(Header::parse(&buf[..short]), Ok(None));
                }
                let parsed = Header::parse(&buf[..n]).unwrap().unwrap();
                assert_eq!(parsed, Header { header_len: n, ..h });
            }
        }
    }

    #[test]
    fn rejects_what_rfc_6455_forbids() {
        assert_eq!(Header::parse(&[0xC2, 0]), Err(FrameError::Reserved));
        assert_eq!(Header::parse(&[0x83, 0]), Err(FrameError::Opcode(3)));
        assert_eq!(Header::parse(&[0x09, 0]), Err(FrameError::Control));
        assert_eq!(
            Header::parse(&[0x89, 126, 0, 126]),
            Err(FrameError::Control)
        );
        let mut big = [0x82u8, 127, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(Header::parse(&big), Err(FrameError::Length));
        big[2] = 0;
        assert!(Header::parse(&big).unwrap().is_some());
    }

    #[test]
    fn masking_at_any_phase_matches_the_bytewise_definition() {
        let key = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..100u8).collect();
        for phase in 0..8 {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 24, 25, 31, 32, 33, 100] {
                let mut fast = data[..len].to_vec();
                apply_mask(&mut fast, key, phase);
                let slow: Vec<u8> = data[..len]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ key[(i + phase) % 4])
                    .collect();
                assert_eq!(fast, slow, "phase {phase} len {len}");
            }
        }
    }

    #[test]
    fn close_reasons_are_cut_on_a_character_boundary() {
        let p = close_payload(1000, &"é".repeat(100));
        assert!(p.len() <= MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
        assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1000);
    }
}
