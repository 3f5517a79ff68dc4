//! Frames: a fixed 48-byte header followed by an rkyv-archived body, padded to 16 bytes.
//!
//! A shared-memory sample carries one or more frames back to back (batching). Layout of the
//! header, all little-endian:
//!
//! ```text
//! offset size field
//!  0     4    magic          b"MDBF" (0x4642_444D as a little-endian u32)
//!  4     2    version        SCHEMA_VERSION
//!  6     1    kind           FrameKind
//!  7     1    flags          reserved, 0
//!  8     4    body_len       exact length of the rkyv archive that follows
//! 12     4    stream_id      which stream the seq belongs to
//! 16     8    seq            stream sequence number (heartbeats: the last data seq)
//! 24     8    ts_event_ns    exchange time of the event, ns since the epoch (0 if none)
//! 32     8    ts_recv_ns     when the broker ingested it
//! 40     8    ts_publish_ns  when the broker published it
//! 48     ..   body           body_len bytes, then zero padding to a multiple of 16
//! ```
//!
//! Decoding never trusts the bytes: lengths are checked before slicing, bodies are validated by
//! rkyv's `bytecheck`, then field invariants (interval, scales, symbol) are checked. Errors carry
//! the byte offset (or seq) of the fault. Upstream: `body`; downstream: the bus, the WAL, readers.

use rkyv::rancor::Failure;
use rkyv::util::AlignedVec;

use crate::body::{
    ArchivedHeartbeat, ArchivedKline, ArchivedSnapshotMark, ArchivedTrade, FeedState, Heartbeat, Kline, SnapshotMark,
    SnapshotPhase, Trade,
};
use crate::decimal::MAX_SCALE;
use crate::interval::Interval;
use crate::Seq;

/// `b"MDBF"` read as a little-endian `u32`.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"MDBF");
/// Bumped on any change of the header or body layout.
pub const SCHEMA_VERSION: u16 = 1;
/// Size of the fixed header.
pub const FRAME_HEADER_LEN: usize = 48;
/// Frames (and so bodies) start at multiples of this within a 16-aligned buffer.
pub const FRAME_ALIGN: usize = 16;
/// Largest body accepted by the decoder (bodies are ~200 bytes; this bounds garbage).
pub const MAX_BODY_LEN: u32 = 64 * 1024;

/// The bytes of a sample of frames, aligned as frames need (see [`FrameWriter::swap_buffer`]).
pub type FrameBuffer = AlignedVec<FRAME_ALIGN>;

/// What a frame's body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    Trade = 1,
    Kline = 2,
    Heartbeat = 3,
    /// A snapshot boundary or ack ([`crate::body::SnapshotMark`]).
    Snapshot = 4,
}

impl FrameKind {
    pub fn from_u8(v: u8) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::Trade,
            2 => FrameKind::Kline,
            3 => FrameKind::Heartbeat,
            4 => FrameKind::Snapshot,
            _ => return None,
        })
    }
    /// The `"kind"` of a JSON line.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameKind::Trade => "trade",
            FrameKind::Kline => "kline",
            FrameKind::Heartbeat => "heartbeat",
            FrameKind::Snapshot => "snapshot",
        }
    }
    /// Data frames take a sequence number; heartbeats repeat the last one.
    pub fn is_data(self) -> bool {
        !matches!(self, FrameKind::Heartbeat)
    }
}

/// The decoded fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub flags: u8,
    pub body_len: u32,
    pub stream_id: u32,
    pub seq: Seq,
    pub ts_event_ns: i64,
    pub ts_recv_ns: i64,
    pub ts_publish_ns: i64,
}

