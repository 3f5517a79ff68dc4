//! Appending to the log: segments rolled by size, a sparse index per segment, group commit under
//! a durability policy, recovery of a torn or corrupt tail on open, and retention.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::format::{
    encode_record, index_path, pad, segment_path, Durability, SegmentHeader, INDEX_EVERY, RECORD_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};
use crate::reader::{list_segments, Scanner, Step, WalReadError};
use crate::Seq;

/// How the log is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalOptions {
    /// Written into every segment header (a log belongs to one stream).
    pub stream_id: u32,
    /// A new segment starts once the current one would grow past this.
    pub segment_bytes: u64,
    pub durability: Durability,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            stream_id: 1,
            segment_bytes: 64 * 1024 * 1024,
            durability: Durability::Interval(Duration::from_millis(10)),
        }
    }
}

/// What may be deleted: whole segments beyond these limits (never the newest one, never one that
/// holds a seq a live durable consumer has not acked).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub max_bytes: Option<u64>,
    pub max_age: Option<Duration>,
}

/// Where recovery cut the newest segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    pub path: PathBuf,
    pub offset: u64,
    pub reason: &'static str,
}

/// What opening the log found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The last whole, valid record's seq (`None`: the log is empty).
    pub last_seq: Option<Seq>,
    pub segments: usize,
    pub truncated: Option<Truncation>,
}

/// Opening (and recovering) the log failed.
#[derive(Debug, thiserror::Error)]
pub enum WalOpenError {
    #[error("opening wal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Read(#[from] WalReadError),
}

/// Appending failed.
#[derive(Debug, thiserror::Error)]
pub enum WalAppendError {
    #[error("writing wal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("wal expects seq {expected}, got {got}")]
    OutOfSequence { expected: Seq, got: Seq },
    #[error("record of {0} bytes is too large")]
    TooLarge(usize),
}

/// Data syncs of the `interval` policy, on a thread of their own: the appending thread goes on
/// writing while the disk catches up (at most one sync in flight; each covers everything written
/// before it started). A failed sync is reported by the next commit.
#[derive(Debug)]
struct Syncer {
    requests: Option<mpsc::Sender<Arc<File>>>,
    state: Arc<SyncState>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct SyncState {
    busy: AtomicBool,
    done: AtomicU64,
    last_micros: AtomicU64,
    error: Mutex<Option<std::io::Error>>,
}

impl Syncer {
    fn start() -> std::io::Result<Syncer> {
        let (requests, rx) = mpsc::channel::<Arc<File>>();
        let state = Arc::new(SyncState::default());
        let st = Arc::clone(&state);
        let thread = std::thread::Builder::new().name("mdbus-wal-sync".into()).spawn(move || {
            for file in rx {
                let t0 = Instant::now();
                let r = file.sync_data();
                st.last_micros.store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                match r {
                    Ok(()) => {
                        st.done.fetch_add(1, Ordering::Release);
                    }
                    Err(e) => {
                        if let Ok(mut slot) = st.error.lock() {
                            slot.get_or_insert(e);
                        }
                    }
                }
                st.busy.store(false, Ordering::Release);
            }
        })?;
        Ok(Syncer { requests: Some(requests), state, thread: Some(thread) })
    }

    /// Starts a sync of `file` unless one is still running; false if it did not start.
    fn request(&self, file: &Arc<File>) -> bool {
        if self.state.busy.swap(true, Ordering::AcqRel) {
            return false;
        }
        let sent = self.requests.as_ref().is_some_and(|tx| tx.send(Arc::clone(file)).is_ok());
        if !sent {
            self.state.busy.store(false, Ordering::Release);
        }
        sent
    }

