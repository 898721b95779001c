//! A gzip stream, decompressed forward from its start or from a checkpoint: what lets a
//! `.tar.gz` be read out of order without decompressing it from the start each time.
//!
//! The first pass (listing) records a checkpoint every so many decompressed bytes: the
//! inflater's whole state, its 32 KiB window and the input offset (about 43 KB each; at most
//! [`MAX_CHECKPOINTS`], the spacing doubling when they would be more). A later reader resumes
//! from the nearest checkpoint before the bytes it wants, so reaching any byte costs at most
//! one spacing of decompression. Every gzip member's trailer (CRC-32 and length) is checked
//! when the stream reaches it: a stream that is corrupt, ends early or has no trailer is an
//! error, never short or wrong data. Several members one after another (`pigz`, BGZF) are one
//! stream; zero bytes after the last are ignored (as `gzip` does), anything else is an error.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use miniz_oxide::inflate::core::{decompress_with_limit, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

/// The deflate window, and the ring the inflater writes into (a power of two).
const WINDOW: usize = 32 << 10;
/// Compressed bytes read from the file at once.
const INPUT: usize = 256 << 10;
/// Checkpoints kept at most (about 43 KB each).
pub const MAX_CHECKPOINTS: usize = 1024;

/// Where the inflater is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before a gzip member's header (or the end of the stream).
    Header,
    /// Inside a member's deflate data.
    Body,
    /// Past the last member.
    End,
}

/// All it takes to go on decompressing from one point of the stream.
#[derive(Clone)]
pub struct Checkpoint {
    /// Decompressed bytes before this point.
    out: u64,
    /// Compressed bytes before this point.
    input: u64,
    inflater: Box<DecompressorOxide>,
    window: Box<[u8]>,
    ring_pos: usize,
    crc: crc32fast::Hasher,
    member_len: u32,
}

impl Checkpoint {
    /// Decompressed bytes before this point.
    pub fn out(&self) -> u64 {
        self.out
    }
}

/// Records checkpoints while a reader goes through the stream.
struct Recorder {
    every: u64,
    next_at: u64,
    list: Vec<Checkpoint>,
}

/// A gzip stream read forward (see the module above).
pub struct GzReader {
    file: Arc<File>,
    input: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    /// File offset of the byte after `input[in_end]`.
    in_next: u64,
    in_eof: bool,
    phase: Phase,
    inflater: Box<DecompressorOxide>,
    ring: Box<[u8]>,
    ring_pos: usize,
    /// Decompressed bytes in `ring` not yet handed out.
    pending: (usize, usize),
    crc: crc32fast::Hasher,
    member_len: u32,
    /// Gzip members started.
    members: u64,
    /// Decompressed bytes handed out (the position in the decompressed stream).
    pos: u64,
    /// Bytes decompressed by this reader.
    inflated: u64,
    recorder: Option<Recorder>,
}

fn corrupt(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("gzip: {why}"))
}

fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "gzip: the stream ends early (truncated)",
    )
}

impl GzReader {
    /// A reader from the start of the gzip stream in `file`.
    pub fn open(file: Arc<File>) -> GzReader {
        GzReader {
            file,
            input: vec![0; INPUT].into_boxed_slice(),
            in_start: 0,
            in_end: 0,
            in_next: 0,
            in_eof: false,
            phase: Phase::Header,
            inflater: Box::default(),
            ring: vec![0; WINDOW].into_boxed_slice(),
            ring_pos: 0,
            pending: (0, 0),
            crc: crc32fast::Hasher::new(),
            member_len: 0,
            members: 0,
            pos: 0,
            inflated: 0,
            recorder: None,
        }
    }

    /// A reader from `at`, a checkpoint of the stream in `file`.
    pub fn resume(file: Arc<File>, at: &Checkpoint) -> GzReader {
        let mut r = GzReader::open(file);
        r.in_next = at.input;
        r.phase = Phase::Body;
        r.inflater = at.inflater.clone();
        r.ring.copy_from_slice(&at.window);
        r.ring_pos = at.ring_pos;
        r.crc = at.crc.clone();
        r.member_len = at.member_len;
        r.members = 1;
        r.pos = at.out;
        r
    }

    /// Record a checkpoint every `every` decompressed bytes from here on (more apart if there
    /// would be more than [`MAX_CHECKPOINTS`]).
    pub fn record_checkpoints(&mut self, every: u64) {
        self.recorder = Some(Recorder {
            every: every.max(1),
            next_at: self.pos + every.max(1),
            list: Vec::new(),
        });
    }

    /// The checkpoints recorded, in stream order.
    pub fn into_checkpoints(self) -> Vec<Checkpoint> {
        self.recorder.map(|r| r.list).unwrap_or_default()
    }

    /// Position in the decompressed stream.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// Bytes decompressed by this reader so far.
    pub fn inflated(&self) -> u64 {
        self.inflated
    }

    /// Pass over decompressed bytes up to position `to` without handing them out.
    pub fn skip_to(&mut self, to: u64) -> io::Result<()> {
        while self.pos < to {
            let (a, b) = self.pending;
            if a < b {
                let n = ((b - a) as u64).min(to - self.pos) as usize;
                self.pending.0 += n;
                self.pos += n as u64;
            } else if !self.fill_pending()? {
                return Err(truncated());
            }
        }
        Ok(())
    }