/// Why bytes were refused as a frame. Small and `Copy`: cheap on the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameDecodeError {
    #[error("frame at byte {offset}: {len} bytes left, shorter than a header")]
    TooShort { offset: usize, len: usize },
    #[error("frame at byte {offset}: bad magic {found:#010x}")]
    BadMagic { offset: usize, found: u32 },
    #[error("frame at byte {offset}: schema version {found}, this build reads {SCHEMA_VERSION}")]
    UnsupportedVersion { offset: usize, found: u16 },
    #[error("frame at byte {offset}: unknown kind {kind}")]
    UnknownKind { offset: usize, kind: u8 },
    #[error("frame at byte {offset}: body of {body_len} bytes runs past the end ({available} left)")]
    Truncated { offset: usize, body_len: u32, available: usize },
    #[error("frame seq {seq}: expected a {expected:?} body, found {found:?}")]
    WrongKind { seq: Seq, expected: FrameKind, found: FrameKind },
    #[error("frame seq {seq}: {kind:?} body failed validation")]
    InvalidBody { seq: Seq, kind: FrameKind },
    #[error("frame seq {seq}: invalid field `{field}`")]
    InvalidField { seq: Seq, field: &'static str },
}

/// Why a frame could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameEncodeError {
    #[error("rkyv serialization failed")]
    Serialize,
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}
fn read_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

const fn pad16(n: usize) -> usize {
    (n + FRAME_ALIGN - 1) & !(FRAME_ALIGN - 1)
}

impl FrameHeader {
    /// Encodes the header with the given body length.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        h[4..6].copy_from_slice(&SCHEMA_VERSION.to_le_bytes());
        h[6] = self.kind as u8;
        h[7] = self.flags;
        h[8..12].copy_from_slice(&self.body_len.to_le_bytes());
        h[12..16].copy_from_slice(&self.stream_id.to_le_bytes());
        h[16..24].copy_from_slice(&self.seq.to_le_bytes());
        h[24..32].copy_from_slice(&self.ts_event_ns.to_le_bytes());
        h[32..40].copy_from_slice(&self.ts_recv_ns.to_le_bytes());
        h[40..48].copy_from_slice(&self.ts_publish_ns.to_le_bytes());
        h
    }

    /// Decodes and checks the header at the start of `bytes` (`offset` is only for errors).
    pub fn decode(bytes: &[u8], offset: usize) -> Result<FrameHeader, FrameDecodeError> {
        if bytes.len() < FRAME_HEADER_LEN {
            return Err(FrameDecodeError::TooShort { offset, len: bytes.len() });
        }
        let magic = read_u32(bytes, 0);
        if magic != FRAME_MAGIC {
            return Err(FrameDecodeError::BadMagic { offset, found: magic });
        }
        let version = read_u16(bytes, 4);
        if version != SCHEMA_VERSION {
            return Err(FrameDecodeError::UnsupportedVersion { offset, found: version });
        }
        let kind = FrameKind::from_u8(bytes[6]).ok_or(FrameDecodeError::UnknownKind { offset, kind: bytes[6] })?;
        let body_len = read_u32(bytes, 8);
        let available = bytes.len() - FRAME_HEADER_LEN;
        if body_len > MAX_BODY_LEN || body_len as usize > available {
            return Err(FrameDecodeError::Truncated { offset, body_len, available });
        }
        Ok(FrameHeader {
            kind,
            flags: bytes[7],
            body_len,
            stream_id: read_u32(bytes, 12),
            seq: read_u64(bytes, 16),
            ts_event_ns: read_u64(bytes, 24) as i64,
            ts_recv_ns: read_u64(bytes, 32) as i64,
            ts_publish_ns: read_u64(bytes, 40) as i64,
        })
    }

    /// Bytes the whole frame occupies, padding included.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + pad16(self.body_len as usize)
    }
}

/// One frame inside a buffer: the decoded header and the (not yet validated) body bytes.
#[derive(Debug, Clone, Copy)]
pub struct FrameRef<'a> {
    pub header: FrameHeader,
    body: &'a [u8],
    raw: &'a [u8],
}

fn valid_scales(seq: Seq, price: u8, qty: u8) -> Result<(), FrameDecodeError> {
    // Quote amounts are at price + qty scale: keep that renderable exactly too.
    if u16::from(price) + u16::from(qty) > u16::from(MAX_SCALE) {
        return Err(FrameDecodeError::InvalidField { seq, field: "scale" });
    }
    Ok(())
}

