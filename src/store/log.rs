//! The backlog's log: append-only segment files of checksummed frames, and an index in memory
//! of the entries not finished yet.
//!
//! A frame is a 16-byte header (a magic number, the payload's length, the payload's CRC-32C
//! checksum; frames of earlier versions, with another magic number, carry the first 8 bytes of
//! the payload's SHA-256 instead) followed by entries: an accepted delivery (its sequence number, webhook
//! and JSON) or a tombstone (the sequence number of a delivery that finished). One frame holds
//! every delivery of one group commit and is made durable by one `fdatasync`. At open the
//! segments are read in order; a frame that is cut short or does not match its checksum (the
//! tail of a write a crash interrupted, which no request was answered for) ends its segment,
//! which is truncated there.
//!
//! A segment is deleted once every delivery in it has finished and every older segment is gone
//! (so a tombstone never outlives a segment it refers to). When the segments on disk pass
//! [`COMPACT_AFTER`] segments' worth of bytes while the oldest still holds unfinished deliveries (a webhook that
//! is down), those are copied into the newest segment under their own sequence numbers and the
//! oldest is deleted: the log holds the backlog plus a bounded amount of finished entries.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use foldhash::HashMap;
use sha2::Digest as _;

use super::StoreError;

/// A segment is closed and a new one started once it holds this many bytes.
const SEGMENT_BYTES: u64 = 16 << 20;
/// Past this many segments' worth of bytes the oldest one's unfinished deliveries are copied
/// forward.
const COMPACT_AFTER: u64 = 4;
/// The first four bytes of every frame written now: its checksum is the payload's CRC-32.
const MAGIC: u32 = 0x4842_4c32;
/// The first four bytes of a frame written by earlier versions: its checksum is the first
/// 8 bytes of the payload's SHA-256 (read, never written).
const MAGIC_SHA256: u32 = 0x4842_4c31;
const HEADER: usize = 16;
const ENTRY: u8 = 1;
const TOMBSTONE: u8 = 2;

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Database(format!("{what} {}: {e}", path.display()))
}

/// Where an unfinished delivery's JSON is.
#[derive(Clone, Copy)]
struct Place {
    segment: u64,
    offset: u64,
    len: u32,
}

/// One segment file.
struct Segment {
    file: Arc<File>,
    /// Unfinished deliveries in it.
    live: usize,
    /// Its length on disk.
    len: u64,
}

/// What readers and the writer share: the unfinished deliveries per webhook, and the segments.
#[derive(Default)]
struct Index {
    by_webhook: HashMap<String, BTreeMap<u64, Place>>,
    segments: BTreeMap<u64, Segment>,
}

impl Index {
    fn add(&mut self, webhook: &str, seq: u64, place: Place) {
        let entries = match self.by_webhook.get_mut(webhook) {
            Some(entries) => entries,
            None => self.by_webhook.entry(webhook.to_string()).or_default(),
        };
        if let Some(old) = entries.insert(seq, place)
            && let Some(segment) = self.segments.get_mut(&old.segment)
        {
            segment.live = segment.live.saturating_sub(1);
        }
        if let Some(segment) = self.segments.get_mut(&place.segment) {
            segment.live += 1;
        }
    }

    /// Takes a delivery out; `None` when it is not there.
    fn remove(&mut self, webhook: &str, seq: u64) -> Option<Place> {
        let entries = self.by_webhook.get_mut(webhook)?;
        let place = entries.remove(&seq)?;
        if entries.is_empty() {
            self.by_webhook.remove(webhook);
        }
        if let Some(segment) = self.segments.get_mut(&place.segment) {
            segment.live = segment.live.saturating_sub(1);
        }
        Some(place)
    }
}

/// Reads the log from any thread.
#[derive(Clone)]
pub(super) struct LogReader {
    index: Arc<Mutex<Index>>,
}

fn lock(index: &Mutex<Index>) -> MutexGuard<'_, Index> {
    // Every critical section leaves the index whole.
    index.lock().unwrap_or_else(|e| e.into_inner())
}