    fn take_error(&self) -> Option<std::io::Error> {
        self.state.error.lock().ok()?.take()
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        // The sync in flight finishes; then the thread sees the channel closed.
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Appended records are buffered up to this many bytes between writes to the segment file (a
/// commit writes whatever is buffered). Large writes cost the kernel less per byte.
const WRITE_BUFFER: usize = 1 << 20;

/// The appending end of a log directory (one writer per directory).
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    options: WalOptions,
    path: PathBuf,
    /// Shared with the background syncs (`interval`), which sync the same open file.
    file: Arc<File>,
    /// Records appended since the last write to `file` (written once past [`WRITE_BUFFER`], and
    /// by every commit).
    buf: Vec<u8>,
    syncer: Option<Syncer>,
    /// Data syncs done inline (every-batch policy, segment rolls); the syncer counts its own.
    inline_syncs: u64,
    last_sync_micros: u64,
    index: BufWriter<File>,
    segment_len: u64,
    records_in_segment: u64,
    next_seq: Option<Seq>,
    last_sync: Instant,
    unsynced: bool,
}

fn open_err(path: &Path) -> impl Fn(std::io::Error) -> WalOpenError + '_ {
    move |source| WalOpenError::Io { path: path.to_owned(), source }
}

fn append_err(path: &Path) -> impl Fn(std::io::Error) -> WalAppendError + '_ {
    move |source| WalAppendError::Io { path: path.to_owned(), source }
}

/// Writes the appended records in `buf` to the segment file and empties it. On an error, what
/// was written is gone from `buf` and the rest stays: a later call goes on where this one stopped.
fn drain_to(mut file: &File, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut done = 0;
    let result = loop {
        if done == buf.len() {
            break Ok(());
        }
        match file.write(&buf[done..]) {
            Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    buf.drain(..done);
    result
}

fn create_segment(dir: &Path, base: Seq, stream_id: u32) -> std::io::Result<(PathBuf, File, File)> {
    let path = segment_path(dir, base);
    let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
    f.write_all(&SegmentHeader { stream_id, base_seq: base }.encode())?;
    let idx = OpenOptions::new().create(true).write(true).truncate(true).open(index_path(&path))?;
    f.sync_all()?;
    // The new file's name must survive a power cut too.
    File::open(dir)?.sync_all()?;
    Ok((path, f, idx))
}

impl Wal {
    /// Opens the log in `dir` (created if missing). The newest segment is read through: a torn or
    /// corrupt tail is cut off at the last whole record (logged as a warning with file and
    /// offset), and its index rebuilt. Appending continues at `last_seq + 1`.
    pub fn open(dir: &Path, options: WalOptions) -> Result<(Wal, RecoveryReport), WalOpenError> {
        std::fs::create_dir_all(dir).map_err(open_err(dir))?;
        let mut segments = list_segments(dir).map_err(open_err(dir))?;
        let mut truncated = None;
        // A newest segment whose header never made it to disk (shorter than a header, or zeros)
        // holds nothing: drop it. Any other bad header is an error, never a deletion.
        if let Some((_, path)) = segments.last().cloned() {
            if let Err(WalReadError::Corrupt { offset: 0, .. }) = Scanner::open(&path) {
                let bytes = std::fs::read(&path).map_err(open_err(&path))?;
                if bytes.len() < SEGMENT_HEADER_LEN || bytes[..SEGMENT_HEADER_LEN].iter().all(|&b| b == 0) {
                    tracing::warn!(file = %path.display(), "removing the newest wal segment: its header was never written");
                    let _ = std::fs::remove_file(index_path(&path));
                    std::fs::remove_file(&path).map_err(open_err(&path))?;
                    segments.pop();
                }
            }
        }
        let Some((base, path)) = segments.last().cloned() else {
            let (path, file, idx) = create_segment(dir, 1, options.stream_id).map_err(open_err(dir))?;
            let wal = Wal::with_files(dir, options, path, file, idx, SEGMENT_HEADER_LEN as u64, 0, None)
                .map_err(open_err(dir))?;
            return Ok((wal, RecoveryReport { last_seq: None, segments: 1, truncated: None }));
        };
        // Read the newest segment through, rebuilding its index.
        let (mut sc, header) = Scanner::open(&path)?;
        if header.stream_id != options.stream_id {
            return Err(WalOpenError::Io {
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("log of stream {}, not {}", header.stream_id, options.stream_id),
                ),
            });
        }
        let mut entries: Vec<u8> = Vec::new();
        let mut records = 0u64;
        let end = loop {
            match sc.step()? {
                Step::Record { seq, offset } => {
                    if records.is_multiple_of(INDEX_EVERY) {
                        entries.extend_from_slice(&seq.to_le_bytes());
                        entries.extend_from_slice(&offset.to_le_bytes());
                    }
                    records += 1;
                }
                Step::End => break sc.offset,
                Step::Bad { offset, reason, .. } => {
                    tracing::warn!(file = %path.display(), offset, reason, "wal tail truncated to the last whole record");
                    truncated = Some(Truncation { path: path.clone(), offset, reason });
                    break offset;
                }
            }
        };
        let file = OpenOptions::new().write(true).open(&path).map_err(open_err(&path))?;
        file.set_len(end).map_err(open_err(&path))?;
        file.sync_all().map_err(open_err(&path))?;
        let mut file = file;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0)).map_err(open_err(&path))?;
        let mut idx = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(index_path(&path))
            .map_err(open_err(&path))?;
        idx.write_all(&entries).map_err(open_err(&path))?;
        let last = sc.expect.checked_sub(1).filter(|&s| s >= 1);
        let last = if records == 0 && base > 1 { Some(base - 1) } else { last };
        let n = segments.len();
        let wal =
            Wal::with_files(dir, options, path.clone(), file, idx, end, records, last).map_err(open_err(&path))?;
        Ok((wal, RecoveryReport { last_seq: last, segments: n, truncated }))
    }

