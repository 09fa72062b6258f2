//! Reading a parameter from a request's query string, and refusing names an endpoint does not
//! know (a misspelt `?mod=decay` must not run a full purge).

use super::response::{self, Answer};
use http::StatusCode;

/// The raw value of the first `name=value` pair of `query` (no percent-decoding: the values
/// this crate accepts are plain words). A bare `name` counts as an empty value.
pub(crate) fn param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

/// The 400 for the first parameter of `query` whose name is not in `allowed`, if any.
pub(crate) fn unknown_param(query: Option<&str>, allowed: &[&str], path: &str) -> Option<Answer> {
    let unknown = query?
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').map_or(pair, |(key, _)| key))
        .find(|key| !allowed.contains(key))?;
    let accepted = match allowed {
        [] => "no parameters".to_owned(),
        names => names.join(", "),
    };
    Some(response::text(
        StatusCode::BAD_REQUEST,
        format_args!("unknown parameter {unknown:?}: {path} accepts {accepted}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::{param, unknown_param, StatusCode};

    #[test]
    fn unknown_names_are_refused_naming_the_allowed_ones() {
        assert!(unknown_param(None, &["mode"], "/p").is_none());
        assert!(unknown_param(Some(""), &["mode"], "/p").is_none());
        assert!(unknown_param(Some("mode=decay&mode"), &["mode"], "/p").is_none());
        for bad in ["MODE=bogus", "mod=decay", "mode=purge&x=1", "x"] {
            let answer = unknown_param(Some(bad), &["mode"], "/p").expect(bad);
            assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
        }
        assert!(unknown_param(Some("a=1"), &[], "/p").is_some());
    }

    #[test]
    fn first_pair_wins() {
        assert_eq!(param(None, "mode"), None);
        assert_eq!(param(Some(""), "mode"), None);
        assert_eq!(param(Some("a=1&mode=x&mode=y"), "mode"), Some("x"));
        assert_eq!(param(Some("mode"), "mode"), Some(""));
        assert_eq!(param(Some("modes=x"), "mode"), None);
    }
}