impl LogReader {
    /// Up to `limit` unfinished deliveries of a webhook after sequence number `after`, in
    /// order, as stored (JSON).
    pub(super) fn load(
        &self,
        webhook: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if after == u64::MAX {
            return Ok(Vec::new());
        }
        let wanted: Vec<(u64, Arc<File>, Place)> = {
            let index = lock(&self.index);
            let Some(entries) = index.by_webhook.get(webhook) else {
                return Ok(Vec::new());
            };
            entries
                .range(after + 1..)
                .take(limit)
                .filter_map(|(seq, place)| {
                    let file = index.segments.get(&place.segment)?.file.clone();
                    Some((*seq, file, *place))
                })
                .collect()
        };
        // A segment deleted meanwhile (its deliveries copied forward) stays readable through
        // the open file.
        wanted
            .into_iter()
            .map(|(seq, file, place)| {
                let mut bytes = vec![0; place.len as usize];
                file.read_exact_at(&mut bytes, place.offset)
                    .map_err(|e| StoreError::Database(format!("reading the backlog: {e}")))?;
                Ok((seq, bytes))
            })
            .collect()
    }

    /// Unfinished deliveries per webhook.
    pub(super) fn counts(&self) -> Vec<(String, usize)> {
        let index = lock(&self.index);
        let mut counts: Vec<(String, usize)> = index
            .by_webhook
            .iter()
            .map(|(webhook, entries)| (webhook.clone(), entries.len()))
            .collect();
        counts.sort_unstable();
        counts
    }
}

/// The writer's side of the log (one thread).
pub(super) struct Log {
    dir: PathBuf,
    index: Arc<Mutex<Index>>,
    head: u64,
    head_file: Arc<File>,
    head_len: u64,
    frame: Vec<u8>,
    /// Tombstones waiting to be written (see [`Log::write_tombstones`]).
    tombstones: Vec<u64>,
    /// [`SEGMENT_BYTES`] (smaller in tests).
    segment_bytes: u64,
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("backlog-{first:020}.log"))
}

/// A frame's checksum: it only has to catch a write a crash cut short or left torn, so a
/// CRC (several GB/s) rather than a cryptographic hash.
fn checksum(payload: &[u8]) -> u64 {
    u64::from(crc32fast::hash(payload))
}

/// The checksum of a frame written by earlier versions.
fn checksum_sha256(payload: &[u8]) -> u64 {
    let digest = sha2::Sha256::digest(payload);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// Reads the frames of one segment: calls `found(seq, Some((webhook, offset, len)))` for each
/// entry and `found(seq, None)` for each tombstone, in order; returns the length of the whole
/// frames (what follows is cut).
fn scan(bytes: &[u8], mut found: impl FnMut(u64, Option<(&str, u64, u32)>)) -> u64 {
    let mut at = 0usize;
    while bytes.len() - at >= HEADER {
        let word =
            |i: usize| u32::from_le_bytes(bytes[at + i..at + i + 4].try_into().unwrap_or_default());
        let len = word(4) as usize;
        let sum = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap_or_default());
        let start = at + HEADER;
        let sum_of: fn(&[u8]) -> u64 = match word(0) {
            MAGIC => checksum,
            MAGIC_SHA256 => checksum_sha256,
            _ => break,
        };
        if bytes.len() - start < len {
            break;
        }
        let payload = &bytes[start..start + len];
        if sum_of(payload) != sum {
            break;
        }
        let mut p = 0usize;
        let complete = loop {
            if p == payload.len() {
                break true;
            }
            let Some((seq, rest)) = payload
                .get(p + 1..p + 9)
                .map(|s| (u64::from_le_bytes(s.try_into().unwrap_or_default()), p + 9))
            else {
                break false;
            };
            match payload[p] {
                TOMBSTONE => {
                    found(seq, None);
                    p = rest;
                }
                ENTRY => {
                    let Some(name_len) = payload.get(rest..rest + 2) else {
                        break false;
                    };
                    let name_len = u16::from_le_bytes([name_len[0], name_len[1]]) as usize;
                    let name_at = rest + 2;
                    let body_len_at = name_at + name_len;
                    let (Some(name), Some(body_len)) = (
                        payload.get(name_at..body_len_at),
                        payload.get(body_len_at..body_len_at + 4),
                    ) else {
                        break false;
                    };
                    let body_len = u32::from_le_bytes(body_len.try_into().unwrap_or_default());
                    let body_at = body_len_at + 4;
                    let (Ok(name), true) = (
                        std::str::from_utf8(name),
                        body_at + body_len as usize <= payload.len(),
                    ) else {
                        break false;
                    };
                    found(seq, Some((name, (start + body_at) as u64, body_len)));
                    p = body_at + body_len as usize;
                }
                _ => break false,
            }
        };
        if !complete {
            break;
        }
        at = start + len;
    }
    at as u64
}

