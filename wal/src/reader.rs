//! Reading the log: sequential scans (recovery, replay, `--check`), seek by seq through the sparse
//! index, and following a log that is still being written.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::format::{
    index_path, le_u32, le_u64, pad, parse_segment_name, SegmentHeader, INDEX_ENTRY_LEN, MAX_PAYLOAD, RECORD_ALIGN,
    RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use crate::Seq;

/// A failure while reading the log. Corruption names the file and byte offset.
#[derive(Debug, thiserror::Error)]
pub enum WalReadError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt record at byte {offset}: {reason}")]
    Corrupt { path: PathBuf, offset: u64, reason: &'static str },
    #[error("seq {requested} is older than the log: the oldest available seq is {oldest}")]
    TooOld { requested: Seq, oldest: Seq },
    #[error("the log in {dir} is empty")]
    Empty { dir: PathBuf },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> WalReadError + '_ {
    move |source| WalReadError::Io { path: path.to_owned(), source }
}

/// The segment files of `dir`, oldest first, as (base seq, path).
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(Seq, PathBuf)>, std::io::Error> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if let Some(base) = e.file_name().to_str().and_then(parse_segment_name) {
            v.push((base, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

/// What a scan step found.
#[derive(Debug)]
pub(crate) enum Step {
    /// A whole, valid record: its seq and where it starts.
    Record { seq: Seq, offset: u64 },
    /// The end of the file, exactly at a record boundary.
    End,
    /// Bytes that are not a whole valid record start here (torn or corrupt).
    Bad { offset: u64, reason: &'static str, incomplete: bool },
}

/// The largest read the scanner makes at once; the first read after opening or jumping is
/// [`FIRST_READ`], and each next one doubles up to this (a seek reads little, a scan reads big).
const MAX_READ: usize = 1 << 20;
const FIRST_READ: usize = 16 << 10;

/// Reads one segment record by record, validating length, CRC and seq continuity.
///
/// The file is read in large chunks into one buffer whose start is aligned to [`RECORD_ALIGN`];
/// records start at aligned file offsets, so every payload is handed out in place, aligned for
/// zero-copy access, without a copy per record.
#[derive(Debug)]
pub(crate) struct Scanner {
    pub path: PathBuf,
    file: File,
    /// File offset of the next record (of `buf[lo]`).
    pub offset: u64,
    /// The seq the next record must carry.
    pub expect: Seq,
    buf: Vec<u8>,
    /// `buf[base]` is aligned to `RECORD_ALIGN`; `buf[lo..hi]` holds file bytes not yet consumed.
    base: usize,
    lo: usize,
    hi: usize,
    /// Where the last record's payload lies in `buf`.
    payload_at: usize,
    payload_len: usize,
    read_size: usize,
}

impl Scanner {
    /// Opens `path`, checks its header, positions at the first record.
    pub fn open(path: &Path) -> Result<(Scanner, SegmentHeader), WalReadError> {
        let mut f = File::open(path).map_err(io(path))?;
        let mut h = [0u8; SEGMENT_HEADER_LEN];
        let got = read_full(&mut f, &mut h).map_err(io(path))?;
        let header = SegmentHeader::decode(&h[..got]).ok_or_else(|| WalReadError::Corrupt {
            path: path.to_owned(),
            offset: 0,
            reason: "bad segment header",
        })?;
        let mut s = Scanner {
            path: path.to_owned(),
            file: f,
            offset: SEGMENT_HEADER_LEN as u64,
            expect: header.base_seq,
            buf: Vec::new(),
            base: 0,
            lo: 0,
            hi: 0,
            payload_at: 0,
            payload_len: 0,
            read_size: FIRST_READ,
        };
        s.reserve(FIRST_READ);
        Ok((s, header))
    }

    /// The payload of the record the last [`step`](Self::step) returned.
    pub fn payload(&self) -> &[u8] {
        &self.buf[self.payload_at..self.payload_at + self.payload_len]
    }

    /// Moves to `offset`, where the record with seq `expect` starts (from the index).
    pub fn jump(&mut self, offset: u64, expect: Seq) -> Result<(), WalReadError> {
        self.file.seek(SeekFrom::Start(offset)).map_err(io(&self.path))?;
        self.offset = offset;
        self.expect = expect;
        (self.lo, self.hi) = (self.base, self.base);
        self.payload_len = 0;
        self.read_size = FIRST_READ;
        Ok(())
    }

    /// Makes room for `n` bytes (and for the next read) from `buf[lo]`: moves the unread bytes to
    /// the aligned start, and grows the buffer (keeping the start aligned) when they do not fit.
    fn reserve(&mut self, n: usize) {
        if self.buf.len() - self.lo >= n && self.hi < self.buf.len() {
            return;
        }
        let unread = self.hi - self.lo;
        let room = n.max(self.read_size);
        if self.buf.len() - self.base < room {
            let mut grown = vec![0u8; room + RECORD_ALIGN];
            let base = grown.as_ptr().align_offset(RECORD_ALIGN).min(RECORD_ALIGN);
            grown[base..base + unread].copy_from_slice(&self.buf[self.lo..self.hi]);
            self.buf = grown;
            self.base = base;
        } else {
            self.buf.copy_within(self.lo..self.hi, self.base);
        }
        (self.lo, self.hi) = (self.base, self.base + unread);
    }

    /// Reads until `buf[lo..hi]` holds `n` bytes or the file ends; true when it holds them.
    fn fill(&mut self, n: usize) -> Result<bool, WalReadError> {
        while self.hi - self.lo < n {
            self.reserve(n);
            let want = self.read_size.max(n - (self.hi - self.lo)).min(self.buf.len() - self.hi);
            let got = loop {
                match self.file.read(&mut self.buf[self.hi..self.hi + want]) {
                    Ok(k) => break k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io(&self.path)(e)),
                }
            };
            if got == 0 {
                return Ok(false);
            }
            self.hi += got;
            self.read_size = (self.read_size * 2).min(MAX_READ);
        }
        Ok(true)
    }

    /// Reads the next record (its payload then in [`payload`](Self::payload)). On anything but a
    /// whole valid record the position stays where it was (so a growing file can be read again
    /// later: the bytes already read stay buffered and the file is read on from there).
    pub fn step(&mut self) -> Result<Step, WalReadError> {
        let start = self.offset;
        if !self.fill(RECORD_HEADER_LEN)? {
            if self.hi == self.lo {
                return Ok(Step::End);
            }
            return Ok(Step::Bad { offset: start, reason: "torn record header", incomplete: true });
        }
        let head = &self.buf[self.lo..self.lo + RECORD_HEADER_LEN];
        let (len, crc, seq) = (le_u32(head, 0), le_u32(head, 4), le_u64(head, 8));
        if len > MAX_PAYLOAD {
            return Ok(Step::Bad { offset: start, reason: "impossible record length", incomplete: false });
        }
        let whole = RECORD_HEADER_LEN + pad(len as usize);
        if !self.fill(whole)? {
            return Ok(Step::Bad { offset: start, reason: "torn record", incomplete: true });
        }
        let at = self.lo + RECORD_HEADER_LEN;
        // The CRC covers the seq (LE) and the payload: the last 8 bytes of the header and what
        // follows, one contiguous run in the buffer (`record_crc` computes the same in two parts).
        if crc32c::crc32c(&self.buf[at - 8..at + len as usize]) != crc {
            return Ok(Step::Bad { offset: start, reason: "CRC mismatch", incomplete: false });
        }
        if seq != self.expect {
            return Ok(Step::Bad { offset: start, reason: "sequence out of order", incomplete: false });
        }
        (self.payload_at, self.payload_len) = (at, len as usize);
        self.lo += whole;
        self.offset = start + whole as u64;
        self.expect = seq + 1;
        Ok(Step::Record { seq, offset: start })
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Loads a segment's sparse index: (seq, offset) pairs, checked to increase.
pub(crate) fn load_index(segment: &Path) -> Vec<(Seq, u64)> {
    let Ok(bytes) = std::fs::read(index_path(segment)) else { return Vec::new() };
    let mut v: Vec<(Seq, u64)> = Vec::with_capacity(bytes.len() / INDEX_ENTRY_LEN);
    for e in bytes.chunks_exact(INDEX_ENTRY_LEN) {
        let entry = (le_u64(e, 0), le_u64(e, 8));
        if v.last().is_some_and(|l| entry.0 <= l.0 || entry.1 <= l.1) {
            break;
        }
        v.push(entry);
    }
    v
}

/// One record as read: its seq and payload (valid until the next read). The payload lies in the
/// reader's buffer at an address aligned to [`RECORD_ALIGN`], so a frame can be validated and read
/// in place.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub seq: Seq,
    pub payload: &'a [u8],
}

/// Reads a log (possibly while it is being written).
#[derive(Debug)]
pub struct WalReader {
    dir: PathBuf,
    segments: Vec<(Seq, PathBuf)>,
    current: usize,
    scanner: Option<Scanner>,
    /// Records below this seq are not returned (a seek past the current end of the log).
    skip_below: Seq,
    /// Records scanned past while seeking (shows that seeking does not scan the log).
    pub records_skipped: u64,
}

impl WalReader {
    pub fn open(dir: &Path) -> Result<WalReader, WalReadError> {
        let segments = list_segments(dir).map_err(io(dir))?;
        Ok(WalReader { dir: dir.to_owned(), segments, current: 0, scanner: None, skip_below: 0, records_skipped: 0 })
    }

    /// The oldest seq the log can serve, if any.
    pub fn first_seq(&self) -> Option<Seq> {
        self.segments.first().map(|s| s.0)
    }

    fn refresh(&mut self) -> Result<(), WalReadError> {
        self.segments = list_segments(&self.dir).map_err(io(&self.dir))?;
        Ok(())
    }

    /// Positions the reader so that [`next_record`](Self::next_record) returns `seq` (or the record after it,
    /// once written). Binary search over segments, then over the segment's sparse index, then at
    /// most `INDEX_EVERY` records scanned.
    pub fn seek(&mut self, seq: Seq) -> Result<(), WalReadError> {
        self.refresh()?;
        let oldest = self.first_seq().ok_or_else(|| WalReadError::Empty { dir: self.dir.clone() })?;
        if seq < oldest {
            return Err(WalReadError::TooOld { requested: seq, oldest });
        }
        let i = self.segments.partition_point(|s| s.0 <= seq) - 1;
        let path = self.segments[i].1.clone();
        let (mut sc, header) = Scanner::open(&path)?;
        if header.base_seq != self.segments[i].0 {
            return Err(WalReadError::Corrupt {
                path,
                offset: 16,
                reason: "header base seq differs from the file name",
            });
        }
        let index = load_index(&path);
        let j = index.partition_point(|e| e.0 <= seq);
        if j > 0 {
            let (s, off) = index[j - 1];
            sc.jump(off, s)?;
            // The index is a cache: if its entry does not land on that record, scan instead.
            let ok = matches!(sc.step()?, Step::Record { seq: got, .. } if got == s);
            if ok {
                sc.jump(off, s)?;
            } else {
                sc = Scanner::open(&path)?.0;
            }
        }
        // Scan forward to `seq`, remembering where it starts.
        loop {
            let before = (sc.offset, sc.expect);
            if sc.expect >= seq {
                break;
            }
            match sc.step()? {
                Step::Record { .. } => self.records_skipped += 1,
                Step::End | Step::Bad { incomplete: true, .. } => break,
                Step::Bad { offset, reason, .. } => return Err(WalReadError::Corrupt { path, offset, reason }),
            }
            if sc.expect > seq {
                sc.jump(before.0, before.1)?;
                break;
            }
        }
        self.current = i;
        self.scanner = Some(sc);
        self.skip_below = seq;
        Ok(())
    }

    /// The next record, or `None` at the current end of the log (call again later to follow it).
    /// Corruption is an error naming the file and offset, never skipped.
    pub fn next_record(&mut self) -> Result<Option<RecordRef<'_>>, WalReadError> {
        if self.scanner.is_none() {
            let first = self.first_seq().or_else(|| self.refresh().ok().and_then(|_| self.first_seq()));
            match first {
                Some(s) => self.seek(s)?,
                None => return Ok(None),
            }
        }
        loop {
            let Some(sc) = self.scanner.as_mut() else { return Ok(None) };
            match sc.step()? {
                Step::Record { seq, .. } if seq < self.skip_below => continue,
                Step::Record { seq, .. } => {
                    let sc = self.scanner.as_ref().map(Scanner::payload).unwrap_or(&[]);
                    return Ok(Some(RecordRef { seq, payload: sc }));
                }
                Step::Bad { offset, reason, incomplete: false } => {
                    return Err(WalReadError::Corrupt { path: sc.path.clone(), offset, reason });
                }
                Step::End | Step::Bad { incomplete: true, .. } => {
                    // The end of this segment: move on if a newer one exists, else wait.
                    let expect = sc.expect;
                    let (offset, path) = (sc.offset, sc.path.clone());
                    self.refresh()?;
                    // Retention may have removed older segments: find ours again by name.
                    let Some(cur) = self.segments.iter().position(|s| s.1 == path) else {
                        return Err(WalReadError::TooOld {
                            requested: expect,
                            oldest: self.first_seq().unwrap_or(expect),
                        });
                    };
                    self.current = cur;
                    match self.segments.get(cur + 1).cloned() {
                        Some((base, next)) if base == expect => match Scanner::open(&next) {
                            Ok((s, _)) => {
                                self.current += 1;
                                self.scanner = Some(s);
                            }
                            // Created but its header not written yet: try again later.
                            Err(WalReadError::Corrupt { offset: 0, .. })
                                if std::fs::metadata(&next).map_or(true, |m| m.len() < SEGMENT_HEADER_LEN as u64) =>
                            {
                                return Ok(None);
                            }
                            Err(e) => return Err(e),
                        },
                        Some(_) => {
                            // A successor exists: this segment is final. Read it once more (the
                            // writer may have flushed its last records after our look), then
                            // it must end exactly before the successor.
                            let sc = self.scanner.as_mut().ok_or(WalReadError::Empty { dir: self.dir.clone() })?;
                            if let Step::Record { seq, .. } = sc.step()? {
                                if seq < self.skip_below {
                                    continue;
                                }
                                let payload = self.scanner.as_ref().map(Scanner::payload).unwrap_or(&[]);
                                return Ok(Some(RecordRef { seq, payload }));
                            }
                            return Err(WalReadError::Corrupt { path, offset, reason: "segment ends early" });
                        }
                        None => return Ok(None),
                    }
                }
            }
        }
    }
}

/// One problem found by [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    pub path: PathBuf,
    pub offset: u64,
    pub reason: String,
}

/// Reads every record of every segment in `dir` and reports each place that is not a whole, valid
/// record in sequence (a torn tail of the newest segment included: the writer would truncate it).
/// Returns the number of valid records and the problems.
pub fn check(dir: &Path) -> Result<(u64, Vec<Corruption>), WalReadError> {
    let segments = list_segments(dir).map_err(io(dir))?;
    let mut records = 0;
    let mut problems = Vec::new();
    let mut expect: Option<Seq> = None;
    for (base, path) in &segments {
        if expect.is_some_and(|e| e != *base) {
            problems.push(Corruption {
                path: path.clone(),
                offset: 0,
                reason: format!("expected segment base {}, found {base}", expect.unwrap_or(0)),
            });
        }
        let (mut sc, _) = match Scanner::open(path) {
            Ok(s) => s,
            Err(WalReadError::Corrupt { offset, reason, .. }) => {
                problems.push(Corruption { path: path.clone(), offset, reason: reason.into() });
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut whole = true;
        loop {
            match sc.step()? {
                Step::Record { .. } => records += 1,
                Step::End => break,
                Step::Bad { offset, reason, .. } => {
                    problems.push(Corruption { path: path.clone(), offset, reason: reason.into() });
                    whole = false;
                    break;
                }
            }
        }
        // After a bad record the next segment's base cannot be checked against this one.
        expect = whole.then_some(sc.expect);
    }
    Ok((records, problems))
}
