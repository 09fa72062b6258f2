//! [`MemoryLimit`]: how much memory the process may use, as given by the user, and its parser.

use std::fmt;
use std::str::FromStr;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

/// The memory the governor keeps the process under: a number of bytes, or a percentage of what
/// the process may use (its cgroup's `memory.max` under cgroup v2, `memory.limit_in_bytes`
/// under cgroup v1, otherwise the machine's physical memory).
///
/// Parsed from the forms the config endpoint and the example server's `--memory-limit` take:
/// bytes (`"1048576"`), a whole number with a binary unit (`"512KiB"`, `"320MiB"`, `"2GiB"`,
/// `"1TiB"`; the unit is case-sensitive, and `KB`/`MB`/`GB` are refused rather than guessed
/// at), or a percentage from 1 to 100 (`"90%"`, `"62.5%"`). No sign, no spaces, no zero.
///
/// ```
/// use tower_jemalloc::MemoryLimit;
///
/// assert_eq!("320MiB".parse::<MemoryLimit>()?, MemoryLimit::Bytes(320 << 20));
/// assert_eq!("90%".parse::<MemoryLimit>()?, MemoryLimit::PercentOfAvailable(90.0));
/// assert!("320MB".parse::<MemoryLimit>().is_err());
/// # Ok::<(), tower_jemalloc::MemoryLimitError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum MemoryLimit {
    /// This many bytes (at least 1 MiB: below that no process runs).
    Bytes(u64),
    /// This percentage (more than 0, at most 100) of the limit detected when the limit is
    /// set: the cgroup's, or the machine's physical memory.
    PercentOfAvailable(f64),
}

/// The smallest limit accepted, in bytes: no process runs in less.
pub(crate) const MIN_LIMIT_BYTES: u64 = MIB;

/// Why a memory limit was refused: a one-line reason naming what is allowed, as the config
/// endpoint's 400 answers it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("memory limit {given:?} is not valid: {reason}")]
pub struct MemoryLimitError {
    given: String,
    reason: &'static str,
}

impl MemoryLimitError {
    fn new(given: &str, reason: &'static str) -> Self {
        Self {
            given: given.to_owned(),
            reason,
        }
    }
}

const FORMS: &str = "use bytes (1048576), KiB, MiB, GiB or TiB (320MiB), or a percentage of \
                     the detected limit from 1% to 100% (90%)";

impl FromStr for MemoryLimit {
    type Err = MemoryLimitError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(number) = text.strip_suffix('%') {
            let valid = !number.is_empty()
                && number.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                && number.bytes().filter(|&b| b == b'.').count() <= 1
                && !number.starts_with('.')
                && !number.ends_with('.');
            let percent: f64 = match number.parse() {
                Ok(percent) if valid => percent,
                _ => return Err(MemoryLimitError::new(text, FORMS)),
            };
            if !(1.0..=100.0).contains(&percent) {
                return Err(MemoryLimitError::new(
                    text,
                    "a percentage is from 1% to 100% of the detected limit",
                ));
            }
            return Ok(Self::PercentOfAvailable(percent));
        }
        let digits = text.bytes().take_while(u8::is_ascii_digit).count();
        let (number, unit) = text.split_at(digits);
        let scale = match unit {
            "" => 1,
            "KiB" => KIB,
            "MiB" => MIB,
            "GiB" => GIB,
            "TiB" => TIB,
            _ => return Err(MemoryLimitError::new(text, FORMS)),
        };
        if number.is_empty() {
            return Err(MemoryLimitError::new(text, FORMS));
        }
        let bytes = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(scale))
            .ok_or_else(|| MemoryLimitError::new(text, "too large for 64 bits"))?;
        if bytes < MIN_LIMIT_BYTES {
            return Err(MemoryLimitError::new(text, "the smallest limit is 1MiB"));
        }
        Ok(Self::Bytes(bytes))
    }
}

impl fmt::Display for MemoryLimit {
    /// The form it parses from: bytes with the largest unit that divides them, or a percentage.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Bytes(bytes) => {
                for (unit, scale) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
                    if bytes % scale == 0 {
                        return write!(f, "{}{unit}", bytes / scale);
                    }
                }
                write!(f, "{bytes}")
            }
            Self::PercentOfAvailable(percent) => write!(f, "{percent}%"),
        }
    }
}

impl MemoryLimit {
    /// The limit in bytes, given what the process may use (`available`, when known): `None`
    /// for a percentage when nothing was detected. A percentage rounds down to whole bytes.
    pub(crate) fn bytes(self, available: Option<u64>) -> Option<u64> {
        match self {
            Self::Bytes(bytes) => Some(bytes),
            Self::PercentOfAvailable(percent) => {
                // u64 -> f64 is exact below 2^53 bytes (8 PiB); the percentage is at most 100.
                available.map(|available| (available as f64 * percent / 100.0) as u64)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_and_percentages_parse() {
        for (text, expected) in [
            ("1048576", MemoryLimit::Bytes(1 << 20)),
            ("2048KiB", MemoryLimit::Bytes(2 << 20)),
            ("320MiB", MemoryLimit::Bytes(320 << 20)),
            ("2GiB", MemoryLimit::Bytes(2 << 30)),
            ("1TiB", MemoryLimit::Bytes(1 << 40)),
            ("90%", MemoryLimit::PercentOfAvailable(90.0)),
            ("62.5%", MemoryLimit::PercentOfAvailable(62.5)),
            ("100%", MemoryLimit::PercentOfAvailable(100.0)),
            ("1%", MemoryLimit::PercentOfAvailable(1.0)),
        ] {
            assert_eq!(text.parse::<MemoryLimit>(), Ok(expected), "{text}");
        }
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        for (text, reason) in [
            ("", "use bytes"),
            ("MiB", "use bytes"),
            ("320MB", "use bytes"),
            ("320mib", "use bytes"),
            ("320 MiB", "use bytes"),
            ("+320MiB", "use bytes"),
            ("-1", "use bytes"),
            ("1.5GiB", "use bytes"),
            ("none", "use bytes"),
            ("%", "use bytes"),
            ("-5%", "use bytes"),
            ("1e2%", "use bytes"),
            (".5%", "use bytes"),
            ("0%", "from 1% to 100%"),
            ("0.5%", "from 1% to 100%"),
            ("101%", "from 1% to 100%"),
            ("0", "the smallest limit is 1MiB"),
            ("1000KiB", "the smallest limit is 1MiB"),
            ("99999999999999999999", "too large"),
            ("17179869184GiB", "too large"),
        ] {
            let err = text.parse::<MemoryLimit>().expect_err(text);
            let message = err.to_string();
            assert!(message.contains(reason), "{text}: {message}");
            assert!(!message.contains('\n'), "{text}: {message}");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in ["320MiB", "2GiB", "1048577", "1025KiB", "90%", "62.5%"] {
            let limit: MemoryLimit = text.parse().unwrap();
            assert_eq!(limit.to_string(), text);
        }
    }

    #[test]
    fn a_percentage_needs_a_detected_limit() {
        assert_eq!(MemoryLimit::Bytes(5 << 20).bytes(None), Some(5 << 20));
        let half = MemoryLimit::PercentOfAvailable(50.0);
        assert_eq!(half.bytes(Some(1000 << 20)), Some(500 << 20));
        assert_eq!(half.bytes(None), None);
    }
}