impl Log {
    /// Opens the log in `dir`: reads every segment, truncates a cut tail, deletes segments
    /// with nothing unfinished. Returns the log, a reader, and the lowest sequence number that
    /// no entry has.
    pub(super) fn open(dir: &Path) -> Result<(Log, LogReader, u64), StoreError> {
        Self::open_sized(dir, SEGMENT_BYTES)
    }

    fn open_sized(dir: &Path, segment_bytes: u64) -> Result<(Log, LogReader, u64), StoreError> {
        let mut firsts: Vec<u64> = std::fs::read_dir(dir)
            .map_err(|e| io("reading", dir, e))?
            .filter_map(|entry| {
                let name = entry.ok()?.file_name();
                let name = name.to_str()?;
                name.strip_prefix("backlog-")?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()
            })
            .collect();
        firsts.sort_unstable();
        let mut index = Index::default();
        let mut next_seq = 1u64;
        // Unfinished deliveries by number while the segments are read (a tombstone names only
        // the number), with their webhooks' names interned.
        let mut names: Vec<String> = Vec::new();
        let mut name_ids: HashMap<String, usize> = HashMap::default();
        let mut unfinished: HashMap<u64, (usize, Place)> = HashMap::default();
        for &first in &firsts {
            let path = segment_path(dir, first);
            let bytes = std::fs::read(&path).map_err(|e| io("reading", &path, e))?;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io("opening", &path, e))?;
            next_seq = next_seq.max(first);
            let whole = scan(&bytes, |seq, found| {
                let Some((webhook, offset, len)) = found else {
                    unfinished.remove(&seq);
                    return;
                };
                {
                    next_seq = next_seq.max(seq + 1);
                    let id = match name_ids.get(webhook) {
                        Some(id) => *id,
                        None => {
                            names.push(webhook.to_string());
                            name_ids.insert(webhook.to_string(), names.len() - 1);
                            names.len() - 1
                        }
                    };
                    let place = Place {
                        segment: first,
                        offset,
                        len,
                    };
                    unfinished.insert(seq, (id, place));
                }
            });
            if whole < bytes.len() as u64 {
                tracing::warn!(
                    segment = %path.display(),
                    kept = whole,
                    cut = bytes.len() as u64 - whole,
                    "delivery store: a write cut short by a crash is dropped (no request was answered for it)"
                );
                file.set_len(whole)
                    .map_err(|e| io("truncating", &path, e))?;
            }
            index.segments.insert(
                first,
                Segment {
                    file: Arc::new(file),
                    live: 0,
                    len: whole,
                },
            );
        }
        for (seq, (id, place)) in unfinished {
            index.add(&names[id], seq, place);
        }
        let (head, head_file, head_len) = match index.segments.iter().next_back() {
            Some((first, segment)) => (*first, segment.file.clone(), segment.len),
            None => {
                let file = Arc::new(create_segment(dir, next_seq)?);
                index.segments.insert(
                    next_seq,
                    Segment {
                        file: file.clone(),
                        live: 0,
                        len: 0,
                    },
                );
                (next_seq, file, 0)
            }
        };
        let index = Arc::new(Mutex::new(index));
        let mut log = Log {
            dir: dir.to_path_buf(),
            index: index.clone(),
            head,
            head_file,
            head_len,
            frame: Vec::new(),
            tombstones: Vec::new(),
            segment_bytes,
        };
        log.drop_finished()?;
        Ok((log, LogReader { index }, next_seq))
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        lock(&self.index)
    }

    /// Writes deliveries (sequence number, webhook, JSON) as one frame and makes it durable.
    /// Nothing is indexed, and the segment is cut back, when the write fails.
    pub(super) fn append<'a>(
        &mut self,
        rows: impl Iterator<Item = (u64, &'a str, &'a [u8])> + Clone,
    ) -> Result<(), StoreError> {
        if self.head_len >= self.segment_bytes
            && let Some((first, _, _)) = rows.clone().next()
        {
            self.rotate(first)?;
        }
        self.write_entries(rows)
    }

    /// Writes deliveries as one frame into the head segment, durably, and indexes them.
    fn write_entries<'a>(
        &mut self,
        rows: impl Iterator<Item = (u64, &'a str, &'a [u8])> + Clone,
    ) -> Result<(), StoreError> {
        self.frame.clear();
        self.frame.resize(HEADER, 0);
        let mut places = Vec::new();
        for (seq, webhook, body) in rows.clone() {
            let name_len = u16::try_from(webhook.len())
                .map_err(|_| StoreError::Database(format!("webhook name too long: {webhook}")))?;
            let body_len = u32::try_from(body.len())
                .map_err(|_| StoreError::Database("delivery too large to store".into()))?;
            self.frame.push(ENTRY);
            self.frame.extend_from_slice(&seq.to_le_bytes());
            self.frame.extend_from_slice(&name_len.to_le_bytes());
            self.frame.extend_from_slice(webhook.as_bytes());
            self.frame.extend_from_slice(&body_len.to_le_bytes());
            places.push((self.head_len + self.frame.len() as u64, body_len));
            self.frame.extend_from_slice(body);
        }
        self.write_frame(true)?;
        let mut index = lock(&self.index);
        for ((seq, webhook, _), (offset, len)) in rows.zip(places) {
            index.add(
                webhook,
                seq,
                Place {
                    segment: self.head,
                    offset,
                    len,
                },
            );
        }
        Ok(())
    }

    /// Seals the frame in `self.frame` (header room at its start) and writes it at the end of
    /// the head segment, durably when asked.
    fn write_frame(&mut self, durable: bool) -> Result<(), StoreError> {
        let len = u32::try_from(self.frame.len() - HEADER)
            .map_err(|_| StoreError::Database("a write too large for one frame".into()))?;
        let sum = checksum(&self.frame[HEADER..]);
        self.frame[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        self.frame[4..8].copy_from_slice(&len.to_le_bytes());
        self.frame[8..16].copy_from_slice(&sum.to_le_bytes());
        let path = segment_path(&self.dir, self.head);
        let written = self
            .head_file
            .write_all_at(&self.frame, self.head_len)
            .and_then(|()| {
                if durable {
                    self.head_file.sync_data()
                } else {
                    Ok(())
                }
            });
        if let Err(e) = written {
            // A frame cut short would end the segment at the next open, and every frame after
            // it with it: cut it off now.
            let _ = self.head_file.set_len(self.head_len);
            return Err(io("writing", &path, e));
        }
        self.head_len += self.frame.len() as u64;
        if let Some(segment) = self.index().segments.get_mut(&self.head) {
            segment.len = self.head_len;
        }
        Ok(())
    }

    /// Starts a new head segment, named by the first sequence number it will hold (above
    /// every number written so far).
    fn rotate(&mut self, first: u64) -> Result<(), StoreError> {
        if first <= self.head {
            return Ok(());
        }
        let file = Arc::new(create_segment(&self.dir, first)?);
        self.index().segments.insert(
            first,
            Segment {
                file: file.clone(),
                live: 0,
                len: 0,
            },
        );
        self.head = first;
        self.head_file = file;
        self.head_len = 0;
        Ok(())
    }

    /// Takes a finished delivery out of the index; says whether it was there (and so needs a
    /// tombstone, see [`Log::tombstone`]).
    pub(super) fn finish(&mut self, webhook: &str, seq: u64) -> bool {
        self.index().remove(webhook, seq).is_some()
    }

    /// Adds finished deliveries' tombstones to the next [`Log::write_tombstones`].
    pub(super) fn tombstone(&mut self, seqs: impl IntoIterator<Item = u64>) {
        self.tombstones.extend(seqs);
    }

    /// Writes the waiting tombstones (call once the records of those deliveries are durable:
    /// a delivery must not end in the log before its record exists), durably when asked, then
    /// deletes the segments that hold nothing unfinished.
    pub(super) fn write_tombstones(&mut self, durable: bool) -> Result<(), StoreError> {
        if !self.tombstones.is_empty() {
            self.frame.clear();
            self.frame.resize(HEADER, 0);
            for seq in std::mem::take(&mut self.tombstones) {
                self.frame.push(TOMBSTONE);
                self.frame.extend_from_slice(&seq.to_le_bytes());
            }
            self.write_frame(durable)?;
        } else if durable {
            self.head_file
                .sync_data()
                .map_err(|e| io("syncing", &segment_path(&self.dir, self.head), e))?;
        }
        self.drop_finished()
    }

    /// Deletes the oldest segments while they hold nothing unfinished, and copies the oldest
    /// one's unfinished deliveries forward while the segments hold more than [`COMPACT_AFTER`].
    fn drop_finished(&mut self) -> Result<(), StoreError> {
        loop {
            let (first, live, total) = {
                let index = self.index();
                let Some((first, segment)) = index.segments.iter().next() else {
                    return Ok(());
                };
                let total: u64 = index.segments.values().map(|s| s.len).sum();
                (*first, segment.live, total)
            };
            if first == self.head {
                return Ok(());
            }
            if live > 0 {
                if total <= COMPACT_AFTER * self.segment_bytes {
                    return Ok(());
                }
                self.copy_forward(first)?;
            }
            self.index().segments.remove(&first);
            let path = segment_path(&self.dir, first);
            std::fs::remove_file(&path).map_err(|e| io("deleting", &path, e))?;
        }
    }

    /// Copies a segment's unfinished deliveries into the head, durably, under their numbers.
    fn copy_forward(&mut self, first: u64) -> Result<(), StoreError> {
        let moving: Vec<(String, u64, Place)> = {
            let index = self.index();
            index
                .by_webhook
                .iter()
                .flat_map(|(webhook, entries)| {
                    entries
                        .iter()
                        .filter(|(_, place)| place.segment == first)
                        .map(|(seq, place)| (webhook.clone(), *seq, *place))
                })
                .collect()
        };
        let file = match self.index().segments.get(&first) {
            Some(segment) => segment.file.clone(),
            None => return Ok(()),
        };
        let mut bodies = Vec::with_capacity(moving.len());
        for (_, _, place) in &moving {
            let mut body = vec![0; place.len as usize];
            file.read_exact_at(&mut body, place.offset)
                .map_err(|e| io("reading", &segment_path(&self.dir, first), e))?;
            bodies.push(body);
        }
        tracing::info!(
            deliveries = moving.len(),
            "delivery store: copying the oldest unfinished deliveries forward"
        );
        // One frame per part, so that no frame grows past what its length field holds.
        let rows: Vec<(u64, &str, &[u8])> = moving
            .iter()
            .zip(&bodies)
            .map(|((webhook, seq, _), body)| (*seq, webhook.as_str(), body.as_slice()))
            .collect();
        for part in rows.chunks(4096) {
            self.write_entries(part.iter().copied())?;
        }
        Ok(())
    }
}