    #[allow(clippy::too_many_arguments)]
    fn with_files(
        dir: &Path,
        options: WalOptions,
        path: PathBuf,
        file: File,
        idx: File,
        segment_len: u64,
        records: u64,
        last: Option<Seq>,
    ) -> std::io::Result<Wal> {
        let syncer = match options.durability {
            Durability::Interval(_) => Some(Syncer::start()?),
            Durability::None | Durability::EveryBatch => None,
        };
        Ok(Wal {
            dir: dir.to_owned(),
            options,
            path,
            syncer,
            inline_syncs: 0,
            last_sync_micros: 0,
            file: Arc::new(file),
            // Room for the record that crosses the mark before the buffer is written (frames
            // are far below 64 KiB; a bigger record just grows it).
            buf: Vec::with_capacity(WRITE_BUFFER + (64 << 10)),
            index: BufWriter::with_capacity(4096, idx),
            segment_len,
            records_in_segment: records,
            next_seq: last.map(|s| s + 1),
            last_sync: Instant::now(),
            unsynced: false,
        })
    }

    /// The seq the next record must carry (`None` for an empty log: any seq may start it).
    pub fn next_seq(&self) -> Option<Seq> {
        self.next_seq
    }

    /// Appends one record (buffered; durable per policy after [`commit`](Self::commit)).
    pub fn append(&mut self, seq: Seq, payload: &[u8]) -> Result<(), WalAppendError> {
        if payload.len() > crate::format::MAX_PAYLOAD as usize {
            return Err(WalAppendError::TooLarge(payload.len()));
        }
        if let Some(expected) = self.next_seq {
            if seq != expected {
                return Err(WalAppendError::OutOfSequence { expected, got: seq });
            }
        }
        let size = (RECORD_HEADER_LEN + pad(payload.len())) as u64;
        if self.records_in_segment > 0 && self.segment_len + size > self.options.segment_bytes {
            self.roll(seq)?;
        } else if self.records_in_segment == 0 && self.next_seq.is_none() && seq != 1 {
            // An empty log starting past 1: name the first segment after its first seq.
            self.roll(seq)?;
        }
        let e = append_err(&self.path);
        if self.records_in_segment.is_multiple_of(INDEX_EVERY) {
            self.index.write_all(&seq.to_le_bytes()).map_err(&e)?;
            self.index.write_all(&self.segment_len.to_le_bytes()).map_err(&e)?;
        }
        encode_record(&mut self.buf, seq, payload);
        self.segment_len += size;
        self.records_in_segment += 1;
        self.next_seq = Some(seq + 1);
        self.unsynced = true;
        if self.buf.len() >= WRITE_BUFFER {
            // The record is appended either way; a failed write leaves it buffered.
            drain_to(&self.file, &mut self.buf).map_err(&e)?;
        }
        Ok(())
    }

    /// Ends a batch: writes the buffered records to the file and syncs them per the policy.
    pub fn commit(&mut self) -> Result<(), WalAppendError> {
        self.write_out()?;
        let io = |path: &Path, source| WalAppendError::Io { path: path.to_owned(), source };
        match (&self.syncer, self.options.durability) {
            (_, Durability::None) => {}
            (Some(syncer), Durability::Interval(d)) => {
                // Due and none running: start one in the background and go on writing.
                if self.unsynced && self.last_sync.elapsed() >= d && syncer.request(&self.file) {
                    self.last_sync = Instant::now();
                    self.unsynced = false;
                }
            }
            // Every batch (an `interval` log always has its syncer).
            _ => {
                if self.unsynced {
                    self.sync_inline().map_err(|s| io(&self.path, s))?;
                }
            }
        }
        Ok(())
    }

