//! `malloc_stats_print` into memory, cut at a size cap.

use super::ctl::{Ctl, PrintOptions};
use super::JemallocError;
use std::io::Write;

/// Output of `malloc_stats_print`, possibly cut at the size cap.
#[derive(Debug)]
#[cfg_attr(not(jemalloc), allow(dead_code))]
pub(crate) struct StatsDump {
    pub(crate) text: Vec<u8>,
    pub(crate) truncated: bool,
}

/// `malloc_stats_print` output, at most `cap` bytes.
pub(crate) fn dump(
    ctl: &Ctl,
    options: PrintOptions,
    cap: usize,
) -> Result<StatsDump, JemallocError> {
    let mut writer = CappedWriter {
        out: Vec::with_capacity(cap.min(256 * 1024)),
        cap,
        truncated: false,
    };
    ctl.stats_print(options, &mut writer)?;
    Ok(StatsDump {
        text: writer.out,
        truncated: writer.truncated,
    })
}

/// Keeps the first `cap` bytes and drops the rest (never failing, so jemalloc finishes its
/// walk normally).
struct CappedWriter {
    out: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.cap - self.out.len();
        if buf.len() > room {
            self.truncated = true;
        }
        self.out.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_keeps_the_first_cap_bytes() {
        let mut writer = CappedWriter {
            out: Vec::new(),
            cap: 5,
            truncated: false,
        };
        assert_eq!(writer.write(b"abc").unwrap(), 3);
        assert!(!writer.truncated);
        assert_eq!(writer.write(b"defg").unwrap(), 4);
        assert_eq!(
            (writer.out.as_slice(), writer.truncated),
            (&b"abcde"[..], true)
        );
    }
}
