//! gzip in parallel with deterministic output: the input is cut into
//! fixed 1 MiB chunks, each chunk is deflated on its own (ending in a sync
//! flush, the last one in a final block), and the pieces are joined into
//! one standard gzip member — the scheme pigz uses, without dictionary
//! priming. The bytes depend only on the input and the level, never on
//! the number of threads; any gzip reader (gzip, zlib, busybox, opkg)
//! reads the result.

use std::io::{self, Write};

use flate2::{Compress, Compression, Crc, FlushCompress};

const CHUNK: usize = 1 << 20;

/// A `Write` that gzips into `out` using `threads` threads.
pub struct ParallelGz<W: Write> {
    out: W,
    level: u32,
    threads: usize,
    pending: Vec<Vec<u8>>,
    current: Vec<u8>,
    crc: Crc,
    header_written: bool,
}

fn deflate_chunk(data: &[u8], level: u32, last: bool) -> io::Result<Vec<u8>> {
    let mut c = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    let mut input = data;
    loop {
        if out.capacity() - out.len() < 64 * 1024 {
            out.reserve(256 * 1024);
        }
        let before_in = c.total_in();
        let status = c
            .compress_vec(input, &mut out, flush)
            .map_err(io::Error::other)?;
        input = &input[(c.total_in() - before_in) as usize..];
        match status {
            flate2::Status::StreamEnd => break,
            _ if !last && input.is_empty() && out.capacity() > out.len() => break,
            _ => {}
        }
    }
    Ok(out)
}

impl<W: Write> ParallelGz<W> {
    /// gzip into `out` at `level` (1..=9) with up to `threads` threads.
    pub fn new(out: W, level: u32, threads: usize) -> ParallelGz<W> {
        ParallelGz {
            out,
            level: level.clamp(1, 9),
            threads: threads.max(1),
            pending: Vec::new(),
            current: Vec::with_capacity(CHUNK),
            crc: Crc::new(),
            header_written: false,
        }
    }

    fn header(&mut self) -> io::Result<()> {
        if !self.header_written {
            // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=0 OS=3 (Unix)
            self.out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3])?;
            self.header_written = true;
        }
        Ok(())
    }

    /// Compress and write the chunks waiting; with `finish`, the last one
    /// ends the deflate stream.
    fn drain(&mut self, finish: bool) -> io::Result<()> {
        self.header()?;
        let chunks = std::mem::take(&mut self.pending);
        let n = chunks.len();
        let level = self.level;
        for (b, batch) in chunks.chunks(self.threads).enumerate() {
            let first = b * self.threads;
            let results: Vec<io::Result<Vec<u8>>> = std::thread::scope(|s| {
                let handles: Vec<_> = batch
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let is_last = finish && first + i == n - 1;
                        s.spawn(move || deflate_chunk(c, level, is_last))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(io::Error::other("gzip thread panicked")))
                    })
                    .collect()
            });
            for r in results {
                self.out.write_all(&r?)?;
            }
        }
        Ok(())
    }

    /// Finish the stream and return the writer.
    pub fn finish(mut self) -> io::Result<W> {
        let last = std::mem::take(&mut self.current);
        self.pending.push(last);
        self.drain(true)?;
        let crc = self.crc.sum();
        let size = self.crc.amount();
        self.out.write_all(&crc.to_le_bytes())?;
        self.out.write_all(&size.to_le_bytes())?;
        Ok(self.out)
    }
}

impl<W: Write> Write for ParallelGz<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.current.len();
        let n = buf.len().min(room);
        self.current.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        if self.current.len() == CHUNK {
            let full = std::mem::replace(&mut self.current, Vec::with_capacity(CHUNK));
            self.pending.push(full);
            if self.pending.len() >= self.threads * 2 {
                self.drain(false)?;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gunzip(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(b)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn any_thread_count_gives_the_same_valid_stream() {
        let mut data = Vec::new();
        for i in 0..(3 * CHUNK + 12345) {
            data.push(((i * 7919) % 251) as u8 ^ (i / 1000) as u8);
        }
        let mut outputs = Vec::new();
        for threads in [1, 2, 3, 8] {
            let mut w = ParallelGz::new(Vec::new(), 6, threads);
            for piece in data.chunks(100_003) {
                w.write_all(piece).unwrap();
            }
            let gz = w.finish().unwrap();
            assert_eq!(gunzip(&gz), data, "threads={threads}");
            outputs.push(gz);
        }
        assert!(outputs.windows(2).all(|w| w[0] == w[1]));
        let empty = ParallelGz::new(Vec::new(), 6, 2).finish().unwrap();
        assert!(gunzip(&empty).is_empty());
    }
}