/// Creates a segment file and makes its directory entry durable.
fn create_segment(dir: &Path, first: u64) -> Result<File, StoreError> {
    let path = segment_path(dir, first);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io("creating", &path, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing", dir, e))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .expect("dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("backlog-"))
            })
            .count()
    }

    fn seqs(reader: &LogReader, webhook: &str) -> Vec<u64> {
        reader
            .load(webhook, 0, usize::MAX)
            .expect("load")
            .into_iter()
            .map(|(seq, _)| seq)
            .collect()
    }

    #[test]
    fn unfinished_entries_survive_a_reopen_and_finished_ones_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, reader, next) = Log::open(dir.path()).expect("open");
        assert_eq!(next, 1);
        log.append(
            [
                (1, "ns/a", &b"one"[..]),
                (2, "ns/b", b"two"),
                (3, "ns/a", b"three"),
            ]
            .into_iter(),
        )
        .expect("append");
        assert_eq!(
            reader.load("ns/a", 0, 10).expect("load"),
            vec![(1, b"one".to_vec()), (3, b"three".to_vec())]
        );
        assert_eq!(
            reader.load("ns/a", 1, 10).expect("load"),
            vec![(3, b"three".to_vec())]
        );
        assert!(log.finish("ns/a", 1));
        assert!(!log.finish("ns/a", 1), "finished once");
        log.tombstone([1]);
        assert_eq!(seqs(&reader, "ns/a"), vec![3], "out of the index at once");
        log.write_tombstones(true).expect("tombstones");
        drop((log, reader));
        let (_log, reader, next) = Log::open(dir.path()).expect("reopen");
        assert_eq!(next, 4, "numbers go on after the highest written");
        assert_eq!(seqs(&reader, "ns/a"), vec![3]);
        assert_eq!(
            reader.counts(),
            vec![("ns/a".to_string(), 1), ("ns/b".to_string(), 1)]
        );
    }

    #[test]
    fn a_write_cut_short_is_dropped_and_what_came_before_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, reader, _) = Log::open(dir.path()).expect("open");
        log.append([(1, "ns/a", &b"kept"[..])].into_iter())
            .expect("append");
        drop((log, reader));
        // A crash in the middle of the next frame: its header and part of its payload.
        let path = segment_path(dir.path(), 1);
        let whole = std::fs::metadata(&path).expect("segment").len();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open segment");
        std::io::Write::write_all(&mut file, &MAGIC.to_le_bytes()).expect("write");
        std::io::Write::write_all(&mut file, &[200, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2])
            .expect("write");
        drop(file);
        let (mut log, reader, next) = Log::open(dir.path()).expect("reopen");
        assert_eq!(seqs(&reader, "ns/a"), vec![1]);
        assert_eq!(
            std::fs::metadata(&path).expect("segment").len(),
            whole,
            "cut back"
        );
        log.append([(next, "ns/a", &b"after"[..])].into_iter())
            .expect("append");
        drop((log, reader));
        let (_log, reader, _) = Log::open(dir.path()).expect("reopen");
        assert_eq!(
            reader.load("ns/a", 0, 10).expect("load"),
            vec![(1, b"kept".to_vec()), (next, b"after".to_vec())],
            "a frame written after the cut is read"
        );
    }

    #[test]
    fn frames_written_with_the_earlier_checksum_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        // One entry (sequence 7, webhook "ns/a", body "old") in a frame of the earlier layout.
        let mut payload = vec![ENTRY];
        payload.extend_from_slice(&7u64.to_le_bytes());
        payload.extend_from_slice(&4u16.to_le_bytes());
        payload.extend_from_slice(b"ns/a");
        payload.extend_from_slice(&3u32.to_le_bytes());
        payload.extend_from_slice(b"old");
        let mut frame = MAGIC_SHA256.to_le_bytes().to_vec();
        frame.extend_from_slice(&u32::try_from(payload.len()).expect("len").to_le_bytes());
        frame.extend_from_slice(&checksum_sha256(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        std::fs::write(segment_path(dir.path(), 7), &frame).expect("segment");
        let (mut log, reader, next) = Log::open(dir.path()).expect("open");
        assert_eq!(
            reader.load("ns/a", 0, 10).expect("load"),
            vec![(7, b"old".to_vec())]
        );
        assert_eq!(next, 8);
        log.append([(next, "ns/a", &b"new"[..])].into_iter())
            .expect("append");
        drop((log, reader));
        let (_log, reader, _) = Log::open(dir.path()).expect("reopen");
        assert_eq!(
            reader.load("ns/a", 0, 10).expect("load"),
            vec![(7, b"old".to_vec()), (8, b"new".to_vec())],
            "both layouts are read in one segment"
        );
    }

    #[test]
    fn finished_segments_are_deleted_and_a_stuck_backlog_is_copied_forward() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, reader, _) = Log::open_sized(dir.path(), 1024).expect("open");
        let body = vec![b'x'; 200];
        let mut stuck = Vec::new();
        let mut most = 0;
        for seq in 1..=400u64 {
            // Every tenth delivery is for a webhook that never answers.
            let webhook = if seq % 10 == 0 { "ns/down" } else { "ns/up" };
            log.append([(seq, webhook, body.as_slice())].into_iter())
                .expect("append");
            if webhook == "ns/up" {
                assert!(log.finish(webhook, seq));
                log.tombstone([seq]);
            } else {
                stuck.push(seq);
            }
            log.write_tombstones(false).expect("tombstones");
            most = most.max(segments(dir.path()));
        }
        assert_eq!(seqs(&reader, "ns/down"), stuck);
        assert!(seqs(&reader, "ns/up").is_empty());
        // 40 stuck deliveries of 200 bytes fill about 8 segments of 1 KiB: the log holds them
        // plus a bounded number of segments of finished ones, not all 400.
        assert!(most <= 20, "{most} segments at most");
        drop((log, reader));
        let (_log, reader, next) = Log::open_sized(dir.path(), 1024).expect("reopen");
        assert_eq!(seqs(&reader, "ns/down"), stuck, "in order, once each");
        assert!(seqs(&reader, "ns/up").is_empty());
        assert_eq!(next, 401);
        for (seq, bytes) in reader.load("ns/down", 0, usize::MAX).expect("load") {
            assert_eq!(bytes, body, "content of {seq}");
        }
    }
}