impl<'a> FrameRef<'a> {
    /// Decodes the single frame at the start of `bytes`.
    pub fn parse(bytes: &'a [u8]) -> Result<FrameRef<'a>, FrameDecodeError> {
        Self::parse_at(bytes, 0)
    }

    fn parse_at(bytes: &'a [u8], offset: usize) -> Result<FrameRef<'a>, FrameDecodeError> {
        let header = FrameHeader::decode(bytes, offset)?;
        let body = &bytes[FRAME_HEADER_LEN..FRAME_HEADER_LEN + header.body_len as usize];
        let raw_len = header.frame_len().min(bytes.len());
        Ok(FrameRef { header, body, raw: &bytes[..raw_len] })
    }

    pub fn kind(&self) -> FrameKind {
        self.header.kind
    }
    pub fn seq(&self) -> Seq {
        self.header.seq
    }
    /// The body bytes as archived.
    pub fn body(&self) -> &'a [u8] {
        self.body
    }
    /// The whole frame as it sits in the buffer (header, body, padding).
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    fn expect(&self, kind: FrameKind) -> Result<(), FrameDecodeError> {
        if self.header.kind != kind {
            return Err(FrameDecodeError::WrongKind { seq: self.header.seq, expected: kind, found: self.header.kind });
        }
        Ok(())
    }

    /// The symbol bytes of a trade or K-line body, unvalidated: a cheap pre-filter before
    /// [`trade`](Self::trade) / [`kline`](Self::kline) validate the whole body.
    pub fn peek_symbol(&self) -> Option<&'a [u8]> {
        // Both bodies start with the symbol (pinned by the golden-bytes test).
        const AT: usize = std::mem::offset_of!(ArchivedKline, symbol);
        const _: () = assert!(AT == std::mem::offset_of!(ArchivedTrade, symbol));
        match self.header.kind {
            FrameKind::Trade | FrameKind::Kline => self.body.get(AT..AT + crate::symbol::SYMBOL_MAX_LEN),
            FrameKind::Heartbeat | FrameKind::Snapshot => None,
        }
    }

    /// The interval wire value of a K-line body, unvalidated (a cheap pre-filter).
    pub fn peek_interval(&self) -> Option<u8> {
        const AT: usize = std::mem::offset_of!(ArchivedKline, interval);
        match self.header.kind {
            FrameKind::Kline => self.body.get(AT).copied(),
            _ => None,
        }
    }

