//! Any bytes as a shared-memory sample: decoding, validation and JSON rendering never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mdbus_schema::json::write_frame_line;
use mdbus_schema::{FrameIter, FrameKind};

fuzz_target!(|data: &[u8]| {
    // Aligned as shared memory hands it out, and unaligned as a careless caller might.
    let mut aligned = rkyv::util::AlignedVec::<16>::new();
    aligned.extend_from_slice(data);
    for bytes in [&aligned[..], data] {
        let mut line = String::new();
        for frame in FrameIter::new(bytes) {
            let Ok(frame) = frame else { break };
            let _ = match frame.kind() {
                FrameKind::Trade => frame.trade().map(drop),
                FrameKind::Kline => frame.kline().map(drop),
                FrameKind::Heartbeat => frame.heartbeat().map(drop),
                FrameKind::Snapshot => frame.snapshot_mark().map(drop),
            };
            let _ = frame.to_owned_body();
            line.clear();
            let _ = write_frame_line(&mut line, &frame);
        }
    }
});