    /// Writes the buffered records and index entries to their files; fails with the error of a
    /// background sync that failed since the last call.
    fn write_out(&mut self) -> Result<(), WalAppendError> {
        let e = append_err(&self.path);
        drain_to(&self.file, &mut self.buf).map_err(&e)?;
        self.index.flush().map_err(&e)?;
        match self.syncer.as_ref().and_then(Syncer::take_error) {
            Some(source) => Err(e(source)),
            None => Ok(()),
        }
    }

    fn sync_inline(&mut self) -> std::io::Result<()> {
        let t0 = Instant::now();
        self.file.sync_data()?;
        self.last_sync_micros = t0.elapsed().as_micros() as u64;
        self.last_sync = Instant::now();
        self.unsynced = false;
        self.inline_syncs += 1;
        Ok(())
    }

    fn roll(&mut self, base: Seq) -> Result<(), WalAppendError> {
        // The finished segment is made durable whatever the policy: only the newest one can
        // have a torn tail. (Written out, not committed: a commit's data sync would only come
        // before this full one.)
        self.write_out()?;
        self.file.sync_all().map_err(append_err(&self.path))?;
        self.index.get_ref().sync_all().map_err(append_err(&self.path))?;
        let empty_first = self.records_in_segment == 0;
        let old = self.path.clone();
        let (path, file, idx) =
            create_segment(&self.dir, base, self.options.stream_id).map_err(append_err(&self.dir))?;
        if empty_first && old != path {
            // An empty first segment replaced by one that starts at the right seq.
            let _ = std::fs::remove_file(index_path(&old));
            let _ = std::fs::remove_file(&old);
        }
        self.path = path;
        self.file = Arc::new(file);
        self.index = BufWriter::with_capacity(4096, idx);
        self.segment_len = SEGMENT_HEADER_LEN as u64;
        self.records_in_segment = 0;
        Ok(())
    }

    /// Deletes the oldest segments while the log exceeds `policy`, but never the newest segment
    /// and never a segment holding a seq above `acked` (the lowest seq every live durable consumer
    /// has acked; `None`: no durable consumer). Returns the deleted files.
    pub fn retain(&mut self, policy: &RetentionPolicy, acked: Option<Seq>) -> Result<Vec<PathBuf>, WalAppendError> {
        let segs = list_segments(&self.dir).map_err(append_err(&self.dir))?;
        let sizes: Vec<u64> = segs.iter().map(|(_, p)| std::fs::metadata(p).map_or(0, |m| m.len())).collect();
        let mut total: u64 = sizes.iter().sum();
        let mut deleted = Vec::new();
        for i in 0..segs.len().saturating_sub(1) {
            let (_, path) = &segs[i];
            // Every seq in segment i is below the next segment's base.
            let last_in_segment = segs[i + 1].0.saturating_sub(1);
            if acked.is_some_and(|a| last_in_segment > a) {
                break;
            }
            let too_big = policy.max_bytes.is_some_and(|m| total > m);
            let too_old = policy.max_age.is_some_and(|age| {
                std::fs::metadata(path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|d| d > age)
            });
            if !(too_big || too_old) {
                break;
            }
            std::fs::remove_file(path).map_err(append_err(path))?;
            let _ = std::fs::remove_file(index_path(path));
            total -= sizes[i];
            deleted.push(path.clone());
        }
        Ok(deleted)
    }

    /// Data syncs done so far (for the fsync metrics): those finished in the background and
    /// those done inline.
    pub fn syncs(&self) -> u64 {
        self.inline_syncs + self.syncer.as_ref().map_or(0, |s| s.state.done.load(Ordering::Acquire))
    }

    /// How long the last finished data sync took, µs.
    pub fn last_sync_micros(&self) -> u64 {
        match &self.syncer {
            Some(s) if s.state.done.load(Ordering::Acquire) > 0 => s.state.last_micros.load(Ordering::Relaxed),
            _ => self.last_sync_micros,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        let _ = drain_to(&self.file, &mut self.buf);
        let _ = self.index.flush();
    }
}