    /// The archived trade, validated, in place (zero-copy).
    pub fn trade(&self) -> Result<&'a ArchivedTrade, FrameDecodeError> {
        self.expect(FrameKind::Trade)?;
        let seq = self.header.seq;
        let t = rkyv::api::low::access::<ArchivedTrade, Failure>(self.body)
            .map_err(|_| FrameDecodeError::InvalidBody { seq, kind: FrameKind::Trade })?;
        t.symbol.to_symbol().map_err(|_| FrameDecodeError::InvalidField { seq, field: "symbol" })?;
        valid_scales(seq, t.price_scale, t.qty_scale)?;
        Ok(t)
    }

    /// The archived K-line, validated, in place (zero-copy).
    pub fn kline(&self) -> Result<&'a ArchivedKline, FrameDecodeError> {
        self.expect(FrameKind::Kline)?;
        let seq = self.header.seq;
        let k = rkyv::api::low::access::<ArchivedKline, Failure>(self.body)
            .map_err(|_| FrameDecodeError::InvalidBody { seq, kind: FrameKind::Kline })?;
        k.symbol.to_symbol().map_err(|_| FrameDecodeError::InvalidField { seq, field: "symbol" })?;
        if Interval::from_u8(k.interval).is_none() {
            return Err(FrameDecodeError::InvalidField { seq, field: "interval" });
        }
        valid_scales(seq, k.price_scale, k.qty_scale)?;
        Ok(k)
    }

    /// The archived heartbeat, validated, in place.
    pub fn heartbeat(&self) -> Result<&'a ArchivedHeartbeat, FrameDecodeError> {
        self.expect(FrameKind::Heartbeat)?;
        let seq = self.header.seq;
        let h = rkyv::api::low::access::<ArchivedHeartbeat, Failure>(self.body)
            .map_err(|_| FrameDecodeError::InvalidBody { seq, kind: FrameKind::Heartbeat })?;
        if FeedState::from_u8(h.feed_state).is_none() {
            return Err(FrameDecodeError::InvalidField { seq, field: "feed_state" });
        }
        Ok(h)
    }

    /// The archived snapshot mark, validated, in place.
    pub fn snapshot_mark(&self) -> Result<&'a ArchivedSnapshotMark, FrameDecodeError> {
        self.expect(FrameKind::Snapshot)?;
        let seq = self.header.seq;
        let m = rkyv::api::low::access::<ArchivedSnapshotMark, Failure>(self.body)
            .map_err(|_| FrameDecodeError::InvalidBody { seq, kind: FrameKind::Snapshot })?;
        if SnapshotPhase::from_u8(m.phase).is_none() {
            return Err(FrameDecodeError::InvalidField { seq, field: "phase" });
        }
        Ok(m)
    }

    /// Copies the body out as an owned value, whatever the buffer's alignment.
    pub fn to_owned_body(&self) -> Result<Body, FrameDecodeError> {
        let mut aligned: AlignedVec<FRAME_ALIGN> = AlignedVec::with_capacity(self.body.len());
        aligned.extend_from_slice(self.body);
        let copy = FrameRef { header: self.header, body: &aligned, raw: &aligned };
        let seq = self.header.seq;
        let de = |kind| FrameDecodeError::InvalidBody { seq, kind };
        Ok(match self.header.kind {
            FrameKind::Trade => Body::Trade(
                rkyv::api::deserialize_using::<Trade, _, Failure>(copy.trade()?, &mut ())
                    .map_err(|_| de(FrameKind::Trade))?,
            ),
            FrameKind::Kline => Body::Kline(
                rkyv::api::deserialize_using::<Kline, _, Failure>(copy.kline()?, &mut ())
                    .map_err(|_| de(FrameKind::Kline))?,
            ),
            FrameKind::Heartbeat => Body::Heartbeat(
                rkyv::api::deserialize_using::<Heartbeat, _, Failure>(copy.heartbeat()?, &mut ())
                    .map_err(|_| de(FrameKind::Heartbeat))?,
            ),
            FrameKind::Snapshot => Body::Snapshot(
                rkyv::api::deserialize_using::<SnapshotMark, _, Failure>(copy.snapshot_mark()?, &mut ())
                    .map_err(|_| de(FrameKind::Snapshot))?,
            ),
        })
    }
}

/// An owned, decoded body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    Trade(Trade),
    Kline(Kline),
    Heartbeat(Heartbeat),
    Snapshot(SnapshotMark),
}

/// Iterates the frames of a buffer (a shared-memory sample, a WAL record). Stops at the first
/// error, which it yields once.
#[derive(Debug, Clone)]
pub struct FrameIter<'a> {
    bytes: &'a [u8],
    offset: usize,
    failed: bool,
}

impl<'a> FrameIter<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        FrameIter { bytes, offset: 0, failed: false }
    }
}

