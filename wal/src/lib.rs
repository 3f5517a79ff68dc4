//! The write-ahead log of published frames (segmented files, CRC32C records, sparse seq index,
//! group commit, recovery, retention) — not built yet.
//!
//! Planned boundary: knows frames as opaque byte records with a seq (from `mdbus-schema`), and
//! nothing of iceoryx2 or tokio. Until it lands the broker keeps no log, sequence numbers restart
//! at 1 with each broker incarnation (readers see the new `publisher_id` in heartbeats), and
//! `mdbus replay` does not exist.
#![forbid(unsafe_code)]
