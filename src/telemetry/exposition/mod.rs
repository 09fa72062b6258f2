//! The Prometheus text exposition of a registry: gathered, encoded once, and gzipped at most
//! once, whoever asks. Knows nothing of HTTP; the metrics endpoint serves what it renders.

mod encode;
mod zero;

pub(crate) use zero::ZeroHistogram;

use bytes::Bytes;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The content type of the text format this module writes (`text/plain; version=0.0.4`).
pub(crate) const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Renders one registry, sizing each render's buffer from the last one.
#[derive(Debug)]
pub(crate) struct Renderer {
    registry: prometheus::Registry,
    /// Histograms written at zero until their first measurement.
    zero: Vec<ZeroHistogram>,
    /// The size of the last render, so a large exposition is not regrown (and copied) a dozen
    /// times on every scrape.
    last_len: AtomicUsize,
}

/// One rendered exposition, with its gzip form made on first use.
#[derive(Debug)]
pub(crate) struct Render {
    text: Bytes,
    gzip: OnceLock<Bytes>,
}

impl Renderer {
    pub(crate) fn new(registry: prometheus::Registry, zero: Vec<ZeroHistogram>) -> Self {
        Self {
            registry,
            zero,
            last_len: AtomicUsize::new(0),
        }
    }

    /// Gathers the registry (which runs every observable callback) and encodes it. Blocking.
    pub(crate) fn render(&self) -> Result<Render, String> {
        let mut families = self.registry.gather();
        for histogram in &self.zero {
            histogram.fill(&mut families);
        }
        let last = self.last_len.load(Ordering::Relaxed);
        let mut text = String::with_capacity((last + last / 8).max(4096));
        encode::encode(&families, &mut text).map_err(|e| format!("cannot encode metrics: {e}"))?;
        self.last_len.store(text.len(), Ordering::Relaxed);
        Ok(Render {
            text: Bytes::from(text),
            gzip: OnceLock::new(),
        })
    }
}

impl Render {
    /// The text exposition.
    pub(crate) fn text(&self) -> &Bytes {
        &self.text
    }

    /// The text exposition, gzipped (once, on first call).
    pub(crate) fn gzip(&self) -> &Bytes {
        self.gzip.get_or_init(|| gzip(&self.text))
    }
}

/// gzip at the default level: a 100 KiB exposition compresses about 10× in about a
/// millisecond.
fn gzip(text: &[u8]) -> Bytes {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(text.len() / 6),
        flate2::Compression::default(),
    );
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(text);
    Bytes::from(encoder.finish().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_round_trips() {
        use std::io::Read;
        let text = b"metric_a 1\nmetric_b 2\n".repeat(100);
        let compressed = gzip(&text);
        assert!(compressed.len() < text.len() / 5);
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, text);
    }
}