impl<'a> Iterator for FrameIter<'a> {
    type Item = Result<FrameRef<'a>, FrameDecodeError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.offset >= self.bytes.len() {
            return None;
        }
        match FrameRef::parse_at(&self.bytes[self.offset..], self.offset) {
            Ok(f) => {
                self.offset += f.header.frame_len();
                Some(Ok(f))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Appends frames to a reusable 16-aligned buffer. After warm-up it does not allocate.
#[derive(Debug)]
pub struct FrameWriter {
    buf: AlignedVec<FRAME_ALIGN>,
    frames: usize,
}

impl FrameWriter {
    pub fn with_capacity(bytes: usize) -> Self {
        FrameWriter { buf: AlignedVec::with_capacity(bytes), frames: 0 }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn frames(&self) -> usize {
        self.frames
    }
    pub fn clear(&mut self) {
        self.buf.clear();
        self.frames = 0;
    }

    /// Hands over the written frames without copying them: returns this writer's buffer and goes
    /// on, empty, with `spare` (cleared here). A pool of buffers circulating this way lets a
    /// consumer such as a log thread take whole samples at no cost to the writing thread.
    pub fn swap_buffer(&mut self, mut spare: FrameBuffer) -> FrameBuffer {
        spare.clear();
        self.frames = 0;
        std::mem::replace(&mut self.buf, spare)
    }

    fn push_with<F>(&mut self, mut header: FrameHeader, serialize: F) -> Result<usize, FrameEncodeError>
    where
        F: FnOnce(&mut AlignedVec<FRAME_ALIGN>) -> Result<(), Failure>,
    {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
        if let Err(Failure) = serialize(&mut self.buf) {
            self.buf.resize(start, 0);
            return Err(FrameEncodeError::Serialize);
        }
        let body_len = self.buf.len() - start - FRAME_HEADER_LEN;
        header.body_len = body_len as u32;
        self.buf[start..start + FRAME_HEADER_LEN].copy_from_slice(&header.encode());
        let padded = start + FRAME_HEADER_LEN + pad16(body_len);
        self.buf.resize(padded, 0);
        self.frames += 1;
        Ok(padded - start)
    }

    /// Sets `ts_publish_ns` of every frame in the buffer: one clock read per sample instead of
    /// one per frame, taken just before the sample is sent.
    pub fn set_publish_time(&mut self, ts_publish_ns: i64) {
        let mut at = 0;
        let bytes = ts_publish_ns.to_le_bytes();
        while at + FRAME_HEADER_LEN <= self.buf.len() {
            let body_len = read_u32(&self.buf, at + 8) as usize;
            self.buf[at + 40..at + 48].copy_from_slice(&bytes);
            at += FRAME_HEADER_LEN + pad16(body_len);
        }
    }

    /// Appends a trade frame; returns the bytes it took.
    pub fn push_trade(&mut self, header: FrameHeader, t: &Trade) -> Result<usize, FrameEncodeError> {
        self.push_with(FrameHeader { kind: FrameKind::Trade, ..header }, |w| {
            rkyv::api::low::to_bytes_in_with_alloc::<_, _, Failure>(t, w, rkyv::ser::allocator::SubAllocator::empty())
                .map(|_| ())
        })
    }

    /// Appends a K-line frame; returns the bytes it took.
    pub fn push_kline(&mut self, header: FrameHeader, k: &Kline) -> Result<usize, FrameEncodeError> {
        self.push_with(FrameHeader { kind: FrameKind::Kline, ..header }, |w| {
            rkyv::api::low::to_bytes_in_with_alloc::<_, _, Failure>(k, w, rkyv::ser::allocator::SubAllocator::empty())
                .map(|_| ())
        })
    }

    /// Appends a heartbeat frame; returns the bytes it took.
    pub fn push_heartbeat(&mut self, header: FrameHeader, h: &Heartbeat) -> Result<usize, FrameEncodeError> {
        self.push_with(FrameHeader { kind: FrameKind::Heartbeat, ..header }, |w| {
            rkyv::api::low::to_bytes_in_with_alloc::<_, _, Failure>(h, w, rkyv::ser::allocator::SubAllocator::empty())
                .map(|_| ())
        })
    }
}

impl FrameWriter {
    /// Appends a snapshot mark frame; returns the bytes it took.
    pub fn push_snapshot_mark(&mut self, header: FrameHeader, m: &SnapshotMark) -> Result<usize, FrameEncodeError> {
        self.push_with(FrameHeader { kind: FrameKind::Snapshot, ..header }, |w| {
            rkyv::api::low::to_bytes_in_with_alloc::<_, _, Failure>(m, w, rkyv::ser::allocator::SubAllocator::empty())
                .map(|_| ())
        })
    }
}

/// Size in bytes of one encoded frame of each kind (bodies are fixed-size).
pub fn encoded_frame_len(kind: FrameKind) -> usize {
    FRAME_HEADER_LEN
        + pad16(match kind {
            FrameKind::Trade => std::mem::size_of::<ArchivedTrade>(),
            FrameKind::Kline => std::mem::size_of::<ArchivedKline>(),
            FrameKind::Heartbeat => std::mem::size_of::<ArchivedHeartbeat>(),
            FrameKind::Snapshot => std::mem::size_of::<ArchivedSnapshotMark>(),
        })
}

/// A default header for `kind` with the given seq; times zero.
pub fn header(kind: FrameKind, stream_id: u32, seq: Seq) -> FrameHeader {
    FrameHeader { kind, flags: 0, body_len: 0, stream_id, seq, ts_event_ns: 0, ts_recv_ns: 0, ts_publish_ns: 0 }
}
