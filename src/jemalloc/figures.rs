//! The one table of the allocator figures.
//!
//! Each line of [`figures!`] names a figure, the mallctl key it is read from (and whether that
//! key counts bytes or pages), and the help text of its gauge. Everything else derives from
//! it: the fields of [`JemallocStats`] and their JSON keys (in table order), the MIBs
//! [`Ctl`](super::ctl::Ctl) resolves and reads on every snapshot, the observable gauges
//! (`jemalloc.<name>`, unit `By`) and the tests' list of exported names. Adding a figure is
//! one line here.

use serde::{Deserialize, Serialize};

/// What a figure's mallctl key counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Bytes, as read.
    Bytes,
    /// Pages: the value read is multiplied by `arenas.page`.
    Pages,
}

/// One allocator figure: the row of the table.
#[derive(Debug)]
#[cfg_attr(not(jemalloc), allow(dead_code))]
pub(crate) struct Figure {
    /// The field of [`JemallocStats`], its JSON key and the gauge's name after `jemalloc.`.
    pub(crate) name: &'static str,
    /// The mallctl key, NUL-terminated as jemalloc wants it.
    pub(crate) key: &'static [u8],
    /// What the key counts.
    pub(crate) unit: Unit,
    /// The gauge's help text.
    pub(crate) help: &'static str,
}

#[cfg_attr(not(jemalloc), allow(dead_code))]
impl Figure {
    /// The key without its NUL, for error messages.
    pub(crate) fn key_str(&self) -> &'static str {
        let key = &self.key[..self.key.len() - 1];
        std::str::from_utf8(key).unwrap_or("?")
    }
}

macro_rules! figures {
    ($(
        $(#[doc = $doc:literal])*
        $field:ident: $key:literal in $unit:ident, $help:literal;
    )*) => {
        /// One consistent snapshot of jemalloc's global statistics, in bytes.
        ///
        /// All fields are read after a single `epoch` advance, so they describe the same
        /// moment. See the crate's README for what each figure means and how they relate
        /// (`allocated ≤ active ≤ resident ≤ mapped`, roughly).
        ///
        /// Serialized (with serde) as a flat object of integers in field order,
        /// `{"allocated":1,"active":2,…}`, the shape of Restate's purge report. Fields missing
        /// from a JSON object deserialize as 0, so answers of an older version still read.
        /// New figures may be added in minor releases: the struct is `#[non_exhaustive]`.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default)]
        #[non_exhaustive]
        pub struct JemallocStats {
            $( $(#[doc = $doc])* pub $field: u64, )*
        }

        /// The table: one row per figure, in field order.
        pub(crate) const FIGURES: &[Figure] = &[$(
            Figure { name: stringify!($field), key: $key, unit: Unit::$unit, help: $help },
        )*];

        impl JemallocStats {
            /// The names of the figures, in field (and JSON) order.
            pub const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];

            /// Every figure as `(name, bytes)`, in the order of [`FIELDS`](Self::FIELDS).
            pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
                [$((stringify!($field), self.$field)),*].into_iter()
            }

            /// Builds a snapshot by reading each figure of the table in order.
            #[cfg_attr(not(jemalloc), allow(dead_code))]
            pub(crate) fn try_from_table<E>(
                mut read: impl FnMut(usize, &'static Figure) -> Result<u64, E>,
            ) -> Result<Self, E> {
                let mut rows = FIGURES.iter().enumerate();
                let mut next = || {
                    let (index, figure) = rows.next().expect("one row per field");
                    read(index, figure)
                };
                Ok(Self { $($field: next()?,)* })
            }
        }
    };
}

figures! {
    /// `stats.allocated`: bytes allocated by the application.
    allocated: b"stats.allocated\0" in Bytes, "Total bytes allocated by the application";
    /// `stats.active`: bytes in active pages (a multiple of the page size).
    active: b"stats.active\0" in Bytes, "Total bytes in active pages (multiple of page size)";
    /// `stats.metadata`: bytes dedicated to jemalloc's own metadata.
    metadata: b"stats.metadata\0" in Bytes, "Bytes dedicated to jemalloc metadata";
    /// `stats.mapped`: bytes in chunks mapped for the application.
    mapped: b"stats.mapped\0" in Bytes, "Total bytes in chunks mapped for the application";
    /// `stats.retained`: bytes in virtual memory mappings retained, not returned to the OS.
    retained: b"stats.retained\0" in Bytes,
        "Bytes in virtual memory mappings retained (not returned to OS)";
    /// `stats.resident`: maximum bytes in physically resident data pages.
    resident: b"stats.resident\0" in Bytes, "Maximum bytes in physically resident data pages";
    /// `stats.arenas.<all>.pdirty` × `arenas.page`: unused dirty pages a purge would release.
    dirty: b"stats.arenas.4096.pdirty\0" in Pages,
        "Bytes in unused dirty pages that a purge would return to the OS";
    /// `stats.arenas.<all>.pmuzzy` × `arenas.page`: unused pages already advised to the OS
    /// (`MADV_FREE`) that the kernel has not reclaimed yet.
    muzzy: b"stats.arenas.4096.pmuzzy\0" in Pages,
        "Bytes in unused pages advised to the OS (MADV_FREE) but not yet reclaimed by it";
}

impl JemallocStats {
    /// The figure called `name` (one of [`FIELDS`](Self::FIELDS)).
    pub fn get(&self, name: &str) -> Option<u64> {
        self.iter()
            .find_map(|(field, value)| (field == name).then_some(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered() -> JemallocStats {
        JemallocStats::try_from_table(|i, _| Ok::<_, ()>(i as u64 + 1)).unwrap()
    }

    #[test]
    fn table_fields_and_json_agree() {
        assert_eq!(FIGURES.len(), JemallocStats::FIELDS.len());
        for (figure, field) in FIGURES.iter().zip(JemallocStats::FIELDS) {
            assert_eq!(figure.name, *field);
            assert_eq!(figure.key.last(), Some(&0), "{field}: key must end in NUL");
        }
        let stats = numbered();
        assert_eq!(stats.allocated, 1);
        assert_eq!(stats.get("muzzy"), Some(8));
        assert_eq!(stats.get("nope"), None);
        assert_eq!(
            serde_json::to_string(&stats).unwrap(),
            r#"{"allocated":1,"active":2,"metadata":3,"mapped":4,"retained":5,"resident":6,"dirty":7,"muzzy":8}"#
        );
    }

    #[test]
    fn json_round_trips_and_tolerates_missing_figures() {
        let stats = numbered();
        let json = serde_json::to_string(&stats).unwrap();
        assert_eq!(serde_json::from_str::<JemallocStats>(&json).unwrap(), stats);
        let old: JemallocStats = serde_json::from_str(r#"{"allocated":5}"#).unwrap();
        assert_eq!((old.allocated, old.dirty), (5, 0));
    }

    #[test]
    fn keys_print_without_nul() {
        assert_eq!(FIGURES[0].key_str(), "stats.allocated");
        assert_eq!(FIGURES[6].key_str(), "stats.arenas.4096.pdirty");
    }
}
