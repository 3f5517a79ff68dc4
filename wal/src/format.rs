//! Byte layout of segments, records and index files (see `FORMAT.md`), and the durability policy.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::Seq;

/// `b"MDBWAL01"`: the first bytes of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"MDBWAL01";
pub const FORMAT_VERSION: u16 = 1;
/// Size of the segment header.
pub const SEGMENT_HEADER_LEN: usize = 32;
/// Size of a record header: len u32, crc32c u32, seq u64.
pub const RECORD_HEADER_LEN: usize = 16;
/// Records start at multiples of this (payloads are padded), so a payload read into an aligned
/// buffer is aligned for zero-copy access.
pub const RECORD_ALIGN: usize = 16;
/// Largest payload accepted (bounds what garbage can make us allocate).
pub const MAX_PAYLOAD: u32 = 16 * 1024 * 1024;
/// One sparse-index entry per this many records.
pub const INDEX_EVERY: u64 = 256;
/// Size of one index entry: seq u64, offset u64.
pub const INDEX_ENTRY_LEN: usize = 16;

pub(crate) const fn pad(n: usize) -> usize {
    (n + RECORD_ALIGN - 1) & !(RECORD_ALIGN - 1)
}

pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub stream_id: u32,
    pub base_seq: Seq,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut h = [0u8; SEGMENT_HEADER_LEN];
        h[0..8].copy_from_slice(&SEGMENT_MAGIC);
        h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.stream_id.to_le_bytes());
        h[16..24].copy_from_slice(&self.base_seq.to_le_bytes());
        let crc = crc32c::crc32c(&h[..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Checks magic, version and CRC; `None` for anything else.
    pub fn decode(b: &[u8]) -> Option<SegmentHeader> {
        if b.len() < SEGMENT_HEADER_LEN || b[0..8] != SEGMENT_MAGIC {
            return None;
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != FORMAT_VERSION || crc32c::crc32c(&b[..28]) != le_u32(b, 28) {
            return None;
        }
        Some(SegmentHeader { stream_id: le_u32(b, 12), base_seq: le_u64(b, 16) })
    }
}

/// Appends one record to `out`: header (length, CRC, seq), payload, zero padding to
/// [`RECORD_ALIGN`]. The CRC covers the seq (LE) and the payload, which lie back to back in the
/// record: one pass over them where they are written (a checksum call per record, not two).
pub(crate) fn encode_record(out: &mut Vec<u8>, seq: Seq, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.resize(start + RECORD_HEADER_LEN + pad(payload.len()), 0);
}

/// `seg-<base seq, 20 digits>.wal` and its index `seg-<base>.idx`.
pub(crate) fn segment_path(dir: &Path, base: Seq) -> PathBuf {
    dir.join(format!("seg-{base:020}.wal"))
}

pub(crate) fn index_path(segment: &Path) -> PathBuf {
    segment.with_extension("idx")
}

/// The base seq of a segment file name, if it is one.
pub(crate) fn parse_segment_name(name: &str) -> Option<Seq> {
    name.strip_prefix("seg-")?.strip_suffix(".wal")?.parse().ok()
}

/// When appended records are forced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Never fsync: the OS writes back when it likes (survives a process crash, not a power cut).
    None,
    /// fsync at a commit when the last one is older than this.
    Interval(Duration),
    /// fsync at every commit (every published batch).
    EveryBatch,
}

/// A durability policy string was not `none`, `interval:<ms>` or `every-batch`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("durability {0:?}: expected none, interval:<ms> or every-batch")]
pub struct DurabilityParseError(pub String);

impl FromStr for Durability {
    type Err = DurabilityParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Durability::None),
            "every-batch" => Ok(Durability::EveryBatch),
            _ => s
                .strip_prefix("interval:")
                .and_then(|ms| ms.parse::<u64>().ok())
                .filter(|&ms| ms > 0)
                .map(|ms| Durability::Interval(Duration::from_millis(ms)))
                .ok_or_else(|| DurabilityParseError(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of one record, as `FORMAT.md` draws them: the CRC is CRC-32C over the seq (LE)
    /// and the payload (the expected bytes were computed outside this crate).
    #[test]
    fn a_record_is_laid_out_as_the_format_says() {
        let mut out = vec![0xAA; 3];
        encode_record(&mut out, 42, b"mdbus record");
        let hex: String = out[3..].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "0c000000b3ff24a42a000000000000006d64627573207265636f726400000000");
        assert_eq!(out[..3], [0xAA; 3], "what was in the buffer before stays");
        assert_eq!(le_u32(&out, 3 + 4), crc32c::crc32c_append(crc32c::crc32c(&42u64.to_le_bytes()), b"mdbus record"));
    }
}