    /// Decompress more into `pending`; false at the end of the stream.
    fn fill_pending(&mut self) -> io::Result<bool> {
        loop {
            match self.phase {
                Phase::End => return Ok(false),
                Phase::Header => self.start_member()?,
                Phase::Body => {
                    self.record();
                    if self.inflate()? > 0 {
                        return Ok(true);
                    }
                }
            }
        }
    }

    fn record(&mut self) {
        let Some(r) = self.recorder.as_mut() else {
            return;
        };
        if self.pos < r.next_at {
            return;
        }
        r.list.push(Checkpoint {
            out: self.pos,
            input: self.in_next - (self.in_end - self.in_start) as u64,
            inflater: self.inflater.clone(),
            window: self.ring.clone(),
            ring_pos: self.ring_pos,
            crc: self.crc.clone(),
            member_len: self.member_len,
        });
        if r.list.len() > MAX_CHECKPOINTS {
            let mut keep = false;
            r.list.retain(|_| {
                keep = !keep;
                !keep
            });
            r.every *= 2;
        }
        r.next_at = r.list.last().map_or(0, |c| c.out) + r.every;
    }

    /// One call of the inflater: the bytes it made.
    fn inflate(&mut self) -> io::Result<usize> {
        if self.in_start == self.in_end && !self.in_eof {
            self.refill()?;
        }
        let flags = if self.in_eof {
            0
        } else {
            inflate_flags::TINFL_FLAG_HAS_MORE_INPUT
        };
        // Recording, stop at the next checkpoint.
        let limit = self.recorder.as_ref().map_or(usize::MAX, |r| {
            usize::try_from(r.next_at - self.pos).unwrap_or(usize::MAX)
        });
        let (status, used, made) = decompress_with_limit(
            &mut self.inflater,
            &self.input[self.in_start..self.in_end],
            &mut self.ring,
            self.ring_pos,
            limit,
            flags,
        );
        self.in_start += used;
        let made_range = self.ring_pos..self.ring_pos + made;
        self.crc.update(&self.ring[made_range.clone()]);
        self.member_len = self.member_len.wrapping_add(made as u32);
        self.inflated += made as u64;
        self.pending = (made_range.start, made_range.end);
        self.ring_pos = made_range.end & (WINDOW - 1);
        match status {
            TINFLStatus::Done => self.end_member()?,
            TINFLStatus::HasMoreOutput => {}
            TINFLStatus::NeedsMoreInput if !self.in_eof => self.refill()?,
            TINFLStatus::NeedsMoreInput | TINFLStatus::FailedCannotMakeProgress => {
                return Err(truncated())
            }
            _ => return Err(corrupt("the compressed data is corrupt")),
        }
        Ok(made)
    }

