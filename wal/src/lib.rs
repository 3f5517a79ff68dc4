//! The write-ahead log of a stream's frames: segmented files of CRC32C-checked records, a sparse
//! seq index per segment, group commit with a durability policy, recovery that truncates a torn or
//! corrupt tail, and retention that never deletes what a durable consumer has not acked.
//!
//! Upstream: the broker hands every published frame to [`Wal::append`] (with its seq) from a
//! thread of its own, then calls [`Wal::commit`] once per batch. Downstream: [`WalReader`] serves
//! `mdbus replay` and readers that resume from a seq. This crate knows frames only as opaque byte
//! records with a seq: nothing of iceoryx2, tokio or the frame layout. `FORMAT.md` draws the bytes.
#![forbid(unsafe_code)]

mod format;
mod reader;
mod writer;

pub use format::{Durability, DurabilityParseError, RECORD_ALIGN, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
pub use reader::{check, Corruption, RecordRef, WalReadError, WalReader};
pub use writer::{RecoveryReport, RetentionPolicy, Truncation, Wal, WalAppendError, WalOpenError, WalOptions};

/// The segment files in `dir` now (0 if it cannot be read).
pub fn segment_count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.filter_map(Result::ok)
            .filter(|e| e.file_name().to_str().and_then(format::parse_segment_name).is_some())
            .count()
    })
}

/// A sequence number (the stream's, carried by every record).
pub type Seq = u64;
