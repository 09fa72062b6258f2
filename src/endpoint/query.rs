//! A request's query string, checked once by the pipeline before any endpoint reads it: a
//! name the endpoint does not know is a 400 (a misspelt `?mod=decay` must not run a full
//! purge), and so is a name given twice (`?mode=decay&mode=purge` must not run whichever the
//! endpoint happens to read). Endpoints read parameters only through a checked [`Query`].
//!
//! Names and values are compared as sent, without percent-decoding: every name and value this
//! crate accepts is a plain word or number, so `?mode=%64ecay` is an unknown mode and
//! `?%6Dode=decay` an unknown parameter (400 both), never a second way to spell one. A `+` is
//! not read as a space either: it is only ever part of a value, and no value accepts it.

use super::response::{self, Answer};
use http::StatusCode;

/// The parameters of one request, checked against the names its endpoint accepts: each
/// present at most once. Built only by [`Query::check`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Query<'q> {
    /// The query string, without the `?`; `None` when there is none, or when the endpoint
    /// does not check its parameters (and so reads none).
    raw: Option<&'q str>,
}

impl<'q> Query<'q> {
    /// Checks `query` against `allowed`: the 400 for the first pair whose name is not in
    /// `allowed`, or is given a second time (empty pairs, as in `a=1&&b=2`, are skipped).
    ///
    /// `allowed` `None`: nothing is checked, and the endpoint reads no parameter (`/metrics`,
    /// where Prometheus's scrape `params` may add names of its own, even repeated ones).
    pub(crate) fn check(
        query: Option<&'q str>,
        allowed: Option<&[&str]>,
        path: &str,
    ) -> Result<Self, Answer> {
        let Some(allowed) = allowed else {
            return Ok(Self { raw: None });
        };
        let names = || pairs(query).map(|(name, _)| name);
        for (index, name) in names().enumerate() {
            if !allowed.contains(&name) {
                let accepted = match allowed {
                    [] => "no parameters".to_owned(),
                    names => names.join(", "),
                };
                return Err(bad_request(format_args!(
                    "unknown parameter {name:?}: {path} accepts {accepted}"
                )));
            }
            if names().take(index).any(|earlier| earlier == name) {
                return Err(bad_request(format_args!(
                    "parameter {name:?} is given twice: {path} takes each parameter once"
                )));
            }
        }
        Ok(Self { raw: query })
    }

    /// The raw value of parameter `name`, if given; a bare `name` counts as an empty value.
    pub(crate) fn get(&self, name: &str) -> Option<&'q str> {
        pairs(self.raw).find_map(|(key, value)| (key == name).then_some(value))
    }

    /// Whether no parameter is given.
    pub(crate) fn is_empty(&self) -> bool {
        pairs(self.raw).next().is_none()
    }
}

/// The `(name, value)` pairs of `query`, empty pairs left out.
fn pairs(query: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    query
        .into_iter()
        .flat_map(|query| query.split('&'))
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// `value` as a whole number written with digits only: no sign (`+5`, `-5`), no space, no
/// fraction, no exponent. `None` for anything else, or a number too large for `T`.
///
/// Every number an endpoint reads goes through here (or [`signed_number`] where a negative
/// one means something), so that `?seconds=+3` is refused like `?seconds=3s` rather than read
/// by Rust's `parse`, which takes a leading `+`.
pub(crate) fn whole_number<T: std::str::FromStr>(value: &str) -> Option<T> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// `value` as a whole number that may be negative: an optional `-`, then digits only (no
/// `+`). For the parameters where a negative value has a meaning (a decay time of -1 is
/// "never"); the caller checks the range.
pub(crate) fn signed_number(value: &str) -> Option<i64> {
    match value.strip_prefix('-') {
        Some(digits) => whole_number::<i64>(digits).map(|n| -n),
        None => whole_number(value),
    }
}

fn bad_request(reason: impl std::fmt::Display) -> Answer {
    response::text(StatusCode::BAD_REQUEST, reason)
}

#[cfg(test)]
mod tests {
    use super::{signed_number, whole_number, Query, StatusCode};

    fn refusal(query: &str, allowed: &[&str]) -> Option<String> {
        Query::check(Some(query), Some(allowed), "/p")
            .err()
            .map(|answer| {
                assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
                format!("{:?}", answer.into_body())
            })
    }

    #[test]
    fn unknown_names_are_refused_naming_the_allowed_ones() {
        assert!(Query::check(None, Some(&["mode"]), "/p").is_ok());
        assert_eq!(refusal("", &["mode"]), None);
        assert_eq!(refusal("mode=decay&&", &["mode"]), None);
        for bad in [
            "MODE=bogus",
            "mod=decay",
            "mode=purge&x=1",
            "x",
            "%6Dode=decay",
        ] {
            let reason = refusal(bad, &["mode"]).expect(bad);
            assert!(reason.contains("unknown parameter"), "{bad}: {reason}");
            assert!(reason.contains("/p accepts mode"), "{bad}: {reason}");
        }
        let reason = refusal("a=1", &[]).unwrap();
        assert!(reason.contains("/p accepts no parameters"), "{reason}");
    }

    #[test]
    fn a_name_given_twice_is_refused() {
        for bad in [
            "mode=decay&mode=purge",
            "mode=decay&mode=decay",
            "mode&mode=decay",
            "mode=decay&format=json&mode",
        ] {
            let reason = refusal(bad, &["mode", "format"]).expect(bad);
            assert!(
                reason.contains("parameter \\\"mode\\\" is given twice"),
                "{bad}: {reason}"
            );
        }
        assert_eq!(refusal("mode=decay&format=json", &["mode", "format"]), None);
    }

    #[test]
    fn an_endpoint_that_does_not_check_reads_nothing() {
        let query = Query::check(Some("a=1&a=2"), None, "/p").unwrap();
        assert_eq!(query.get("a"), None);
        assert!(query.is_empty());
    }

    #[test]
    fn values_are_read_as_sent() {
        let query = |q| Query::check(Some(q), Some(&["mode", "x"]), "/p").unwrap();
        assert_eq!(query("").get("mode"), None);
        assert!(query("&&").is_empty());
        assert_eq!(query("x=1&mode=decay").get("mode"), Some("decay"));
        assert_eq!(query("mode").get("mode"), Some(""));
        assert_eq!(query("mode=%64ecay").get("mode"), Some("%64ecay"));
        assert_eq!(query("mode=a=b").get("mode"), Some("a=b"));
        assert_eq!(query("x=modes").get("mode"), None);
    }

    #[test]
    fn numbers_are_digits_without_a_sign() {
        assert_eq!(whole_number::<u64>("300"), Some(300));
        assert_eq!(whole_number::<u64>("007"), Some(7));
        for bad in ["", "+3", "-3", " 3", "3 ", "1.5", "1e3", "%33", "3s", "٣"] {
            assert_eq!(whole_number::<u64>(bad), None, "{bad:?}");
        }
        assert_eq!(whole_number::<u32>("4294967296"), None, "too large");
        assert_eq!(signed_number("-1"), Some(-1));
        assert_eq!(signed_number("5000"), Some(5000));
        for bad in ["+5000", "--1", "-+1", "-", "+-1", " -1"] {
            assert_eq!(signed_number(bad), None, "{bad:?}");
        }
    }
}