    /// Check a member's trailer against what it decompressed to.
    fn end_member(&mut self) -> io::Result<()> {
        let mut trailer = [0u8; 8];
        for b in &mut trailer {
            *b = self.byte()?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "gzip: the stream ends before its trailer (truncated)",
                )
            })?;
        }
        let crc = u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(trailer[4..].try_into().expect("4 bytes"));
        if crc != self.crc.clone().finalize() {
            return Err(corrupt(
                "CRC-32 mismatch: the decompressed data is not what was compressed",
            ));
        }
        if len != self.member_len {
            return Err(corrupt("length mismatch in the trailer"));
        }
        self.phase = Phase::Header;
        Ok(())
    }

    /// Read a member's header, or find the end of the stream.
    fn start_member(&mut self) -> io::Result<()> {
        let Some(b0) = self.byte()? else {
            if self.members == 0 {
                return Err(corrupt("the file is empty"));
            }
            self.phase = Phase::End;
            return Ok(());
        };
        if b0 == 0 && self.members > 0 {
            while let Some(b) = self.byte()? {
                if b != 0 {
                    return Err(corrupt("data after the end of the stream"));
                }
            }
            self.phase = Phase::End;
            return Ok(());
        }
        let head = [b0, self.need()?, self.need()?, self.need()?];
        if head[..2] != [0x1f, 0x8b] {
            return Err(corrupt(if self.members == 0 {
                "not gzip data"
            } else {
                "data after the end of the stream"
            }));
        }
        let flags = head[3];
        if head[2] != 8 || flags & 0xe0 != 0 {
            return Err(corrupt("unsupported header (not deflate?)"));
        }
        for _ in 0..6 {
            self.need()?; // modification time, extra flags, OS
        }
        if flags & 4 != 0 {
            let n = u16::from_le_bytes([self.need()?, self.need()?]);
            for _ in 0..n {
                self.need()?;
            }
        }
        for bit in [8, 16] {
            // File name, comment: zero-terminated.
            if flags & bit != 0 {
                while self.need()? != 0 {}
            }
        }
        if flags & 2 != 0 {
            self.need()?;
            self.need()?;
        }
        self.inflater.init();
        self.crc = crc32fast::Hasher::new();
        self.member_len = 0;
        self.members += 1;
        self.phase = Phase::Body;
        Ok(())
    }

    fn need(&mut self) -> io::Result<u8> {
        self.byte()?.ok_or_else(truncated)
    }

    fn byte(&mut self) -> io::Result<Option<u8>> {
        if self.in_start == self.in_end {
            self.refill()?;
            if self.in_start == self.in_end {
                return Ok(None);
            }
        }
        self.in_start += 1;
        Ok(Some(self.input[self.in_start - 1]))
    }

    /// Read more compressed bytes after those not yet used.
    fn refill(&mut self) -> io::Result<()> {
        if self.in_eof {
            return Ok(());
        }
        self.input.copy_within(self.in_start..self.in_end, 0);
        self.in_end -= self.in_start;
        self.in_start = 0;
        if self.in_end == self.input.len() {
            return Ok(());
        }
        loop {
            match self
                .file
                .read_at(&mut self.input[self.in_end..], self.in_next)
            {
                Ok(0) => self.in_eof = true,
                Ok(n) => {
                    self.in_end += n;
                    self.in_next += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            return Ok(());
        }
    }
}

impl Read for GzReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let (a, b) = self.pending;
            if a < b {
                let n = (b - a).min(buf.len());
                buf[..n].copy_from_slice(&self.ring[a..a + n]);
                self.pending.0 += n;
                self.pos += n as u64;
                return Ok(n);
            }
            if !self.fill_pending()? {
                return Ok(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8], level: u32) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn file_of(bytes: &[u8]) -> (tempfile::NamedTempFile, Arc<File>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let file = Arc::new(File::open(f.path()).unwrap());
        (f, file)
    }

    /// Bytes that compress a little (a pattern with noise), `n` of them.
    fn data(n: usize) -> Vec<u8> {
        let mut x = 12345u32;
        (0..n)
            .map(|i| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                if i % 7 == 0 {
                    (x >> 24) as u8
                } else {
                    (i / 100) as u8
                }
            })
            .collect()
    }

    /// Two members one after another with zero padding read as one stream, and from every
    /// checkpoint the rest of the stream is the same bytes.
    #[test]
    fn reads_members_and_resumes_from_every_checkpoint() {
        let (a, b) = (data(300_000), data(123_457));
        let mut bytes = gz(&a, 6);
        bytes.extend(gz(&b, 1));
        bytes.extend([0u8; 100]);
        let whole: Vec<u8> = [a, b].concat();
        let (_f, file) = file_of(&bytes);
        let mut r = GzReader::open(file.clone());
        r.record_checkpoints(10_000);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, whole);
        let cps = r.into_checkpoints();
        assert_eq!(cps.len(), 42);
        for cp in &cps {
            let mut r = GzReader::resume(file.clone(), cp);
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).unwrap();
            assert_eq!(rest, whole[cp.out() as usize..], "from {}", cp.out());
        }
        // Skipping hands nothing out and lands where asked.
        let mut r = GzReader::resume(file, &cps[3]);
        r.skip_to(cps[3].out() + 5000).unwrap();
        let mut five = [0u8; 5];
        r.read_exact(&mut five).unwrap();
        let at = cps[3].out() as usize + 5000;
        assert_eq!(five[..], whole[at..at + 5]);
    }

    /// Past [`MAX_CHECKPOINTS`] the spacing doubles: the count stays bounded.
    #[test]
    fn checkpoints_stay_bounded() {
        let (_f, file) = file_of(&gz(&vec![7u8; 3 * MAX_CHECKPOINTS * 100], 1));
        let mut r = GzReader::open(file);
        r.record_checkpoints(100);
        std::io::copy(&mut r, &mut std::io::sink()).unwrap();
        let cps = r.into_checkpoints();
        assert!(cps.len() <= MAX_CHECKPOINTS && cps.len() > MAX_CHECKPOINTS / 4);
        assert!(cps.windows(2).all(|w| w[0].out() < w[1].out()));
    }

    /// A bad CRC, a bad length, a cut trailer, cut data or garbage after the end: an error.
    #[test]
    fn damaged_streams_are_errors() {
        let good = gz(&data(100_000), 6);
        let n = good.len();
        let mut bad_crc = good.clone();
        bad_crc[n - 8] ^= 1;
        let mut bad_len = good.clone();
        bad_len[n - 1] ^= 1;
        let mut garbage = good.clone();
        garbage.extend(b"junk");
        for (bytes, why) in [
            (bad_crc, "CRC-32"),
            (bad_len, "length"),
            (good[..n - 8].to_vec(), "trailer"),
            (good[..n - 3].to_vec(), "trailer"),
            (good[..n / 2].to_vec(), "truncated"),
            (garbage, "after the end"),
            (b"not gzip".to_vec(), "not gzip"),
            (Vec::new(), "empty"),
        ] {
            let (_f, file) = file_of(&bytes);
            let e = std::io::copy(&mut GzReader::open(file), &mut std::io::sink()).unwrap_err();
            assert!(e.to_string().contains(why), "{why}: {e}");
        }
    }
}
