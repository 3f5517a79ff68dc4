//! Any bytes after a valid segment header: recovery, reading, seeking and checking never panic,
//! and recovery leaves a log that reads back cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mdbus_wal::{check, Wal, WalOptions, WalReader};

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("mdbus-fuzz-wal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut header = [0u8; 32];
    header[0..8].copy_from_slice(b"MDBWAL01");
    header[8..10].copy_from_slice(&1u16.to_le_bytes());
    header[12..16].copy_from_slice(&1u32.to_le_bytes());
    header[16..24].copy_from_slice(&1u64.to_le_bytes());
    let crc = crc32c::crc32c(&header[..28]);
    header[28..32].copy_from_slice(&crc.to_le_bytes());
    let mut file = header.to_vec();
    file.extend_from_slice(data);
    std::fs::write(dir.join("seg-00000000000000000001.wal"), &file).unwrap();
    let _ = check(&dir);
    if let Ok(mut r) = WalReader::open(&dir) {
        let _ = r.seek(1 + data.first().copied().unwrap_or(0) as u64);
        while let Ok(Some(_)) = r.next_record() {}
    }
    if let Ok((wal, report)) = Wal::open(&dir, WalOptions::default()) {
        drop(wal);
        // After recovery the whole log reads back without an error.
        let mut r = WalReader::open(&dir).unwrap();
        let mut n = 0;
        while let Some(rec) = r.next_record().unwrap() {
            n = rec.seq;
        }
        assert_eq!(Some(n).filter(|&n| n > 0), report.last_seq);
    }
    let _ = std::fs::remove_dir_all(&dir);
});
